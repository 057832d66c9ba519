"""Generate ``docs/_generated/accuracy.rst``: measured accuracy of trmath against mpmath.

For every input dtype, this script evaluates trmath and a textbook PyTorch formula on
deterministic adversarial inputs (cast to the dtype *before* the oracle sees them), compares both
with 50-digit mpmath references, and writes the worst relative error of each, with the number of
entries outside the accuracy target (TARGETS.md), as two ``list-table`` directives. Three
families:

* the exact reductions (``logsumexp``, ``entropy``, ``token_logprobs``, ``kl``, ``tv``, ``js``)
  on the built-in adversarial rows of :mod:`trmath.testing`, against
  :mod:`trmath.testing.oracles`;
* the coarse-grained divergences (``binary_tv``, ``binary_kl``, ``topk_tv``, ``topk_kl``) on
  families of sampled-token log-probabilities and Top-K kept sets generated here, against
  :mod:`trmath.testing.oracles_coarse`;
* the sampled estimators (``k1``, ``k2``, ``k3``) on log-ratios from ``1e-30`` to ``80``, against
  :func:`trmath.testing.mp_estimator`.

Run it directly (``python docs/_gen_accuracy.py``) or let ``docs/conf.py`` run it when the
output is missing or ``TRMATH_DOCS_REGEN=1``. It takes about 20 s of CPU time; the
mpmath references dominate.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import mpmath
import numpy as np
import torch

import trmath
from trmath.testing import (
    StableRNG,
    adversarial_batch,
    as_float64,
    cast,
    mp_batch,
    mp_coarse_batch,
    mp_estimator,
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
BINARY = ("binary_tv", "binary_kl")
TOPK = ("topk_tv", "topk_kl")
ESTIMATORS = ("k1", "k2", "k3")
#: Every row of the tables, in order.
FUNCTIONS = SINGLE + PAIR + BINARY + TOPK + ESTIMATORS
N_FAMILY = 6  # entries (binary) or kept sets (Top-K) per input family
K = 20  # kept tokens of the Top-K sets
V_TOPK = 1000  # vocabulary the Top-K sets are taken from
N_MAGNITUDES = 40  # |log-ratio| values of the estimator inputs, log-spaced over [1e-30, 80]


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


def _binary_inputs(dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the sampled token under two policies, ``N_FAMILY`` pairs per family:
    both near probability 1 (apart, and close), one near 1 and the other not (both ways),
    near-equal in the bulk, deep tails (down to -1e4), and random."""
    rng = np.random.default_rng(SEED + 10)
    n = N_FAMILY
    e = -(10.0 ** -rng.uniform(1, 15, n))  # log p in [-0.1, -1e-15]: p -> 1
    a = -rng.uniform(0.01, 20, n)
    b = -(10.0 ** rng.uniform(1, 4, n))
    families = [
        (e, e * (1 + rng.uniform(-0.9, 3, n))),
        (e, e * (1 + 10.0 ** -rng.uniform(3, 9, n))),
        (e, -rng.uniform(0.01, 5, n)),
        (-rng.uniform(0.01, 5, n), e),
        (a, a + a * 10.0 ** -rng.uniform(4, 12, n)),
        (b, b * (1 + rng.uniform(-0.5, 0.5, n))),
        (-rng.exponential(2.0, n), -rng.exponential(2.0, n)),
    ]
    lp = np.concatenate([p for p, _ in families])
    lq = np.concatenate([q for _, q in families])
    return cast(lp, dtype), cast(lq, dtype)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def _kept_mass_at_most_one(row: torch.Tensor) -> bool:
    """Whether the exact values of a cast row of log-probabilities sum (as probabilities) to at
    most 1: a rounded row above 1 has a negative tail, hence no reference value."""
    with mpmath.workdps(60):
        return bool(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in as_float64(row)) <= 1)


