#!/usr/bin/env python
"""Benchmark suite ``estimators``: sampled KL estimators and the Rao--Blackwellized sequence KL.

* ``trmath.k1`` / ``k2`` / ``k3`` (forward; ``k3`` also forward+backward) and
  ``trmath.kl_estimate("k3_is", ..., behaviour_logprob=...)`` on ``[N]`` sampled-token
  log-probabilities against the torch one-liners (``s - o``, ``0.5 * (o - s) ** 2``,
  ``exp(l) - 1 - l``, ``exp(s - b) * (exp(l) - 1 - l)``), eager and (full mode) compiled;
* ``trmath.rb_kl`` on ``[B, T, V]`` logits with a response mask against a torch reference
  (``log_softmax`` per position, masked sum, the score-function surrogate with a reversed
  cumulative sum), forward (the per-sequence KL) and forward+backward (gradient of the surrogate
  with respect to both logits).

Every result is first checked against float64 (for ``k3``: a Taylor series below
``|l| = 1e-3`` so that the reference does not cancel). Run through ``run.py`` (``--suites
estimators``) or ``python benchmarks/bench_estimators.py [--quick] [--tiny] [--out DIR]``.
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

NAME = "estimators"
SHAPES = {  # mode -> N tokens for k1/k2/k3, (B, T, V) for rb_kl
    "tiny": (4096, (2, 4, 1024)),
    "quick": (200_000, (2, 8, 32768)),
    "full": (4_000_000, (4, 32, 151936)),
}
# Tolerances, relative to float64 on the same inputs:
#  * trmath token estimators: 1e-6 (the documented accuracy is a few float32 ulps, 2^-24 = 6e-8
#    each; the float64 references are good to ~1e-15 relative);
#  * trmath rb_kl values: 1e-5 (trmath.kl's bound per position; the masked sum of positive
#    terms keeps it); gradients: 1e-4 |g| + 1e-6 max|g| (float32 gradients whose smallest
#    entries are rounding of a difference, as in bench_exact.py);
#  * torch baselines: 1e-2 |ref| + 1e-3 mean|ref| (values) or 1e-3 max|g| (gradients): float32
#    cancellation makes their error absolute; the gate confirms the same quantity is computed.
TRMATH_RTOL = 1e-6
RB_RTOL, GRAD_RTOL, GRAD_ATOL_MAX = 1e-5, 1e-4, 1e-6
BASE_RTOL, BASE_ATOL_MEAN, BASE_GRAD_ATOL_MAX = 1e-2, 1e-3, 1e-3


# ---------------------------------------------------------------------------------------------
# torch one-liners (baselines) and float64 references
# ---------------------------------------------------------------------------------------------
def tb_k1(s, o):
    return s - o


def tb_k2(s, o):
    return 0.5 * (o - s) ** 2


def tb_k3(s, o):
    lr = o - s
    return lr.exp() - 1 - lr


def tb_k3_is(s, o, b):
    lr = o - s
    return (s - b).exp() * (lr.exp() - 1 - lr)


def _g64(lr: torch.Tensor) -> torch.Tensor:
    """``expm1(l) - l`` in float64 without cancellation (:func:`_common.expm1mx`)."""
    return C.expm1mx(lr)


def ref_k(name: str, s, o, b=None):
    s, o = s.double(), o.double()
    lr = o - s  # exact: the difference of two float32 values fits float64
    if name == "k1":
        return -lr
    if name == "k2":
        return 0.5 * lr * lr
    if name == "k3":
        return _g64(lr)
    return (s - b.double()).exp() * _g64(lr)  # k3_is


def token_inputs(n: int, seed: int):
    """log pi(a) of sampled tokens (p = sigmoid(x) from ~1e-6 to 1 - 1e-6), a reference policy
    0.1 away and a behaviour policy 0.05 away in logit space."""
    g = torch.Generator().manual_seed(seed + 23)
    x = torch.randn(n, generator=g).mul_(3.0).add_(1.0)
    s = F.logsigmoid(x)
    o = F.logsigmoid(x + 0.1 * torch.randn(n, generator=g))
    b = F.logsigmoid(x + 0.05 * torch.randn(n, generator=g))
    return s, o, b


def tb_rb_kl(z, w, tok, mask):
    """What a trainer writes: per-position KL from log_softmax, masked by multiplication, and the
    surrogate kl + sum_n log p(y_n) sg(sum_{m>n} KL_m) - sg(same) (value = kl). In the inputs'
    dtype: float64 inputs give the reference."""
    lp, lq = F.log_softmax(z, -1), F.log_softmax(w, -1)
    m = mask.to(lp.dtype)
    kl_pos = (lp.exp() * (lp - lq)).sum(-1) * m
    lp_tok = lp.gather(-1, tok.clamp_min(0).unsqueeze(-1)).squeeze(-1) * m
    future = kl_pos.flip(-1).cumsum(-1).flip(-1) - kl_pos
    kl = kl_pos.sum(-1)
    sf = (lp_tok * future.detach()).sum(-1)
    return kl, kl + sf - sf.detach()


def rb_inputs(B: int, T: int, V: int, seed: int):
    g = torch.Generator().manual_seed(seed + 29 + V)
    z = torch.randn(B, T, V, generator=g).mul_(3.0)
    w = z + 0.3 * torch.randn(B, T, V, generator=g)
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, T - max(1, T // 4):] = False  # a shorter first response: padding at the end
    tok[~mask] = -100
    return z, w, tok, mask


# ---------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------
def _base_tol(ref):
    atol = BASE_ATOL_MEAN * float(ref.abs().mean())
    return BASE_RTOL, atol, f"rtol {BASE_RTOL:g} + {BASE_ATOL_MEAN:g} mean|ref|"


def _token_case(s: C.Suite, name: str, n: int, args, tb, tm, ref) -> None:
    rt, at, ttxt = _base_tol(ref)
    tol = f"rtol {TRMATH_RTOL:g}"
    methods = {
        "torch eager": (lambda: tb(*args), lambda o: C.check_close(o, ref, rt, at), ttxt),
        "trmath": (lambda: tm(*args), lambda o: C.check_close(o, ref, TRMATH_RTOL, 1e-30), tol),
        "trmath validate=False": (lambda: tm(*args, validate=False),
                                  lambda o: C.check_close(o, ref, TRMATH_RTOL, 1e-30), tol),
    }
    cf = s.compiled(tb, name)
    if cf is not None:
        methods["torch compiled"] = (lambda: cf(*args), lambda o: C.check_close(o, ref, rt, at), ttxt)
    with torch.no_grad():
        s.compare(name, "fwd", f"[{n}]", methods, baseline="torch eager")


def _k3_backward_case(s: C.Suite, n: int, sp, o) -> None:
    # d k3 / d s = -expm1(o - s): float64 reference
    ref = -torch.expm1(o.double() - sp.double())
    rt, at = BASE_RTOL, BASE_ATOL_MEAN * float(ref.abs().mean())
    leaf = sp.detach().clone().requires_grad_()

    def fb(f):
        return lambda: torch.autograd.grad(f(leaf, o).sum(), leaf)[0]

    methods = {
        "torch eager": (fb(tb_k3), lambda g: C.check_close(g, ref, rt, at),
                        f"rtol {rt:g} + {BASE_ATOL_MEAN:g} mean|ref|"),
        "trmath": (fb(trmath.k3), lambda g: C.check_close(g, ref, TRMATH_RTOL, 1e-30),
                   f"rtol {TRMATH_RTOL:g}"),
    }
    cf = s.compiled(tb_k3, "k3 bwd")
    if cf is not None:
        methods["torch compiled"] = (fb(cf), lambda g: C.check_close(g, ref, rt, at),
                                     f"rtol {rt:g} + {BASE_ATOL_MEAN:g} mean|ref|")
    s.compare("k3", "fwd+bwd", f"[{n}]", methods, baseline="torch eager",
              note="gradient with respect to sampler_logprob")


def _rb_case(s: C.Suite, B: int, T: int, V: int) -> None:
    z, w, tok, mask = rb_inputs(B, T, V, s.cfg.seed)
    shape = f"[{B}, {T}, {V}]"
    # float64 references: the same formulas on the exact values, autograd for the gradients
    z64 = z.double().requires_grad_()
    w64 = w.double().requires_grad_()
    kl64, loss64 = tb_rb_kl(z64, w64, tok, mask)
    gz64, gw64 = torch.autograd.grad(loss64.sum(), (z64, w64))
    kl64 = kl64.detach()
    del z64, w64, loss64
    mean_kl = float(kl64.abs().mean())
    gmax = max(float(gz64.abs().max()), float(gw64.abs().max()))

    def trm():
        r = trmath.rb_kl(z, w, tok, mask)
        return r.kl, r.loss

    def vcheck(rtol, atol):  # the per-sequence KL and the surrogate's value (equal to it)
        return lambda o: C.check_all(C.check_close(o[0], kl64, rtol, atol, "kl"),
                                     C.check_close(o[1], kl64, rtol, atol, "loss"))

    methods = {
        "torch eager": (lambda: tb_rb_kl(z, w, tok, mask),
                        vcheck(BASE_RTOL, BASE_ATOL_MEAN * mean_kl),
                        f"rtol {BASE_RTOL:g} + {BASE_ATOL_MEAN:g} mean|ref|"),
        "trmath": (trm, vcheck(RB_RTOL, 1e-30), f"rtol {RB_RTOL:g}"),
    }
    cf = s.compiled(tb_rb_kl, "rb_kl")
    if cf is not None:
        methods["torch compiled"] = (lambda: cf(z, w, tok, mask), methods["torch eager"][1],
                                     methods["torch eager"][2])
    with torch.no_grad():
        s.compare("rb_kl", "fwd", shape, methods, baseline="torch eager", memory=True)

    zr, wr = z.clone().requires_grad_(), w.clone().requires_grad_()

    def fb(f):
        def call():
            loss = f(zr, wr, tok, mask)[1]
            return torch.autograd.grad(loss.sum(), (zr, wr))

        return call

    def gcheck(rtol, atol):
        return lambda g: C.check_close(g, (gz64, gw64), rtol, atol, "grad")

    bmethods = {
        "torch eager": (fb(tb_rb_kl), gcheck(BASE_RTOL, BASE_GRAD_ATOL_MAX * gmax),
                        f"rtol {BASE_RTOL:g} + {BASE_GRAD_ATOL_MAX:g} max|g|"),
        "trmath": (fb(lambda a, b, t, m: trmath.rb_kl(a, b, t, m)),
                   gcheck(GRAD_RTOL, GRAD_ATOL_MAX * gmax),
                   f"rtol {GRAD_RTOL:g} + {GRAD_ATOL_MAX:g} max|g|"),
    }
    if cf is not None:
        bmethods["torch compiled"] = (fb(cf), bmethods["torch eager"][1], bmethods["torch eager"][2])
    s.compare("rb_kl", "fwd+bwd", shape, bmethods, baseline="torch eager", memory=True,
              note="gradient of loss.sum() wrt both logits")


def run(s: C.Suite) -> None:
    n, (B, T, V) = SHAPES[s.cfg.mode]
    sp, o, b = token_inputs(n, s.cfg.seed)
    for name, tb, tm in (("k1", tb_k1, trmath.k1), ("k2", tb_k2, trmath.k2), ("k3", tb_k3, trmath.k3)):
        s.guard(name, lambda: _token_case(s, name, n, (sp, o), tb, tm, ref_k(name, sp, o)))
    s.guard("k3 backward", lambda: _k3_backward_case(s, n, sp, o))

    def k3_is(a, c, beh, validate=True):
        return trmath.kl_estimate("k3_is", a, c, behaviour_logprob=beh, validate=validate)

    s.guard("kl_estimate k3_is", lambda: _token_case(s, "kl_estimate(k3_is)", n, (sp, o, b),
                                                     tb_k3_is, k3_is, ref_k("k3_is", sp, o, b)))
    del sp, o, b
    s.guard("rb_kl", lambda: _rb_case(s, B, T, V))


if __name__ == "__main__":
    from run import main

    sys.exit(main(["--suites", NAME, *sys.argv[1:]]))
