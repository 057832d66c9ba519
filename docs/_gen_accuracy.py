"""Generate ``docs/_generated/accuracy.rst``: measured accuracy of trmath against mpmath.

For every exact reduction and every input dtype, this script evaluates trmath and a textbook
PyTorch formula on the built-in deterministic adversarial rows of :mod:`trmath.testing`
(cast to the dtype *before* the oracle sees them), compares both with the 50-digit mpmath
references of :mod:`trmath.testing.oracles`, and writes the worst relative error of each, with
the number of rows outside the accuracy target (TARGETS.md), as two ``list-table`` directives.

Run it directly (``python docs/_gen_accuracy.py``) or let ``docs/conf.py`` run it when the
output is missing or ``TRMATH_DOCS_REGEN=1``. It takes about 15 s of CPU time; the
mpmath references dominate.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import trmath
from trmath.testing import (
    StableRNG,
    adversarial_batch,
    as_float64,
    cast,
    mp_batch,
    target_tolerance,
)

OUT = Path(__file__).resolve().parent / "_generated" / "accuracy.rst"

V = 513  # odd: exercises the vector tails (8 float / 4 double lanes)
N_PAIRS = 30  # 6 of each pair family
N_ROWS = 30  # 6 of each row family
N_LOGPROB_ROWS = 8  # rows that are log-probabilities (logsumexp ~ 0: the cancelling case)
SEED = 20250
DTYPES = ("float16", "bfloat16", "float32", "float64")
SINGLE = ("logsumexp", "entropy", "token_logprobs")
PAIR = ("kl", "tv", "js")


# ---- inputs ------------------------------------------------------------------------------------
def _single_inputs(dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial rows, plus rows of log-probabilities; tokens alternate argmax / random."""
    _, z, _ = adversarial_batch(N_ROWS, V, seed=SEED, dtype=dtype, pairs=False)
    _, base, _ = adversarial_batch(N_LOGPROB_ROWS, V, seed=SEED + 1, dtype=None, pairs=False)
    base = np.asarray(base, dtype=np.float64)
    lse = np.logaddexp.reduce(base, axis=-1, keepdims=True)
    logp = cast(base - lse, dtype)  # log-softmax rows: lse(z) ~ 0 after the cast
    z = torch.cat([z, logp])
    z64 = as_float64(z)
    rng = StableRNG(SEED + 2)
    tokens = []
    for i, row in enumerate(z64):
        finite = np.flatnonzero(np.isfinite(row))
        if i % 2 == 0:
            tokens.append(int(np.argmax(row)))  # log p(t) ~ 0 for peaked rows
        else:
            tokens.append(int(finite[rng.spawn(i).integers(0, finite.size)]))
    return z, torch.tensor(tokens, dtype=torch.int64)


def _pair_inputs(dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, z, w = adversarial_batch(N_PAIRS, V, seed=SEED, dtype=dtype, pairs=True)
    return z, w


# ---- the textbook peer -------------------------------------------------------------------------
def _naive(name: str, z: torch.Tensor, w: torch.Tensor | None, tokens: torch.Tensor | None):
    """The formula as commonly written in PyTorch, in the result dtype (float32 unless float64)."""
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(ct)
    if name == "logsumexp":
        return torch.logsumexp(z, -1)
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    if name == "entropy":
        return -(p * lp).sum(-1)
    if name == "token_logprobs":
        return lp.gather(-1, tokens[:, None])[:, 0]
    assert w is not None
    lq = torch.log_softmax(w.to(ct), -1)
    q = lq.exp()
    if name == "kl":
        return (p * (lp - lq)).sum(-1)
    if name == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    m = 0.5 * (p + q)
    lm = m.log()
    return 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)


def _trmath(name: str, z, w, tokens):
    if name == "token_logprobs":
        return trmath.token_logprobs(z, tokens)
    if name in PAIR:
        return getattr(trmath, name)(z, w)
    return getattr(trmath, name)(z)


# ---- metrics -----------------------------------------------------------------------------------
def _score(actual, ref: np.ndarray, dtype: str) -> tuple[float, int]:
    """Worst relative error (denominator floored at the target's atol) and rows over target."""
    rtol, atol = target_tolerance(dtype)
    a = as_float64(actual)
    with np.errstate(all="ignore"):
        same = (a == ref) | (np.isnan(a) & np.isnan(ref))
        err = np.where(same, 0.0, np.abs(a - ref))
        err = np.where(~same & ~(np.isfinite(a) & np.isfinite(ref)), np.inf, err)
        rel = err / np.maximum(np.abs(np.where(np.isfinite(ref), ref, 0.0)), atol)
        over = int(np.sum(err > atol + rtol * np.abs(np.where(np.isfinite(ref), ref, 0.0))))
    return float(np.max(rel)), over