def _topk_inputs(dtype: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Kept sets ``[N_FAMILY, k]`` of log-probabilities under two policies, by family: the top
    ``K`` tokens of a vocabulary of ``V_TOPK`` after a policy step; near-identical policies;
    mass moved onto the kept tokens; a tail of 1e-8 to 1e-25; ``K`` tokens out of a flat
    vocabulary of 1e5 (a tail near 1); two kept tokens that trade mass while the tail of 1e-6 to
    1e-14 barely moves (the tail cancellation). After the cast, sets whose kept mass exceeds 1
    are dropped."""
    rng = np.random.default_rng(SEED + 11)
    n = N_FAMILY
    z = rng.standard_normal((n, V_TOPK)) * 2
    lz = _log_softmax(z)
    top = np.argsort(-lz, axis=-1)[:, :K]

    def kept(logp: np.ndarray) -> np.ndarray:
        return np.take_along_axis(logp, top, axis=-1)

    step = _log_softmax(z + rng.standard_normal(z.shape) * 0.3)
    near = _log_softmax(z + rng.standard_normal(z.shape) * 10.0 ** -rng.uniform(3, 9, (n, 1)))
    moved = z.copy()
    np.put_along_axis(moved, top, kept(z) + 0.3, axis=-1)
    tail = -rng.uniform(20, 60, (n, 1)) + rng.standard_normal((n, V_TOPK - K)) * 0.5
    zp = np.concatenate([rng.standard_normal((n, K)), tail], -1)
    zq = zp + np.concatenate([rng.standard_normal((n, K)) * 0.05,
                              rng.standard_normal((n, V_TOPK - K))], -1)
    flat = np.full((n, K), -math.log(1e5)) + rng.standard_normal((n, K)) * 0.1
    R = 10.0 ** -rng.uniform(6, 14, n)
    delta = R * 10.0 ** rng.uniform(-1, 1, n)
    c = R * 10.0 ** -rng.uniform(3, 7, n)
    families = [
        (kept(lz), kept(step)),
        (kept(lz), kept(near)),
        (kept(lz), kept(_log_softmax(moved))),
        (_log_softmax(zp)[:, :K], _log_softmax(zq)[:, :K]),
        (flat, flat + rng.standard_normal((n, K)) * 0.2),
        (np.log(np.stack([np.full(n, 0.5), 0.5 - R], -1)),
         np.log(np.stack([0.5 + delta, 0.5 - R - delta - c], -1))),
    ]
    out = []
    for lp, lq in families:
        tp, tq = cast(lp, dtype), cast(lq, dtype)
        keep = torch.tensor([_kept_mass_at_most_one(a) and _kept_mass_at_most_one(b)
                             for a, b in zip(tp, tq)], dtype=torch.bool)
        if bool(keep.any()):
            out.append((tp[keep], tq[keep]))
    return out


def _estimator_inputs(dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampler and other log-probabilities, both <= 0: log-ratios ``l = o - s`` of magnitude
    1e-30 to 80, both signs, once with the larger log-probability at 0 (``o - s`` exact) and
    once on a random base in [-30, 0] (``o - s`` rounded, as in training)."""
    mag = np.logspace(-30, math.log10(80.0), N_MAGNITUDES)
    lr = np.concatenate([mag, -mag])
    base = -np.random.default_rng(SEED + 12).uniform(0.0, 30.0, lr.size)
    s = np.concatenate([-np.maximum(lr, 0.0), base])
    o = np.concatenate([np.minimum(lr, 0.0), np.minimum(base + lr, 0.0)])
    return cast(s, dtype), cast(o, dtype)


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


def _naive_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The coarse divergences and estimators as commonly written (``benchmarks/bench_coarse.py``,
    ``benchmarks/bench_estimators.py``, :mod:`trmath.testing.pitfalls`), in the result dtype.
    ``a, b`` are the two log-probabilities (``p, q`` for divergences, ``s, o`` for
    estimators)."""
    ct = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(ct), b.to(ct)
    if name in ESTIMATORS:
        lr = b - a
        return {"k1": lambda: -lr, "k2": lambda: 0.5 * lr**2,
                "k3": lambda: torch.exp(lr) - 1 - lr}[name]()
    p, q = a.exp(), b.exp()
    if name == "binary_tv":
        return (p - q).abs()
    if name == "binary_kl":
        return p * torch.log(p / q) + (1 - p) * torch.log((1 - p + 1e-8) / (1 - q + 1e-8))
    rp, rq = 1 - p.sum(-1), 1 - q.sum(-1)
    if name == "topk_tv":
        return 0.5 * ((p - q).abs().sum(-1) + (rp - rq).abs())
    rp, rq = rp.clamp_min(1e-8), rq.clamp_min(1e-8)
    return (p * torch.log(p / q)).sum(-1) + rp * torch.log(rp / rq)


def _mp_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """The 50-digit references of a coarse divergence or an estimator, as float64."""
    if name in ESTIMATORS:
        vals = [mp_estimator(name, x, y) for x, y in zip(as_float64(a), as_float64(b))]
    else:
        vals = list(mp_coarse_batch(name, as_float64(a), as_float64(b)).reshape(-1))
    return np.array([float(v) for v in vals], dtype=np.float64)


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


def _fmt(rel: float, over: int, n: int, unit: str = "rows") -> str:
    if rel == 0.0:
        text = "0"
    elif not np.isfinite(rel):
        text = "inf/NaN"
    else:
        text = f"{rel:.1e}"
    return text if over == 0 else f"{text} (**{over}** of {n} {unit} over target)"


def _measure_pairs(name: str, batches: list[tuple[torch.Tensor, torch.Tensor]], dtype: str,
                   ours: Callable[..., torch.Tensor]):
    """Score trmath's ``ours`` and the textbook formula on batches of the coarse / estimator
    inputs, over the entries whose reference is finite (an infinite binary KL, ``q = 1 > p``,
    is a matter of the definition, not of accuracy)."""
    refs, mine, peers = [], [], []
    for a, b in batches:
        ref = _mp_pair(name, a, b)
        finite = torch.from_numpy(np.isfinite(ref))
        if not bool(finite.any()):
            continue
        a, b = a[finite], b[finite]  # entries, or whole Top-K kept sets
        with torch.no_grad():
            mine.append(as_float64(ours(a, b)))
            peers.append(as_float64(_naive_pair(name, a, b)))
        refs.append(ref[finite.numpy()])
    ref = np.concatenate(refs)
    ours = _score(np.concatenate(mine), ref, dtype)
    return ours, _score(np.concatenate(peers), ref, dtype), ref.size


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
        binary = [_binary_inputs(dtype)]
        topk = _topk_inputs(dtype)
        estimators = [_estimator_inputs(dtype)]
        for name in BINARY + TOPK + ESTIMATORS:
            batches = binary if name in BINARY else topk if name in TOPK else estimators
            results[(name, dtype)] = _measure_pairs(name, batches, dtype, getattr(trmath, name))
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
    for name in FUNCTIONS:
        lines.append(f"   * - ``{name}``")
        unit = "kept sets" if name in TOPK else "entries" if name in BINARY + ESTIMATORS else "rows"
        for d in DTYPES:
            rel_over, n = results[(name, d)][which], results[(name, d)][2]
            lines.append(f"     - {_fmt(*rel_over, n, unit)}")
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
        f"alternating between the row's argmax and a random unmasked token. For the coarse "
        f"divergences, pairs of sampled-token log-probabilities ({N_FAMILY} per family: both near "
        f"probability 1, apart and close; one near 1 and the other not, both ways; near-equal; "
        f"deep tails down to :math:`-10^4`; random) for ``binary_tv`` and ``binary_kl``, and "
        f"kept sets of {K} tokens of a vocabulary of {V_TOPK} ({N_FAMILY} per family: after a "
        f"policy step; near-identical policies; mass moved onto the kept tokens; tails of "
        f":math:`10^{{-8}}` to :math:`10^{{-25}}`; a flat vocabulary of :math:`10^5`; and two kept "
        f"tokens trading mass over a tail of :math:`10^{{-6}}` to :math:`10^{{-14}}`) for "
        f"``topk_tv`` and ``topk_kl``, against :mod:`trmath.testing.oracles_coarse` (a kept "
        f"set whose cast probabilities sum to more than 1, or an infinite binary KL at "
        f":math:`q = 1 > p`, has no finite reference and is left out). For the estimators, "
        f"{4 * N_MAGNITUDES} pairs of log-probabilities whose log-ratio :math:`\\ell = o - s` has "
        f"a magnitude from :math:`10^{{-30}}` to 80, both signs, exact or rounded, against "
        f":func:`trmath.testing.mp_estimator`. Each cell is the "
        f"worst relative error :math:`|a - r| / \\max(|r|, \\mathrm{{atol}})` against the 50-digit "
        f"reference :math:`r` of the cast inputs; rows (entries, kept sets) outside the target "
        f":math:`|a - r| \\le {_tex(tol32[0])}\\,|r| + {_tex(tol32[1])}` (16/32-bit inputs) or "
        f":math:`{_tex(tol64[0])}\\,|r| + {_tex(tol64[1])}` (float64 inputs) are counted. "
        f"``inf/NaN`` marks a non-finite result where the reference is finite (or the reverse).",
        "",
    ]
    body = _table("trmath (CPU)", results, 0)
    body += [
        "The textbook peer is the formula as commonly written with PyTorch, evaluated in the "
        "result dtype (float32 for 16/32-bit inputs, float64 for float64 inputs): "
        "``torch.logsumexp``; ``-(p * logp).sum(-1)``; ``log_softmax(z).gather``; "
        "``(p * (logp - logq)).sum(-1)``; ``0.5 * (p - q).abs().sum(-1)``; and the two "
        "``KL(.||m)`` halves with ``m = (p + q) / 2`` -- with ``p = softmax(z)``, "
        "``logp = log_softmax(z)``; for the coarse divergences, with ``p = exp(logp)`` of the "
        "kept log-probabilities, ``(p - q).abs()``; ``p * log(p / q) + (1 - p) * "
        "log((1 - p + 1e-8) / (1 - q + 1e-8))``; the tails ``1 - p.sum(-1)`` (clamped at "
        "``1e-8`` for the Top-K KL) added as one more bucket; for the estimators, with "
        "``lr = o - s``, ``-lr``, ``0.5 * lr**2`` and ``exp(lr) - 1 - lr``.",
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
