#!/usr/bin/env python
"""Benchmark suite ``projections``: TV and KL trust-region projections, full and sparse.

* ``trmath.project_kl`` on the full vocabulary against ``trmath.kl`` forward on the same rows
  (the bar: ``project_kl <= 8 x kl``) and against the projection a trainer writes in torch
  (bisection on the interpolation weight, one ``log_softmax`` over ``[N, V]`` per step);
* the sparse variant at ``K = 64``: ``trmath.project_kl_sparse`` on the output of
  ``trmath.sparse_support`` (the bar: ``>= 100 x`` faster than the full projection; the
  projection alone carries the bar, support + projection is shown beside it);
* ``trmath.project_tv`` against the textbook mixture ``log((1 - lam) p_old + lam p_new)``.

References: float64 on the same inputs -- the TV mixture, and for KL an independent bisection
in float64 (60 halvings of the weight ``t = eta / (1 + eta)``: ``t`` to ``1e-18``); the check
also verifies the constraint ``KL = epsilon`` to ``1e-6`` relative (TARGETS.md) and ``eta``.
If the projections API is missing or raises NotImplementedError, the suite is skipped with the
reason (any other error fails the run).
Run through ``run.py`` (``--suites projections``) or
``python benchmarks/bench_projections.py [--quick] [--tiny] [--out DIR]``.
"""

from __future__ import annotations

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

NAME = "projections"
K_SPARSE = 64
EPS_KL, DELTA_TV = 0.01, 0.05
SHAPES = {  # mode -> (N, V) of the full-vocabulary rows
    "tiny": (4, 1024),
    "quick": (8, 32768),
    "full": (64, 151936),
}
NEEDED = ("project_kl", "project_tv", "project_kl_sparse", "sparse_support")
# Tolerances against float64 on the same inputs:
#  * trmath log-probabilities: |err| <= 1e-5 |ref| + 1e-6 (float32 output rounding is 2^-24
#    relative; the root's float64 error, |KL/eps - 1| <= 1e-12, moves log q by far less);
#    constraint |KL(q_ref || old) / eps - 1| <= 1e-6 where the ball is active (TARGETS.md, the
#    reference being exact to ~1e-15); eta within 1e-6 relative of the float64 bisection root.
#  * torch baselines: 1e-2 |ref| + 1e-3 (float32 softmax / log of a float32 mixture).
LP_RTOL, LP_ATOL, ETA_RTOL = 1e-5, 1e-6, 1e-6
BASE_RTOL, BASE_ATOL = 1e-2, 1e-3
TRMATH_KL_TOL = f"log q {LP_RTOL:g}|ref| + {LP_ATOL:g}; KL = eps 1e-6; eta {ETA_RTOL:g}"
BISECT_STEPS_F64, BISECT_STEPS_TORCH = 60, 30