def _fmt(rel: float, over: int, n: int) -> str:
    if rel == 0.0:
        text = "0"
    elif not np.isfinite(rel):
        text = "inf/NaN"
    else:
        text = f"{rel:.1e}"
    return text if over == 0 else f"{text} (**{over}** of {n} rows over target)"


def measure() -> dict[tuple[str, str], tuple[tuple[float, int], tuple[float, int], int]]:
    results = {}
    for dtype in DTYPES:
        z1, tok = _single_inputs(dtype)
        z2, w2 = _pair_inputs(dtype)
        for name in SINGLE + PAIR:
            if name in PAIR:
                ref = mp_batch(name, z2, w2)
                args = (z2, w2, None)
            else:
                ref = mp_batch(name, z1, tokens=tok if name == "token_logprobs" else None)
                args = (z1, None, tok)
            with torch.no_grad():
                ours = _score(_trmath(name, *args), ref, dtype)
                peer = _score(_naive(name, *args), ref, dtype)
            results[(name, dtype)] = (ours, peer, ref.size)
    return results


def _table(title: str, results, which: int) -> list[str]:
    lines = [
        f".. list-table:: {title}",
        "   :header-rows: 1",
        "   :stub-columns: 1",
        "",
        "   * - function",
    ]
    lines += [f"     - {d} inputs" for d in DTYPES]
    for name in SINGLE + PAIR:
        lines.append(f"   * - ``{name}``")
        for d in DTYPES:
            rel_over, n = results[(name, d)][which], results[(name, d)][2]
            lines.append(f"     - {_fmt(*rel_over, n)}")
    return lines + [""]


def _tex(x: float) -> str:
    """``1e-05`` as ``10^{-5}`` (LaTeX), for powers of ten."""
    mant, exp = f"{x:.0e}".split("e")
    return f"10^{{{int(exp)}}}" if mant == "1" else f"{mant} \\times 10^{{{int(exp)}}}"


def render(results, seconds: float) -> str:
    tol32, tol64 = target_tolerance("float32"), target_tolerance("float64")
    head = [
        ".. This file is generated by docs/_gen_accuracy.py; do not edit.",
        "",
        f"Measured on {platform.machine()} with trmath {trmath.__version__} "
        f"(CPU kernels, {trmath.num_threads()} threads), torch {torch.__version__}, in "
        f"{seconds:.0f} s of CPU time. Rows of length :math:`V = {V}`: {N_PAIRS} deterministic adversarial "
        f"pairs (the ``independent``, ``near``, ``offset``, ``peaked`` and ``masked`` families of "
        f":func:`trmath.testing.adversarial_batch`) for ``kl``, ``tv`` and ``js``; {N_ROWS} "
        f"adversarial rows (``normal``, ``wide``, ``peaked``, ``masked``, ``constant``) and "
        f"{N_LOGPROB_ROWS} rows of log-probabilities for the single-row functions, with tokens "
        f"alternating between the row's argmax and a random unmasked token. Each cell is the "
        f"worst relative error :math:`|a - r| / \\max(|r|, \\mathrm{{atol}})` against the 50-digit "
        f"reference :math:`r` of the cast inputs; rows outside the target "
        f":math:`|a - r| \\le {_tex(tol32[0])}\\,|r| + {_tex(tol32[1])}` (16/32-bit inputs) or "
        f":math:`{_tex(tol64[0])}\\,|r| + {_tex(tol64[1])}` (float64 inputs) are counted. "
        f"``inf/NaN`` marks a non-finite result where the reference is finite (or the reverse).",
        "",
    ]
    body = _table("trmath (C++ CPU kernels)", results, 0)
    body += [
        "The textbook peer is the formula as commonly written with PyTorch, evaluated in the "
        "result dtype (float32 for 16/32-bit inputs, float64 for float64 inputs): "
        "``torch.logsumexp``; ``-(p * logp).sum(-1)``; ``log_softmax(z).gather``; "
        "``(p * (logp - logq)).sum(-1)``; ``0.5 * (p - q).abs().sum(-1)``; and the two "
        "``KL(.||m)`` halves with ``m = (p + q) / 2`` -- with ``p = softmax(z)``, "
        "``logp = log_softmax(z)``.",
        "",
    ]
    body += _table("textbook PyTorch formula", results, 1)
    return "\n".join(head + body)


def main() -> int:
    t0, c0 = time.perf_counter(), time.process_time()
    results = measure()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render(results, cpu))
    print(f"wrote {OUT} in {seconds:.1f} s ({cpu:.1f} s CPU)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
