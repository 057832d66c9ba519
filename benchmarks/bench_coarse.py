#!/usr/bin/env python
"""Benchmark suite ``coarse``: DPPO's Binary / Top-K divergences and the Top-K builder.

* ``trmath.binary_tv`` / ``binary_kl`` on ``[N]`` log-probabilities of sampled tokens and
  ``trmath.topk_tv`` / ``topk_kl`` on ``[N, K]`` (``K = 20``) against the textbook float32 torch
  formulas a trainer writes (``exp`` then difference; ``log((1 - p + 1e-8) / (1 - q + 1e-8))``
  for the binary tail; ``1 - p.sum()`` for the Top-K tail), eager and (full mode) compiled.
* ``trmath.topk_logprobs(p_logits, q_logits, k, tokens)`` at ``V = 151936`` against
  ``torch.topk`` + ``log_softmax`` + ``gather``, with the peak extra memory of each.

Every result is first checked against the exact formula evaluated in float64 on the same inputs
(``log1p``/``expm1`` forms for the tails, so the reference itself does not cancel); see
``README.md`` for the tolerances. Run through ``run.py`` (``--suites coarse``) or directly:
``python benchmarks/bench_coarse.py [--quick] [--tiny] [--out DIR]``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# run directly: the same OpenMP wait policy as run.py and bench_exact.py (set before torch loads)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import trmath  # noqa: E402

NAME = "coarse"
K = 20
SHAPES = {  # mode -> N of the binary case, N of the Top-K case, (N, V) of topk_logprobs
    "tiny": (2048, 256, (8, 4096)),
    "quick": (100_000, 2_000, (16, 151936)),
    # Top-K: 2e5 tokens x K = 20 is 4e6 log-probabilities per input, sized so that the suite
    # stays within minutes with trmath.topk_kl's float64 (double-double) evaluation.
    "full": (1_000_000, 200_000, (128, 151936)),
}
# Tolerances (relative to the float64 value, on every element):
#  * trmath: 1e-5, the library's documented bound for 16/32-bit inputs (TARGETS.md). The float64
#    references below lose at most ~1e-16 / |d| relative (d the log-ratio; |d| >= 1e-7 on these
#    inputs), far below it.
#  * textbook float32 baselines: 1e-2 relative plus 1e-3 x mean |reference| absolute. Their
#    error is float32 rounding of O(p) terms that cancel (e.g. p log(p/q) + (1-p) log(...) with
#    p ~ q), so it is absolute, not relative; the gate only confirms that the baseline computes
#    the same quantity. Its measured error is reported.
#  * topk_logprobs: trmath 1e-5 relative; the torch baseline 1e-2 relative + 1e-3 absolute in
#    log-probability (float32 log_softmax's error is that of log(sum of V exponentials)).
TRMATH_RTOL = 1e-5
BASE_RTOL, BASE_ATOL_MEAN, BASE_LP_ATOL = 1e-2, 1e-3, 1e-3


# ---------------------------------------------------------------------------------------------
# textbook float32 formulas (the baselines)
# ---------------------------------------------------------------------------------------------
def tb_binary_tv(lp, lq):
    return (lp.exp() - lq.exp()).abs()


def tb_binary_kl(lp, lq):
    p, q = lp.exp(), lq.exp()
    return p * (lp - lq) + (1 - p) * torch.log((1 - p + 1e-8) / (1 - q + 1e-8))


def tb_topk_tv(lp, lq):
    p, q = lp.exp(), lq.exp()
    rp, rq = 1 - p.sum(-1), 1 - q.sum(-1)
    return 0.5 * ((p - q).abs().sum(-1) + (rp - rq).abs())


def tb_topk_kl(lp, lq):
    p, q = lp.exp(), lq.exp()
    rp, rq = (1 - p.sum(-1)).clamp_min(1e-8), (1 - q.sum(-1)).clamp_min(1e-8)
    return (p * (lp - lq)).sum(-1) + rp * torch.log(rp / rq)


def tb_topk_logprobs(z, w, k, tok):
    top = torch.topk(z, k, dim=-1).indices
    ids = torch.cat([top, tok.unsqueeze(-1)], dim=-1)
    return ids, F.log_softmax(z, -1).gather(-1, ids), F.log_softmax(w, -1).gather(-1, ids)


# ---------------------------------------------------------------------------------------------
# float64 references: exact formulas, tails from expm1 (no 1 - p cancellation)
# ---------------------------------------------------------------------------------------------
def ref_binary_tv(lp, lq):
    """``|p - q| = e^max(lp, lq) (1 - e^-|lq - lp|)`` in float64: the difference of two rounded
    exponentials would lose ``eps / |lq - lp|`` relative (2e-3 at a one-ulp difference near
    ``p = 1``); this form has a few ulps."""
    lp, lq = lp.double(), lq.double()
    return torch.maximum(lp, lq).exp() * -torch.expm1(-(lq - lp).abs())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x <= 0`` to a few ulps: ``log1p(-e^x)`` where ``e^x < 1/2``,
    ``log(-expm1(x))`` elsewhere (neither form cancels on its side)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def ref_binary_kl(lp, lq):
    """``KL = p g(d) + (1 - p) g(d_R)`` in float64, ``g(x) = expm1(x) - x >= 0`` (the identity
    ``p log(p/q) + (1-p) log((1-p)/(1-q)) = p g(d) + (1-p) g(d_R)`` with ``d = lq - lp``,
    ``d_R = log((1-q)/(1-p)) = log1p(-p expm1(d) / (1-p))``). Both terms are non-negative and each
    factor is formed to a few ulps (``1 - p = -expm1(lp)``, ``g`` by a series near 0), so the
    reference holds a few ulps where the textbook form ``p (lp - lq) + (1-p)(log(1-p) -
    log(1-q))`` cancels (by a factor ``~ 2 (1-p) / |d|``, e.g. ``1e5`` at ``d = 2.5e-7``)."""
    lp, lq = lp.double(), lq.double()
    d = lq - lp  # exact
    p, one_m_p = lp.exp(), -torch.expm1(lp)
    d_r = torch.log1p(-p * torch.expm1(d) / one_m_p)
    return p * C.expm1mx(d) + one_m_p * C.expm1mx(d_r)


def ref_topk(lp, lq, which: str):
    lp, lq = lp.double(), lq.double()
    p, q = lp.exp(), lq.exp()
    lrp, lrq = log1mexp(torch.logsumexp(lp, -1)), log1mexp(torch.logsumexp(lq, -1))
    rp, rq = lrp.exp(), lrq.exp()
    if which == "tv":
        return 0.5 * ((p - q).abs().sum(-1) + (rp - rq).abs())
    return (p * (lp - lq)).sum(-1) + rp * (lrp - lrq)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def binary_inputs(n: int, seed: int):
    """Sampled-token log-probabilities: p(a) = sigmoid(x) from ~1e-6 to 1 - 1e-6, and q(a) 0.3
    away in logit space (the trust-region regime)."""
    g = torch.Generator().manual_seed(seed + 11)
    x = torch.randn(n, generator=g).mul_(3.0).add_(1.0)
    y = x + 0.3 * torch.randn(n, generator=g)
    return F.logsigmoid(x), F.logsigmoid(y)


def topk_inputs(n: int, k: int, seed: int):
    """``[n, k]`` log-probabilities of k kept tokens under two policies; a tail bucket keeps a
    share of the mass (logit + 3), the second policy is 0.2 away per logit."""
    g = torch.Generator().manual_seed(seed + 13)
    z = torch.randn(n, k + 1, generator=g).mul_(2.0)
    z[:, k] += 3.0
    w = z + 0.2 * torch.randn(n, k + 1, generator=g)
    return F.log_softmax(z, -1)[:, :k].contiguous(), F.log_softmax(w, -1)[:, :k].contiguous()


def logits_inputs(n: int, v: int, seed: int):
    g = torch.Generator().manual_seed(seed + 17)
    z = torch.randn(n, v, generator=g).mul_(3.0)
    w = z + 0.3 * torch.randn(n, v, generator=g)
    tok = torch.randint(0, v, (n,), generator=g)
    tok[::2] = z[::2].argmax(-1)  # half the rows sample the top token: the empty-slot path
    return z, w, tok


def _base_tol(ref: torch.Tensor) -> tuple[float, float, str]:
    atol = BASE_ATOL_MEAN * float(ref[torch.isfinite(ref)].abs().mean())
    return BASE_RTOL, atol, f"rtol {BASE_RTOL:g} + {BASE_ATOL_MEAN:g} mean|ref|"


# ---------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------
def _elementwise_case(s: C.Suite, case: str, shape: str, args, tm, tb, ref) -> None:
    rt, at, ttxt = _base_tol(ref)
    trm_tol = f"rtol {TRMATH_RTOL:g}"
    methods = {
        "torch eager": (lambda: tb(*args), lambda o: C.check_close(o, ref, rt, at), ttxt),
        "trmath": (lambda: tm(*args), lambda o: C.check_close(o, ref, TRMATH_RTOL, 1e-30), trm_tol),
        "trmath validate=False": (lambda: tm(*args, validate=False),
                                  lambda o: C.check_close(o, ref, TRMATH_RTOL, 1e-30), trm_tol),
    }
    cf = s.compiled(tb, case)
    if cf is not None:
        methods["torch compiled"] = (lambda: cf(*args), lambda o: C.check_close(o, ref, rt, at), ttxt)
    with torch.no_grad():
        s.compare(case, "fwd", shape, methods, baseline="torch eager")


def run(s: C.Suite) -> None:
    n, nk, (nr, v) = SHAPES[s.cfg.mode]
    seed = s.cfg.seed
    lp, lq = binary_inputs(n, seed)
    for case, tm, tb, rf in (("binary_tv", trmath.binary_tv, tb_binary_tv, ref_binary_tv),
                             ("binary_kl", trmath.binary_kl, tb_binary_kl, ref_binary_kl)):
        s.guard(case, lambda: _elementwise_case(s, case, f"[{n}]", (lp, lq), tm, tb, rf(lp, lq)))
    del lp, lq
    tp, tq = topk_inputs(nk, K, seed)
    for case, tm, tb, which in (("topk_tv", trmath.topk_tv, tb_topk_tv, "tv"),
                                ("topk_kl", trmath.topk_kl, tb_topk_kl, "kl")):
        s.guard(case, lambda: _elementwise_case(s, case, f"[{nk}, {K}]", (tp, tq), tm, tb,
                                                ref_topk(tp, tq, which)))
    del tp, tq
    s.guard("topk_logprobs", lambda: _topk_logprobs_case(s, nr, v, seed))


def _topk_logprobs_case(s: C.Suite, n: int, v: int, seed: int) -> None:
    z, w, tok = logits_inputs(n, v, seed)
    k = K
    # reference: ids from the float64 logits (the same order: the upcast is exact), float64
    # log_softmax gathered; trmath's k_plus_1 layout marks the extra slot empty (-inf under both
    # policies) where the token is already among the top-k.
    z64, w64 = z.double(), w.double()
    top = torch.topk(z64, k, dim=-1).indices
    ids = torch.cat([top, tok.unsqueeze(-1)], -1)
    lp = F.log_softmax(z64, -1).gather(-1, ids)
    lq = F.log_softmax(w64, -1).gather(-1, ids)
    del z64, w64
    empty = torch.zeros_like(ids, dtype=torch.bool)
    empty[:, k] = (top == tok.unsqueeze(-1)).any(-1)
    ninf = torch.tensor(float("-inf"), dtype=torch.float64)
    lp_e, lq_e = torch.where(empty, ninf, lp), torch.where(empty, ninf, lq)

    def ids_check(got_ids) -> C.Check:
        same = torch.equal(got_ids.cpu(), ids)
        return C.Check(same, 0.0 if same else float("inf"),
                       "" if same else f"ids differ from the float64 top-k in "
                       f"{int((got_ids.cpu() != ids).any(-1).sum())} rows")

    def check_trmath(o) -> C.Check:
        return C.check_all(ids_check(o[0]), C.check_close(o[1:], (lp_e, lq_e), TRMATH_RTOL, 1e-30,
                                                          "logprobs"))

    def check_base(o) -> C.Check:
        # float32 log_softmax errs by the rounding of log(sum of V exponentials): an absolute
        # error of the log-probability (1e-4 relative fails near log p = 0 at V = 151936)
        return C.check_all(ids_check(o[0]),
                           C.check_close(o[1:], (lp, lq), BASE_RTOL, BASE_LP_ATOL, "logprobs"))

    base_txt = f"ids equal; rtol {BASE_RTOL:g} + {BASE_LP_ATOL:g}"
    methods = {
        "torch eager": (lambda: tb_topk_logprobs(z, w, k, tok), check_base, base_txt),
        "trmath": (lambda: trmath.topk_logprobs(z, w, k, tok), check_trmath,
                   f"ids equal; rtol {TRMATH_RTOL:g}"),
    }
    cf = s.compiled(lambda a, b, t: tb_topk_logprobs(a, b, k, t), "topk_logprobs")
    if cf is not None:
        methods["torch compiled"] = (lambda: cf(z, w, tok), check_base, base_txt)
    with torch.no_grad():
        s.compare("topk_logprobs", "fwd", f"[{n}, {v}] k={k}+1", methods, baseline="torch eager",
                  memory=True, note=f"inputs {2 * z.numel() * z.element_size() / 2**20:.1f} MiB")


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--suites", NAME, *sys.argv[1:]]))