# ---------------------------------------------------------------------------------------------
# KL projection by bisection (the torch baseline in float32; the reference in float64)
# ---------------------------------------------------------------------------------------------
def _kl_rows(lq: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """KL(q || old) per row, with 0 log 0 = 0 (entries where q = 0 are dropped)."""
    return torch.where(torch.isneginf(lq), torch.zeros_like(lq), lq.exp() * (lq - lo)).sum(-1)


def bisect_project_kl(lpn: torch.Tensor, lpo: torch.Tensor, eps: float, steps: int):
    """``log q_t = log_softmax((1 - t) log p_new + t log p_old)`` with ``KL(q_t || old) = eps``,
    ``t`` by bisection (KL(q_t || old) decreases from KL(new || old) at ``t = 0`` to 0 at ``t = 1``);
    rows already inside the ball keep ``t = 0``. Works in the inputs' dtype; ``-inf`` entries
    (probability 0 in both) stay ``-inf``. Returns ``(log q, eta = t / (1 - t))``."""
    ninf = torch.isneginf(lpn) & torch.isneginf(lpo)

    def q_of(t):
        x = (1 - t).unsqueeze(-1) * lpn + t.unsqueeze(-1) * lpo
        return F.log_softmax(torch.where(ninf, torch.full_like(x, -torch.inf), x), -1)

    shape = lpn.shape[:-1]
    active = _kl_rows(lpn, lpo) > eps
    lo_t = torch.zeros(shape, dtype=lpn.dtype)
    hi_t = torch.ones(shape, dtype=lpn.dtype)
    for _ in range(steps):
        mid = 0.5 * (lo_t + hi_t)
        big = _kl_rows(q_of(mid), lpo) > eps
        lo_t = torch.where(big, mid, lo_t)
        hi_t = torch.where(big, hi_t, mid)
    t = torch.where(active, 0.5 * (lo_t + hi_t), torch.zeros_like(lo_t))
    return q_of(t), t / (1 - t)


def torch_project_kl(z, w, eps):
    """What a trainer writes: float32 log_softmax and a 30-step bisection over [N, V]."""
    return bisect_project_kl(F.log_softmax(z, -1), F.log_softmax(w, -1), eps, BISECT_STEPS_TORCH)[0]


def torch_project_tv(z, w, delta):
    p, q = F.softmax(z, -1), F.softmax(w, -1)
    tv = 0.5 * (p - q).abs().sum(-1, keepdim=True)
    lam = (delta / tv).clamp(max=1.0)
    return torch.log((1 - lam) * q + lam * p)


def ref_project_tv(z, w, delta):
    return torch_project_tv(z.double(), w.double(), delta)


def inputs(n: int, v: int, seed: int):
    """New logits (spread 3) and an anchor 0.3 away per logit (KL ~ 0.04, TV ~ 0.1: both balls
    active on every row); a sampled token per row for the sparse support."""
    g = torch.Generator().manual_seed(seed + 43 + v)
    z = torch.randn(n, v, generator=g).mul_(3.0)
    w = z + 0.3 * torch.randn(n, v, generator=g)
    tok = torch.randint(0, v, (n,), generator=g)
    return z, w, tok


# ---------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------
def kl_projection_check(out, ref_lq, ref_eta, lpo64, eps, rtol, atol, eta_rtol=None,
                        kl_rtol=1e-6) -> C.Check:
    """Output against the float64 projection (``rtol``, ``atol``); the constraint of the output
    itself (its KL to the anchor, in float64, equals eps to ``kl_rtol`` on active rows, <= eps
    elsewhere); eta against the float64 root (``eta_rtol``) where the method returns it."""
    lq = out[0] if isinstance(out, tuple) else out
    checks = [C.check_close(lq, ref_lq, rtol, atol, "log q")]
    active = ref_eta > 0
    kl = _kl_rows(lq.detach().double(), lpo64)
    # KL of the returned rows: = eps where the ball is active, <= eps elsewhere; to kl_rtol eps
    # (TARGETS.md: 1e-6) plus the float32 rounding of log q, which moves the KL by about
    # 2^-24 max|log q| sqrt(2 eps) (the module's error note)
    bound = kl_rtol * eps + 2.0**-24 * float(lq.detach().abs().amax()) * (2 * eps) ** 0.5
    viol = torch.where(active, (kl - eps).abs(), (kl - eps).clamp_min(0.0))
    checks.append(C.check_close(viol, torch.zeros_like(viol), 0.0, bound, "|KL(out || old) - eps|"))
    if eta_rtol is not None and isinstance(out, tuple):
        checks.append(C.check_close(out[1], ref_eta, eta_rtol, 1e-30, "eta"))
    return C.check_all(*checks)


# ---------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------
def run(s: C.Suite) -> None:
    missing = [n for n in NEEDED if not callable(getattr(trmath, n, None))]
    if missing:
        s.skip(f"trmath has no {', '.join(missing)}: the projections API is not available")
        return
    n, v = SHAPES[s.cfg.mode]
    z, w, tok = inputs(n, v, s.cfg.seed)
    try:  # an API still declared but not implemented skips the suite, with the reason; any
        # other error is a failure of the run (s.guard)
        trmath.project_kl(z[:1, :64], w[:1, :64], EPS_KL)
        trmath.project_tv(z[:1, :64], w[:1, :64], DELTA_TV)
        trmath.project_kl_sparse(*trmath.sparse_support(z[:1], w[:1], 2, tok[:1])[1:], EPS_KL)
    except NotImplementedError as e:
        s.skip(f"the projections API is not implemented yet ({e}); suite not run")
        return
    s.guard("project_kl full", lambda: _kl_full_case(s, z, w))
    s.guard("project_kl sparse", lambda: _kl_sparse_case(s, z, w, tok))
    s.guard("project_tv", lambda: _tv_case(s, z, w))


def _kl_full_case(s: C.Suite, z, w) -> None:
    n, v = z.shape
    lpn64, lpo64 = F.log_softmax(z.double(), -1), F.log_softmax(w.double(), -1)
    ref_lq, ref_eta = bisect_project_kl(lpn64, lpo64, EPS_KL, BISECT_STEPS_F64)
    kl_ref = _kl_rows(lpn64, lpo64)  # KL(new || old), the forward the bar compares with
    del lpn64
    if not bool((ref_eta > 0).any()):
        s.problem("project_kl: no row is outside the ball; the projection is not exercised")
    methods = {
        "trmath kl (forward)": (lambda: trmath.kl(z, w),
                                lambda o: C.check_close(o, kl_ref, 1e-5, 1e-30, "kl"), "rtol 1e-05"),
        "trmath project_kl": (lambda: trmath.project_kl(z, w, EPS_KL, return_eta=True),
                              lambda o: kl_projection_check(o, ref_lq, ref_eta, lpo64, EPS_KL,
                                                            LP_RTOL, LP_ATOL, ETA_RTOL),
                              TRMATH_KL_TOL),
        "torch bisection": (lambda: torch_project_kl(z, w, EPS_KL),
                            lambda o: kl_projection_check(o, ref_lq, ref_eta, lpo64, EPS_KL,
                                                          BASE_RTOL, BASE_ATOL, kl_rtol=BASE_RTOL),
                            f"log q {BASE_RTOL:g}|ref| + {BASE_ATOL:g}; KL = eps {BASE_RTOL:g}"),
    }
    cf = s.compiled(torch_project_kl, "project_kl")
    if cf is not None:
        methods["torch bisection compiled"] = (lambda: cf(z, w, EPS_KL), methods["torch bisection"][1],
                                               methods["torch bisection"][2])
    with torch.no_grad():
        t = s.compare("project_kl", "fwd", f"[{n}, {v}] eps={EPS_KL:g}", methods,
                      baseline="torch bisection", memory=True,
                      note=f"{int((ref_eta > 0).sum())} of {n} rows outside the ball")
    s.bar("project_kl", "project_kl / kl forward", t, "trmath project_kl", "trmath kl (forward)",
          "<= 8", lambda r: r <= 8.0)


def _kl_sparse_case(s: C.Suite, z, w, tok) -> None:
    n, v = z.shape
    k = min(K_SPARSE, v)
    # the support: top-k of each policy and the token, each id once (float64 reference)
    z64, w64 = z.double(), w.double()
    idx, lpn, lpo = trmath.sparse_support(z, w, k, tok)
    want = [set(torch.topk(z64[i], k).indices.tolist()) | set(torch.topk(w64[i], k).indices.tolist())
            | {int(tok[i])} for i in range(n)]
    lpn64 = F.log_softmax(z64, -1).gather(-1, idx)
    lpo64 = F.log_softmax(w64, -1).gather(-1, idx)
    dup = torch.isneginf(lpn) & torch.isneginf(lpo)
    ninf = torch.tensor(-torch.inf, dtype=torch.float64)
    support_check = C.check_all(
        C.Check(all(set(idx[i][~dup[i]].tolist()) == want[i] and int((~dup[i]).sum()) == len(want[i])
                    for i in range(n)), 0.0, "support = top-k(new) | top-k(old) | {token}, each once"),
        C.check_close((lpn, lpo), (torch.where(dup, ninf, lpn64), torch.where(dup, ninf, lpo64)),
                      LP_RTOL, 1e-30, "support log-probs"))
    if not support_check.ok:
        s.fail(f"sparse_support disagrees with float64: {support_check.where}")
        return
    del z64, w64

    # the sparse problem: S kept tokens + a tail bucket, on the exact float32 values returned
    def with_tail(lp):
        lp = lp.double()
        return torch.cat([lp, torch.log(-torch.expm1(torch.logsumexp(lp, -1, keepdim=True)))], -1)

    sn, so = with_tail(lpn), with_tail(lpo)
    ref_lq, ref_eta = bisect_project_kl(sn, so, EPS_KL, BISECT_STEPS_F64)
    lpn_d, lpo_d = lpn.detach(), lpo.detach()

    def full_check(o) -> C.Check:  # its values are checked in the project_kl case
        ok = o.shape == z.shape and bool(torch.isfinite(o).all())
        return C.Check(ok, 0.0, "full projection: shape and finiteness")

    def sparse_check(o) -> C.Check:
        return kl_projection_check(o, ref_lq, ref_eta, so, EPS_KL, LP_RTOL, LP_ATOL, ETA_RTOL)

    methods = {
        "trmath project_kl (full)": (lambda: trmath.project_kl(z, w, EPS_KL), full_check,
                                     "shape; finite"),
        "trmath project_kl_sparse": (
            lambda: trmath.project_kl_sparse(lpn_d, lpo_d, EPS_KL, return_eta=True),
            sparse_check, TRMATH_KL_TOL),
        "trmath sparse_support + project_kl_sparse": (
            lambda: trmath.project_kl_sparse(*trmath.sparse_support(z, w, k, tok)[1:], EPS_KL,
                                             return_eta=True),
            sparse_check, TRMATH_KL_TOL),
    }
    with torch.no_grad():
        t = s.compare("project_kl sparse", "fwd", f"[{n}, {v}] K={k} (S={lpn.shape[-1]})", methods,
                      baseline="trmath project_kl (full)",
                      note="the constraint holds on the S tokens + tail, not on the full vocabulary")
    s.bar("project_kl sparse", "full / sparse projection", t, "trmath project_kl (full)",
          "trmath project_kl_sparse", ">= 100", lambda r: r >= 100.0)
    s.bar("project_kl sparse", "full / (sparse_support + sparse projection)", t,
          "trmath project_kl (full)", "trmath sparse_support + project_kl_sparse")


def _tv_case(s: C.Suite, z, w) -> None:
    n, v = z.shape
    ref = ref_project_tv(z, w, DELTA_TV)
    methods = {
        "torch mixture": (lambda: torch_project_tv(z, w, DELTA_TV),
                          lambda o: C.check_close(o, ref, BASE_RTOL, BASE_ATOL, "log q"),
                          f"rtol {BASE_RTOL:g} + {BASE_ATOL:g}"),
        "trmath project_tv": (lambda: trmath.project_tv(z, w, DELTA_TV),
                              lambda o: C.check_close(o, ref, LP_RTOL, LP_ATOL, "log q"),
                              f"rtol {LP_RTOL:g} + {LP_ATOL:g}"),
    }
    cf = s.compiled(torch_project_tv, "project_tv")
    if cf is not None:
        methods["torch mixture compiled"] = (lambda: cf(z, w, DELTA_TV), methods["torch mixture"][1],
                                             methods["torch mixture"][2])
    with torch.no_grad():
        s.compare("project_tv", "fwd", f"[{n}, {v}] delta={DELTA_TV:g}", methods,
                  baseline="torch mixture", memory=True)


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--suites", NAME, *sys.argv[1:]]))
