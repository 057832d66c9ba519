"""Trust-region projections (SPEC.md section 4.2): KL ball (TROLL), TV ball, sparse variant.

Accuracy is checked against the mpmath oracles of :mod:`trmath.testing.oracles_projection` on the
exact values the inputs represent: the multiplier eta within 1e-6 relative of the 50-digit root,
the constraint KL(pi~_eta || pi_old) = eps met to 1e-6 relative at the returned eta (TARGETS.md).
Both backends (C++ on CPU, pure torch) are run through every property.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import trmath
from trmath import _project_torch as pt
from trmath import projections as P
from trmath.testing import mp_kl, mp_project_kl, mp_project_tv, mp_projection_kl_at, row_pairs

INF = math.inf
BACKENDS = ("cpp", "torch")
ETA_RTOL = 1e-6  # TARGETS.md: eta within 1e-6 relative of the mpmath root
KL_RTOL = 1e-6  # TARGETS.md: constraint met to 1e-6 relative


@pytest.fixture(params=BACKENDS)
def backend(request):
    old = P._FORCE_TORCH[0]
    P._FORCE_TORCH[0] = request.param == "torch"
    try:
        yield request.param
    finally:
        P._FORCE_TORCH[0] = old


def _rows(kind: str, V: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    z = g.normal(size=V) * 2.0
    if kind == "random":
        w = g.normal(size=V) * 2.0
    elif kind == "near":  # KL(pi_new || pi_old) ~ 1e-6
        w = z + 1e-3 * g.normal(size=V)
    elif kind == "peaked":  # logit spread ~ 60
        z = g.normal(size=V) * 20.0
        w = z + 4.0 * g.normal(size=V)
    elif kind == "masked":  # common mask, plus a token only pi_old has
        w = g.normal(size=V) * 2.0
        z[:3] = -INF
        w[:2] = -INF
    elif kind == "old_zero":  # pi_old = 0 where pi_new > 0: KL(pi_new||pi_old) = +inf
        w = g.normal(size=V) * 2.0
        w[4] = -INF
    else:  # pragma: no cover
        raise ValueError(kind)
    return z, w


CASES = [
    ("random", 0.05, 1.0),
    ("random", 0.3, 0.7),
    ("random", 1e-6, 1.0),
    ("near", 1e-8, 1.0),
    ("peaked", 1e-4, 1.0),
    ("masked", 0.05, 1.3),
    ("old_zero", 0.05, 1.0),
]


# ------------------------------------------------------------------------------------------------
# accuracy against mpmath
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
@pytest.mark.parametrize("kind,eps,T", CASES)
def test_kl_multiplier_and_constraint_against_mpmath(backend, kind, eps, T, dtype):
    worst_eta = worst_kl = worst_lp = 0.0
    for seed in range(2):
        z, w = _rows(kind, 24, seed)
        zt, wt = torch.tensor(z).to(dtype), torch.tensor(w).to(dtype)
        lp, eta = trmath.project_kl(zt.unsqueeze(0), wt.unsqueeze(0), eps, temperature=T, return_eta=True)
        eta_ref, lp_ref = mp_project_kl(zt, wt, eps, T)
        assert eta_ref > 0, "every case here is active"
        worst_eta = max(worst_eta, abs(float(eta[0]) / float(eta_ref) - 1.0))
        # Feasibility and tightness at the returned multiplier, evaluated exactly.
        kl_at, _ = mp_projection_kl_at(zt, wt, float(eta[0]), T)
        worst_kl = max(worst_kl, abs(float(kl_at) / eps - 1.0))
        fin = np.isfinite(lp_ref)
        out = lp[0].double().numpy()
        assert np.array_equal(np.isfinite(out), fin), "support of pi~ = common support"
        worst_lp = max(worst_lp, float(np.max(np.abs(out[fin] - lp_ref[fin]) / np.maximum(1.0, np.abs(lp_ref[fin])))))
    assert worst_eta <= ETA_RTOL, f"eta relative error {worst_eta:.3g}"
    assert worst_kl <= KL_RTOL, f"|KL/eps - 1| = {worst_kl:.3g}"
    # Output log-probs: float64 -- the eta error (<= 1e-12 relative) times |d log pi~/d eta| and
    # a few ulps of |log pi~|; float32 outputs -- one rounding to float32 (2^-24 relative) plus
    # that. Peaked rows (|log pi~| up to ~100) are covered by the relative scale.
    tol = 1e-9 if dtype == torch.float64 else 2.0 ** -23
    assert worst_lp <= tol, f"log pi~ error {worst_lp:.3g}"


def test_kl_output_rows_meet_the_constraint_in_float64(backend):
    z = torch.randn(16, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    w = torch.randn(16, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    for eps in (1e-4, 0.05, 0.5):
        lp = trmath.project_kl(z, w, eps)
        kl = trmath.kl(lp, w)  # exact float64 reduction of the returned rows
        assert torch.all(torch.abs(kl / eps - 1.0) <= KL_RTOL), (kl / eps - 1).abs().max()
        assert torch.allclose(lp.exp().sum(-1), torch.ones(16, dtype=torch.float64), atol=1e-13, rtol=0)


def test_kl_identity_when_inside(backend):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 50, dtype=torch.float64, generator=g)
    w = z + 0.1 * torch.randn(8, 50, dtype=torch.float64, generator=g)
    k1 = trmath.kl(z, w)
    for eps in (float(k1.max()) * (1 + 1e-9), 10.0):
        lp, eta = trmath.project_kl(z, w, eps, return_eta=True)
        assert torch.all(eta == 0)
        torch.testing.assert_close(lp, torch.log_softmax(z, -1), rtol=0, atol=1e-14)
    for dtype in (torch.float32, torch.bfloat16):
        zz, ww = z.to(dtype), w.to(dtype)
        lp, eta = trmath.project_kl(zz, ww, 10.0, return_eta=True)
        assert lp.dtype == torch.float32 and torch.all(eta == 0)
        # float32 output of log_softmax: the rounding of lse (a few ulps of |lse|) plus one
        # rounding of the result.
        torch.testing.assert_close(lp.double(), torch.log_softmax(zz.double(), -1), rtol=2e-7, atol=1e-6)


def test_kl_limits(backend):
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 40, dtype=torch.float64, generator=g) * 2
    w = torch.randn(4, 40, dtype=torch.float64, generator=g) * 2
    k1 = trmath.kl(z, w)
    a, b = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    # eps -> KL(pi_new || pi_old) from below: eta -> 0 and pi~ -> pi_new, continuously.
    lp, eta = trmath.project_kl(z[:1], w[:1], float(k1[0]) * (1 - 1e-7), return_eta=True)
    assert 0 < float(eta[0]) < 1e-5
    assert float((lp - a[:1]).abs().max()) < 1e-5
    # eps -> 0: eta -> inf and pi~ -> pi_old, with ||log pi~ - log pi_old|| = O(sqrt(eps)).
    prev = None
    for eps in (1e-4, 1e-8, 1e-12):
        lp, eta = trmath.project_kl(z, w, eps, return_eta=True)
        dev = float((lp - b).abs().max())
        assert dev < 50 * math.sqrt(eps)
        if prev is not None:
            assert torch.all(eta > prev)
        prev = eta


def test_kl_log_offset_is_constant(backend):
    """log pi~ - (log pi_new + eta log pi_old) / (1 + eta) is the same on every supported token."""
    z, w = (torch.tensor(x).unsqueeze(0) for x in _rows("masked", 64, 5))
    lp, eta = trmath.project_kl(z, w, 0.02, return_eta=True)
    a, b = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    e = float(eta[0])
    off = (lp - (a + e * b) / (1 + e))[torch.isfinite(lp)]
    assert float(off.max() - off.min()) < 1e-13 * (1 + float(off.abs().max()))


# ------------------------------------------------------------------------------------------------
# optimality
# ------------------------------------------------------------------------------------------------
def _kl_rows(p_lp: torch.Tensor, q_lp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of log-prob rows, float64, 0 log 0 = 0 (q may be 0 only where p is)."""
    p = p_lp.exp()
    return torch.where(p > 0, p * (p_lp - q_lp), torch.zeros_like(p)).sum(-1)


def _feasible_competitors(b: torch.Tensor, eps: float, n: int, seed: int) -> torch.Tensor:
    """Random distributions in the ball KL(q || pi_old) <= eps (log-probs, [n, V])."""
    g = torch.Generator().manual_seed(seed)
    V = b.shape[-1]
    out = []
    while len(out) < n:
        r = torch.log_softmax(torch.randn(V, dtype=torch.float64, generator=g) * 3, -1)
        # Mix a random direction into pi_old, shrinking it until it is inside the ball.
        s = float(torch.rand((), generator=g, dtype=torch.float64))
        for _ in range(60):
            q = torch.logaddexp(math.log1p(-s) + b, math.log(s) + r)
            if float(_kl_rows(q, b)) <= eps:
                out.append(q)
                break
            s *= 0.7
    return torch.stack(out)


def test_kl_optimal_against_feasible_competitors_and_pythagorean(backend):
    for seed in range(3):
        z, w = (torch.tensor(x) for x in _rows("random", 12, 10 + seed))
        eps = 0.05
        lp = trmath.project_kl(z, w, eps)
        a, b = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
        best = float(_kl_rows(lp, a))
        qs = _feasible_competitors(b, eps, 200, seed)
        obj = _kl_rows(qs, a.expand_as(qs))
        assert float(obj.min()) >= best - 1e-12
        # Pythagorean inequality of the I-projection onto a convex set:
        # KL(q || pi_new) >= KL(q || pi~) + KL(pi~ || pi_new) for every q in the ball.
        rhs = _kl_rows(qs, lp.expand_as(qs)) + best
        assert torch.all(obj >= rhs - 1e-12), float((rhs - obj).max())


def test_kl_matches_brute_force_on_the_simplex(backend):
    """V = 3: the minimum of KL(q || pi_new) over a fine grid of the ball is the projection's."""
    n = 600
    i, j = torch.meshgrid(torch.arange(1, n, dtype=torch.float64), torch.arange(1, n, dtype=torch.float64), indexing="ij")
    keep = (i + j) < n
    q = torch.stack([i[keep], j[keep], n - i[keep] - j[keep]], -1) / n
    lq = torch.log(q)
    for z, w, eps in (([2.0, 0.0, -1.0], [0.0, 0.5, 0.0], 0.05), ([0.0, 3.0, 1.0], [1.0, 0.0, 0.0], 0.2)):
        zt, wt = torch.tensor(z, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
        a, b = torch.log_softmax(zt, -1), torch.log_softmax(wt, -1)
        lp = trmath.project_kl(zt, wt, eps)
        feas = _kl_rows(lq, b.expand_as(lq)) <= eps
        obj = _kl_rows(lq[feas], a.expand(int(feas.sum()), 3))
        ours = float(_kl_rows(lp, a))
        # No grid point of the ball does better, and the grid's best is within its resolution.
        assert float(obj.min()) >= ours - 1e-12
        k = int(obj.argmin())
        assert float(obj.min()) - ours < 5e-3
        assert float((lq[feas][k] - lp).abs().max()) < 5e-2


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps,T", ((0.05, 1.0), (0.3, 0.6), (50.0, 1.0)))
def test_kl_gradcheck_float64(backend, eps, T):
    g = torch.Generator().manual_seed(6)
    z = (torch.randn(3, 9, dtype=torch.float64, generator=g) * 2).requires_grad_()
    w = (torch.randn(3, 9, dtype=torch.float64, generator=g) * 2)
    w[1, 2] = -INF  # pi_old = 0 where pi_new > 0 (row 1 is always projected)
    w.requires_grad_()
    fin = torch.isfinite(trmath.project_kl(z, w, eps, temperature=T))
    assert int((~fin).sum()) == 1  # pi~ = 0 where pi_old = 0: a constant -inf, left out
    assert torch.autograd.gradcheck(lambda z, w: trmath.project_kl(z, w, eps, temperature=T)[fin], (z, w))


def test_kl_gradcheck_masked_tokens(backend):
    z, w = (torch.tensor(x).unsqueeze(0) for x in _rows("masked", 10, 7))
    fin = torch.isfinite(z) & torch.isfinite(w)
    lp0 = trmath.project_kl(z, w, 0.5)
    assert torch.all(torch.isneginf(lp0[~fin]))

    def f(zf, wf):  # perturb only finite logits; compare only finite outputs
        zz = z.clone(); ww = w.clone()
        zz[torch.isfinite(z)] = zf; ww[torch.isfinite(w)] = wf
        return trmath.project_kl(zz, ww, 0.5)[fin]

    zf = z[torch.isfinite(z)].clone().requires_grad_()
    wf = w[torch.isfinite(w)].clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (zf, wf))


def test_negative_control_constant_eta_gives_wrong_gradients():
    """Differentiating the closed form with eta held fixed misses d eta / d logits."""
    g = torch.Generator().manual_seed(8)
    z = (torch.randn(2, 12, dtype=torch.float64, generator=g) * 2).requires_grad_()
    w = (torch.randn(2, 12, dtype=torch.float64, generator=g) * 2).requires_grad_()
    c = torch.randn(2, 12, dtype=torch.float64, generator=g)
    eps = 0.05
    lp, eta = trmath.project_kl(z, w, eps, return_eta=True)
    gz, gw = torch.autograd.grad((c * lp.exp()).sum(), (z, w))
    a, b = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    lp_c, _, _, _, _ = pt.row_stats(a, b, eta.detach())  # eta as a constant
    torch.testing.assert_close(lp_c, lp, rtol=0, atol=1e-12)  # same value ...
    gz_c, gw_c = torch.autograd.grad((c * lp_c.exp()).sum(), (z, w))
    # ... but a different gradient, and only the implicit one matches finite differences.
    assert float((gz_c - gz).abs().max()) > 1e-3 * float(gz.abs().max())
    h = 1e-6
    for k in range(3):
        dz = torch.zeros_like(z); dz[0, k] = h
        fd = (((c * trmath.project_kl(z + dz, w, eps).exp()).sum()
               - (c * trmath.project_kl(z - dz, w, eps).exp()).sum()) / (2 * h)).item()
        assert abs(fd - gz[0, k].item()) < 1e-7
    bad = [k for k in range(12) if abs(gz_c[0, k].item() - gz[0, k].item()) > 1e-5]
    assert bad, "holding eta constant should change the gradient of some logit"


# ------------------------------------------------------------------------------------------------
# C++ against torch
# ------------------------------------------------------------------------------------------------
def _both(fn):
    old = P._FORCE_TORCH[0]
    try:
        P._FORCE_TORCH[0] = False
        a = fn()
        P._FORCE_TORCH[0] = True
        b = fn()
    finally:
        P._FORCE_TORCH[0] = old
    return a, b


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16))
def test_cpp_matches_torch_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(9)
    z = (torch.randn(2, 3, 257, generator=g) * 3).to(dtype)
    w = (z.float() + torch.randn(2, 3, 257, generator=g)).to(dtype)
    w[0, 1, 7] = -INF
    z[1, 2, :5] = -INF
    w[1, 2, :4] = -INF
    z[1, 0] = w[1, 0]  # identical rows: inside
    G = torch.randn(2, 3, 257, dtype=torch.float64, generator=g)

    def run():
        zz = z.clone().requires_grad_(); ww = w.clone().requires_grad_()
        lp, eta = trmath.project_kl(zz, ww, 0.05, temperature=0.9, return_eta=True)
        (torch.where(torch.isfinite(lp), lp.double(), 0.0) * G).sum().backward()
        return lp, eta, zz.grad, ww.grad

    (lp1, e1, gz1, gw1), (lp2, e2, gz2, gw2) = _both(run)
    assert lp1.dtype == lp2.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(torch.isinf(lp1), torch.isinf(lp2))
    torch.testing.assert_close(e1, e2, rtol=1e-10, atol=0)
    fin = torch.isfinite(lp2)
    otol = 1e-12 if dtype == torch.float64 else 4e-7  # float32 output: a rounding of each
    torch.testing.assert_close(lp1[fin].double(), lp2[fin].double(), rtol=otol, atol=otol)
    gtol = 1e-9 if dtype == torch.float64 else 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6
    # Gradients are rounded to the input dtype (bf16: 2^-8 relative).
    torch.testing.assert_close(gz1.double(), gz2.double(), rtol=gtol, atol=gtol * float(gz2.abs().max()))
    torch.testing.assert_close(gw1.double(), gw2.double(), rtol=gtol, atol=gtol * float(gw2.abs().max()))


def isa_projection_results() -> dict:
    """``project_kl`` outputs, multipliers and gradients on fixed rows (odd lengths, masked
    tokens, an inside row) for ``test_instruction_sets_agree_on_the_projection``."""
    res = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for V in (257, 3001):
            g = torch.Generator().manual_seed(V)
            z = (torch.randn(3, V, generator=g) * 3).to(dtype)
            w = (z.float() + torch.randn(3, V, generator=g)).to(dtype)
            w[0, 7] = -INF
            z[1, :5] = -INF
            w[1, :4] = -INF
            z[2] = w[2]  # inside
            G = torch.randn(3, V, dtype=torch.float64, generator=g)
            zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
            lp, eta = trmath.project_kl(zz, ww, 0.05, temperature=0.9, return_eta=True)
            (torch.where(torch.isfinite(lp), lp.double(), 0.0) * G).sum().backward()
            res[(str(dtype), V)] = (lp.detach(), eta, zz.grad, ww.grad)
    return res


def test_instruction_sets_agree_on_the_projection(tmp_path):
    """The projection's passes run in 8 double lanes in the AVX-512 build and 4 elsewhere: the
    same operations per lane, summed in another grouping. Each build the CPU runs
    (``TRMATH_ISA=generic`` and ``=avx2`` cap the choice) agrees with the default at the
    tolerances of the C++ / torch parity test above."""
    import os
    import subprocess
    import sys

    from trmath import _backend

    here = _backend.isa()
    mine = isa_projection_results()
    compared = 0
    for cap in (c for c in ("generic", "avx2") if c != here):
        out = tmp_path / f"{cap}.pt"
        code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); "
                "import test_projections as t; from trmath import _backend; "
                "torch.save((_backend.isa(), t.isa_projection_results()), sys.argv[2])")
        subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(out)],
                       check=True, env=dict(os.environ, TRMATH_ISA=cap), timeout=600)
        isa, theirs = torch.load(out)
        if isa == here:  # this CPU lacks the capped set's instructions
            continue
        for key, (lp1, e1, gz1, gw1) in mine.items():
            lp2, e2, gz2, gw2 = theirs[key]
            f64 = key[0] == str(torch.float64)
            msg = f"{here} vs {isa} {key}"
            assert torch.equal(torch.isinf(lp1), torch.isinf(lp2)), msg
            torch.testing.assert_close(e1, e2, rtol=1e-10, atol=0, msg=msg)
            fin = torch.isfinite(lp2)
            otol = 1e-12 if f64 else 4e-7  # float32 output: a rounding of each
            torch.testing.assert_close(lp1[fin].double(), lp2[fin].double(), rtol=otol, atol=otol,
                                       msg=msg)
            # Gradients are rounded to the input dtype (bfloat16: 2^-8 relative).
            gtol = 1e-9 if f64 else 1e-2 if key[0] == str(torch.bfloat16) else 1e-6
            for a, b in ((gz1, gz2), (gw1, gw2)):
                torch.testing.assert_close(a.double(), b.double(), rtol=gtol,
                                           atol=gtol * float(b.abs().max()), msg=msg)
            compared += 1
    if here == "generic":
        pytest.skip("this CPU runs only the portable build")
    assert compared > 0


def test_cpp_strided_inputs_and_determinism():
    g = torch.Generator().manual_seed(10)
    base_z = torch.randn(6, 400, generator=g) * 2
    base_w = torch.randn(6, 400, generator=g) * 2
    zs, ws = base_z[:, ::2], base_w[:, ::2]  # strided vocabulary axis
    lp_s = trmath.project_kl(zs, ws, 0.03)
    lp_c = trmath.project_kl(zs.contiguous(), ws.contiguous(), 0.03)
    assert torch.equal(lp_s, lp_c)
    single = trmath.project_kl(zs[3:4].contiguous(), ws[3:4].contiguous(), 0.03)
    assert torch.equal(single[0], lp_c[3])  # independent of the batch
    n = trmath.num_threads()
    try:
        trmath.set_num_threads(1)
        assert torch.equal(trmath.project_kl(zs, ws, 0.03), lp_c)
    finally:
        trmath.set_num_threads(n)


def test_numpy_in_numpy_out():
    z, w = _rows("random", 20, 11)
    out = trmath.project_kl(z[None], w[None], 0.05)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (1, 20)
    out = trmath.project_tv(z.astype(np.float32), w.astype(np.float32), 0.1)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,arg", ((trmath.project_kl, "epsilon"), (trmath.project_tv, "delta")))
def test_bad_radius(fn, arg):
    z = torch.zeros(2, 4)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"{arg}: must be finite and > 0"):
            fn(z, z, bad)
    with pytest.raises(TypeError, match=f"{arg}: expected a number"):
        fn(z, z, "0.1")


@pytest.mark.parametrize("fn", (trmath.project_kl, trmath.project_tv))
def test_bad_rows_and_shapes(backend, fn):
    z = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"new_logits and old_logits: shapes differ"):
        fn(z, torch.zeros(2, 5), 0.1)
    bad = z.clone(); bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"new_logits: row 1 contains NaN"):
        fn(bad, z, 0.1)
    with pytest.raises(ValueError, match=r"old_logits: row 1 contains NaN"):
        fn(z, bad, 0.1)
    bad = z.clone(); bad[2] = -INF
    with pytest.raises(ValueError, match=r"old_logits: row 2 is entirely -inf"):
        fn(z, bad, 0.1)


def test_kl_infeasible_and_unvalidated_nan(backend):
    z = torch.zeros(2, 4, dtype=torch.float64)
    w = torch.zeros(2, 4, dtype=torch.float64)
    z[1, :3] = -INF  # pi_new has one token; pi_old puts 3/4 outside it: limit -log(1/4) > eps
    with pytest.raises(ValueError, match=r"old_logits: row 1 puts mass .* outside the support"):
        trmath.project_kl(z, w, 0.5)
    lp = trmath.project_kl(z, w, 2.0)  # -log(1/4) = 1.386 < 2: feasible, one token left
    assert torch.equal(lp[1], torch.tensor([-INF, -INF, -INF, 0.0], dtype=torch.float64))
    bad = z.clone(); bad[0, 0] = math.nan
    out = trmath.project_kl(bad, w, 0.5, validate=False)
    assert torch.isnan(out[0]).all() and torch.isnan(out[1]).all()


# ------------------------------------------------------------------------------------------------
# TV ball
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_tv_against_mpmath(backend, dtype):
    for kind in ("random", "masked", "peaked", "old_zero", "near"):
        z, w = _rows(kind, 30, 12)
        zt, wt = torch.tensor(z).to(dtype), torch.tensor(w).to(dtype)
        tv = float(trmath.tv(zt.double(), wt.double()))
        for delta in (0.5 * tv, 0.01, 2 * tv):
            lp, lam = trmath.project_tv(zt, wt, delta, return_lambda=True)
            lam_ref, lp_ref = mp_project_tv(zt, wt, delta)
            assert abs(float(lam) / float(lam_ref) - 1) <= 1e-12
            fin = np.isfinite(lp_ref)
            assert np.array_equal(np.isfinite(lp.double().numpy()), fin)
            err = np.max(np.abs(lp.double().numpy()[fin] - lp_ref[fin]) / np.maximum(1, np.abs(lp_ref[fin])))
            assert err <= (1e-13 if dtype == torch.float64 else 2.0 ** -24)
            if dtype == torch.float64:  # TV(pi~, pi_old) = min(delta, TV), on the returned rows
                got = float(trmath.tv(lp, wt))
                assert abs(got / min(delta, tv) - 1) <= 1e-10


def _tv_case(seed: int, R: int, V: int, dtype: torch.dtype):
    """Rows with masks of every kind, equal rows, and rows inside and outside the ball."""
    g = torch.Generator().manual_seed(seed)
    z = 2.0 * torch.randn(R, V, dtype=torch.float64, generator=g)
    spread = torch.linspace(0.0, 3.0, R, dtype=torch.float64)[:, None]
    w = z + torch.randn(R, V, dtype=torch.float64, generator=g) * spread
    z[1, :3] = -INF  # tokens only pi_old has
    w[2, 3:5] = -INF  # tokens only pi_new has
    z[3, 5:7] = -INF
    w[3, 5:7] = -INF  # masked in both
    return z.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16))
def test_tv_compiled_path_matches_torch_path(dtype):
    """The C++ log-mixture and its backward against the float64 torch formula (autograd through
    it): values, lambda and both gradients, with a loss that also uses lambda; row 0 is an equal
    pair (inside), the spread of the others grows with the row index."""
    assert P._tv_cpp_available(torch.zeros(1))  # the CPU core always has the kernels
    z0, w0 = _tv_case(5, 7, 37, dtype)
    delta, T = 0.2, 0.9
    res = {}
    for force in (False, True):
        P._FORCE_TORCH[0] = force
        try:
            z, w = z0.clone().requires_grad_(), w0.clone().requires_grad_()
            lp, lam = trmath.project_tv(z, w, delta, temperature=T, return_lambda=True)
            gout = torch.cos(torch.arange(lp.numel(), dtype=lp.dtype).reshape(lp.shape))
            loss = (torch.where(torch.isfinite(lp), lp, 0.0) * gout).sum()
            loss = loss + (lam.to(lp.dtype) ** 2).sum()
            loss.backward()
            res[force] = (lp.detach(), lam.detach(), z.grad, w.grad)
        finally:
            P._FORCE_TORCH[0] = False
    (lp, lam, dz, dw), (lp_t, lam_t, dz_t, dw_t) = res[False], res[True]
    assert 0 < int((lam < 1).sum()) < lam.numel()  # both kinds of row
    # lambda = delta / TV from the same float64 TV kernel on the same float64 values: the same bits
    assert torch.equal(lam, lam_t)
    assert torch.equal(torch.isfinite(lp), torch.isfinite(lp_t))
    assert torch.equal(lp.isneginf(), lp_t.isneginf())
    fin = torch.isfinite(lp)
    # Both round the same float64 log-mixture once (float64: a few ulps apart).
    tol = 1e-13 if dtype == torch.float64 else 2.0 ** -23
    a, b = lp[fin].double(), lp_t[fin].double()
    assert float(((a - b).abs() / b.abs().clamp_min(1)).max()) <= tol
    # Gradients: both paths round a float64 gradient once to the dtype; the two float64 values
    # differ by rounding only, so the results by at most an ulp of the element (<= 2^-8 of
    # the largest in bfloat16, 2^-23 in float32).
    gtol = {torch.float64: 1e-12, torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -7}[dtype]
    for a, b in ((dz, dz_t), (dw, dw_t)):
        scale = float(b.double().abs().max())
        assert float((a.double() - b.double()).abs().max()) <= gtol * scale


def test_tv_blocks_and_batch_shape_do_not_change_results():
    """Rows are normalised a block at a time; results are bitwise those of one block, for a
    leading batch shape and strided inputs too."""
    assert P._tv_cpp_available(torch.zeros(1))
    z, w = _tv_case(6, 9, 50, torch.float32)
    ref = trmath.project_tv(z, w, 0.1)
    old = P._TV_BLOCK
    try:
        P._TV_BLOCK = 120  # two rows per block
        assert torch.equal(trmath.project_tv(z, w, 0.1), ref)
        zs = torch.stack((z, z), -1)[..., 0]  # strided rows
        out = trmath.project_tv(zs.reshape(3, 3, 50), w.reshape(3, 3, 50), 0.1)
        assert torch.equal(out.reshape(9, 50), ref)
        zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
        trmath.project_tv(zz, ww, 0.1).exp().sum().backward()
        g1 = (zz.grad.clone(), ww.grad.clone())
    finally:
        P._TV_BLOCK = old
    zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
    trmath.project_tv(zz, ww, 0.1).exp().sum().backward()
    assert torch.equal(zz.grad, g1[0]) and torch.equal(ww.grad, g1[1])


def test_tv_unvalidated_nan_stays_nan(backend):
    z, w = _tv_case(7, 4, 16, torch.float32)
    z[2, 4] = math.nan
    out = trmath.project_tv(z, w, 0.1, validate=False)
    assert torch.isnan(out[2]).all()
    assert not torch.isnan(out[[0, 1, 3]]).any()


def test_tv_gradient_where_tv_squared_underflows(backend):
    """Both rows near a point mass on the same token: TV ~ 1e-217, so TV^2 underflows. The
    gradient through lambda = delta / TV is -lambda / TV dTV, finite (it was inf * 0 = NaN on
    the torch path); here it is checked against its closed form: with lambda = 1e-6, log pi~ is
    log q to first order, and dL/dw = g - q sum(g) up to O(lambda)."""
    z = torch.tensor([[-1.2, 0.43, 0.5, 999.5, 0.86, -1.9, -0.16, -0.38]], dtype=torch.float64)
    w = z.clone()
    w[0, 3] = 499.5
    tv = float(trmath.tv(z, w))
    assert 0 < tv < 1e-200
    zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
    lp, lam = trmath.project_tv(zz, ww, 1e-6 * tv, return_lambda=True)
    assert abs(float(lam.detach()) / 1e-6 - 1) <= 1e-12
    g = torch.cos(torch.arange(8, dtype=torch.float64))
    (lp * g).sum().backward()
    assert bool(torch.isfinite(zz.grad).all()) and bool(torch.isfinite(ww.grad).all())
    q = torch.softmax(w, -1)
    # The neglected terms are lambda times sums of |g| (<= 8) and masses <= 1: below 1e-5.
    torch.testing.assert_close(ww.grad[0], g - q[0] * g.sum(), rtol=0, atol=1e-5)
    assert float(zz.grad.abs().max()) <= 1e-5


def test_tv_invalid_rows_are_nan_with_their_lambda(backend):
    """validate=False: a row with NaN or +inf in either input, or entirely -inf, comes back NaN
    throughout with lambda NaN (the torch path returned log_softmax(z) and lambda = 1 for NaN in
    old_logits, the C++ path lambda = 1); the other rows are those of the valid rows alone."""
    z, w = _tv_case(9, 6, 16, torch.float32)
    ref, lam_ref = trmath.project_tv(z[[0, 5]], w[[0, 5]], 0.1, return_lambda=True)
    z[1, 3] = math.nan
    w[2, 7] = math.nan
    w[3, 0] = math.inf
    z[4] = -INF
    out, lam = trmath.project_tv(z, w, 0.1, validate=False, return_lambda=True)
    assert torch.isnan(out[1:5]).all() and torch.isnan(lam[1:5]).all()
    assert torch.equal(out[[0, 5]], ref) and torch.equal(lam[[0, 5]], lam_ref)
    with pytest.raises(ValueError, match="row 1"):
        trmath.project_tv(z, w, 0.1)


@pytest.mark.parametrize("op", ("kl", "tv"))
def test_invalid_rows_get_nan_gradients(backend, op):
    """validate=False: both inputs' gradients are NaN on an invalid row (NaN in one input, or a
    row entirely -inf); the other rows' gradients are those of the valid rows alone."""
    z, w = _tv_case(11, 5, 12, torch.float64)

    def grads(z, w):
        zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
        f = trmath.project_kl if op == "kl" else trmath.project_tv
        out = f(zz, ww, 0.05 if op == "kl" else 0.1, validate=False)
        torch.where(torch.isfinite(out), out, 0.0).sin().sum().backward()
        return zz.grad, ww.grad

    keep = [0, 4]
    ref = grads(z[keep], w[keep])
    z[1, 2] = math.nan
    w[2, 5] = math.nan
    z[3] = -INF
    dz, dw = grads(z, w)
    for g, r in zip((dz, dw), ref):
        assert torch.isnan(g[1:4]).all()
        assert torch.equal(g[keep], r)


def test_tv_torch_blocks_do_not_change_results():
    """The torch path (other devices) works a block of rows at a time in float64: values, lambda
    and gradients are bitwise those of one block."""
    z, w = _tv_case(10, 9, 50, torch.float32)

    def run():
        zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
        lp, lam = trmath.project_tv(zz, ww, 0.1, temperature=1.3, return_lambda=True)
        (torch.where(torch.isfinite(lp), lp, 0.0).sin().sum() + lam.sum()).backward()
        return lp.detach(), lam.detach(), zz.grad, ww.grad

    old, oldc = P._FORCE_TORCH[0], pt._CHUNK_ELEMS
    try:
        P._FORCE_TORCH[0] = True
        ref = run()
        pt._CHUNK_ELEMS = 100  # two rows per block
        got = run()
    finally:
        P._FORCE_TORCH[0], pt._CHUNK_ELEMS = old, oldc
    assert 0 < int((ref[1] < 1).sum()) < 9
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


def test_tv_masked_gradcheck(backend):
    z, w = _tv_case(8, 4, 9, torch.float64)
    z, w = z.requires_grad_(), w.requires_grad_()

    def f(z, w):
        lp, lam = trmath.project_tv(z, w, 0.15, temperature=1.1, return_lambda=True)
        return torch.where(torch.isfinite(lp), lp, 0.0), lam

    assert torch.autograd.gradcheck(f, (z, w))


def test_tv_identity_and_gradcheck(backend):
    g = torch.Generator().manual_seed(13)
    z = torch.randn(3, 8, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(3, 8, dtype=torch.float64, generator=g).requires_grad_()
    out = trmath.project_tv(z, w, 1.0)  # TV <= 1: always inside
    torch.testing.assert_close(out, torch.log_softmax(z, -1), rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(lambda z, w: trmath.project_tv(z, w, 0.05, temperature=0.8), (z, w))
    assert torch.autograd.gradcheck(lambda z, w: trmath.project_tv(z, w, 1.0), (z, w))


# ------------------------------------------------------------------------------------------------
# sparse variant
# ------------------------------------------------------------------------------------------------
def test_sparse_full_support_equals_dense(backend):
    z, w = (torch.tensor(x).unsqueeze(0) for x in _rows("random", 16, 14))
    idx, lpn, lpo = trmath.sparse_support(z, w, 16)
    lp = trmath.project_kl_sparse(lpn, lpo, 0.05)
    dense = trmath.project_kl(z, w, 0.05)
    keep = torch.isfinite(lpn[0])  # first occurrence of each token
    assert int(keep.sum()) == 16
    assert float(lp[0, -1].exp()) < 1e-14  # empty tail
    torch.testing.assert_close(lp[0, :-1][keep], dense[0, idx[0][keep]], rtol=0, atol=1e-12)


def test_sparse_support_slots_and_tail():
    z, w = _rows("random", 500, 15)
    z, w = torch.tensor(z).unsqueeze(0), torch.tensor(w).unsqueeze(0)
    tok = torch.tensor([int(torch.argmin(z))])
    idx, lpn, lpo = trmath.sparse_support(z, w, 8, tok)
    assert idx.shape == (1, 17) and int(idx[0, -1]) == int(tok)
    ids = idx[0][torch.isfinite(lpn[0])].tolist()
    assert len(ids) == len(set(ids))  # each token once
    assert set(ids) == set(torch.topk(z[0], 8).indices.tolist()) | set(torch.topk(w[0], 8).indices.tolist()) | {int(tok)}
    lp, eta = trmath.project_kl_sparse(lpn, lpo, 0.01, return_eta=True)
    assert lp.shape == (1, 18) and float(eta[0]) > 0
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(1, dtype=torch.float64), rtol=0, atol=1e-13)
    # the coarse constraint (S tokens + tail) is met against the exact coarse KL
    tail_o = torch.log1p(-lpo[torch.isfinite(lpo)].exp().sum()).reshape(1)
    coarse_old = torch.cat([lpo[0], tail_o])
    assert abs(float(mp_kl(lp[0], coarse_old)) / 0.01 - 1) <= KL_RTOL


def test_sparse_bound_can_be_exceeded_on_the_full_vocabulary():
    """The caveat: a policy meeting the bound on the sparse set (support + tail) can exceed it
    on the full vocabulary when its tail is not shaped like pi_old's."""
    V, k, eps = 400, 8, 0.02
    g = np.random.default_rng(16)
    z = g.normal(size=V) * 1.5
    w = g.normal(size=V) * 1.5
    zt, wt = torch.tensor(z).unsqueeze(0), torch.tensor(w).unsqueeze(0)
    idx, lpn, lpo = trmath.sparse_support(zt, wt, k)
    lp = trmath.project_kl_sparse(lpn, lpo, eps)
    keep = torch.isfinite(lpn[0])
    sel = idx[0][keep]
    a, b = torch.log_softmax(zt[0], -1), torch.log_softmax(wt[0], -1)
    out = torch.isin(torch.arange(V), sel, invert=True)
    # Lift: the support tokens as projected; the tail mass spread like pi_new's tail.
    full = torch.empty(V, dtype=torch.float64)
    full[sel] = lp[0, :-1][keep]
    full[out] = lp[0, -1] + a[out] - torch.logsumexp(a[out], 0)
    assert abs(float(torch.logsumexp(full, 0))) < 1e-12
    coarse = float(mp_kl(lp[0], torch.cat([lpo[0], torch.log1p(-lpo[0][keep].exp().sum()).reshape(1)])))
    full_kl = float(mp_kl(full, b))
    assert abs(coarse / eps - 1) <= KL_RTOL
    assert full_kl > 1.5 * eps, (coarse, full_kl)
    # With the tail shaped like pi_old's, the full-vocabulary KL equals the coarse one.
    full[out] = lp[0, -1] + b[out] - torch.logsumexp(b[out], 0)
    assert abs(float(mp_kl(full, b)) / eps - 1) <= 1e-6


def test_sparse_rejects_overfull_rows():
    lp = torch.log(torch.tensor([[0.7, 0.6]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"new_logprobs: row 0 has probabilities summing to more than 1"):
        trmath.project_kl_sparse(lp, lp - 1.0, 0.1)
    # the check does not depend on validate, and names the argument and the row (multi-axis)
    good = torch.log(torch.full((2, 3, 2), 0.3, dtype=torch.float64))
    bad = good.clone()
    bad[1, 2] = torch.log(torch.tensor([0.7, 0.6], dtype=torch.float64))
    for validate in (True, False):
        with pytest.raises(ValueError, match=r"old_logprobs: row \(1, 2\) has probabilities summing to more than 1"):
            trmath.project_kl_sparse(good, bad, 0.1, validate=validate)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("S", (20, 129))
def test_sparse_mass_tolerance_is_logarithmic_in_the_support(dtype, S):
    """A row of S equal probabilities of mass exp(2 tol), tol = 4 eps (1 + ln S), raises on
    both paths (no-grad one call, and with a gradient); at exp(tol / 2) it is rounding. (A
    bound growing with S let a bfloat16 row of 20 tokens at mass 1.8 through.)"""
    eps = torch.finfo(dtype).eps
    tol = 4 * eps * (1 + math.log(S))
    old = torch.log_softmax(torch.randn(1, S, generator=torch.Generator().manual_seed(S)), -1).to(dtype)
    for mass_log, bad in ((2 * tol, True), (tol / 2, False)):
        new = torch.full((1, S), mass_log - math.log(S), dtype=torch.float64).to(dtype)
        assert (float(torch.logsumexp(new.double(), -1)) > tol) == bad
        for grad in (False, True):
            x = new.clone().requires_grad_(grad)
            if bad:
                with pytest.raises(ValueError, match="new_logprobs: row 0 has probabilities summing to more than 1"):
                    trmath.project_kl_sparse(x, old, 0.05)
            else:  # a zero tail (its slot -inf), the kept tokens projected
                out = trmath.project_kl_sparse(x, old, 0.05).detach()
                assert bool(torch.isfinite(out[..., :-1]).all()) and float(out[0, -1]) == -math.inf


def test_sparse_errors_name_the_sparse_arguments():
    """The sparse projection's infeasible row names its own arguments; sparse_support rejects
    rows without log-probabilities (NaN, +inf, entirely -inf) naming its argument, and takes a
    numpy integer k."""
    with pytest.raises(ValueError, match=r"^old_logprobs: row 0 puts mass .* outside the support of new_logprobs"):
        trmath.project_kl_sparse(torch.tensor([[-0.1, -math.inf]]), torch.tensor([[-5.0, -0.01]]), 0.05)
    good = torch.zeros(2, 3)
    for value, what in ((math.nan, "contains NaN"), (math.inf, r"contains \+inf"), (None, "is entirely -inf")):
        for arg, name in ((0, "new_logits"), (1, "old_logits")):
            bad = good.clone()
            if value is None:
                bad[1] = -math.inf
            else:
                bad[1, 2] = value
            args = (bad, good) if arg == 0 else (good, bad)
            with pytest.raises(ValueError, match=rf"^{name}: row 1 {what}"):
                trmath.sparse_support(*args, 1)
    idx, _, _ = trmath.sparse_support(torch.tensor([[2.0, 1.0, 0.0]]), torch.zeros(1, 3), np.int64(1))
    assert idx.tolist() == [[0, 0]]


@pytest.mark.parametrize("value, what", [(float("nan"), "contains NaN"), (float("inf"), "contains \\+inf"),
                                         (None, "is entirely -inf")])
@pytest.mark.parametrize("arg", [0, 1])
def test_sparse_rejects_invalid_rows(value, what, arg):
    good = torch.log(torch.full((4, 3), 0.2, dtype=torch.float64))
    bad = good.clone()
    if value is None:
        bad[2] = -float("inf")
    else:
        bad[2, 1] = value
    bad[3, 0] = float("nan")  # a later bad row is not the one reported
    args = (bad, good) if arg == 0 else (good, bad)
    name = ("new_logprobs", "old_logprobs")[arg]
    with pytest.raises(ValueError, match=rf"{name}: row 2 {what}"):
        trmath.project_kl_sparse(*args, 0.1)
    if value is None or value != value:
        # validate=False: a NaN row, or one entirely -inf (it was a finite distribution wholly in
        # the tail, eta = 0), is NaN with eta NaN, value and gradient; the other rows unaffected
        for grad in (False, True):
            a = [x.clone().requires_grad_(grad) for x in args]
            out, eta = trmath.project_kl_sparse(*a, 0.1, validate=False, return_eta=True)
            assert torch.isnan(out[2:]).all() and torch.isnan(eta[2:]).all()
            ref = trmath.project_kl_sparse(good[:2], good[:2], 0.1)
            assert torch.equal(out[:2].detach(), ref)
            if grad:
                out.nan_to_num(0.0).sum().backward()
                assert torch.isnan(a[arg].grad[2]).all() and bool(torch.isfinite(a[arg].grad[:2]).all())


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16))
def test_sparse_one_call_path_matches_the_general_path(dtype):
    """Without a graph, CPU inputs take one core call (tails, exact-KL statistics, projection);
    with one, the autograd path (tails, then project_kl). Same kernels: the same bits, on batched,
    strided rows with repeated (-inf) slots, inside and active rows."""
    g = torch.Generator().manual_seed(21)
    z = torch.randn(3, 5, 700, generator=g, dtype=torch.float64) * 3
    w = z + 0.4 * torch.randn(3, 5, 700, generator=g, dtype=torch.float64)
    w[0, 0] = z[0, 0]  # KL = 0: inside the ball
    tok = torch.randint(0, 700, (3, 5), generator=g)
    _, lpn, lpo = trmath.sparse_support(z.to(dtype), w.to(dtype), 24, tok)
    assert bool(torch.isinf(lpn).any()), "some slot repeats a token"
    buf = torch.full((*lpn.shape[:-1], 2 * lpn.shape[-1]), float("nan"), dtype=lpn.dtype)
    buf[..., ::2] = lpn
    lpn_s = buf[..., ::2]  # a strided view of the same rows
    first = None
    for a in (lpn, lpn_s):
        out, eta = trmath.project_kl_sparse(a, lpo, 0.005, return_eta=True)
        ref, eta_ref = trmath.project_kl_sparse(a.detach().clone().requires_grad_(), lpo, 0.005,
                                                 return_eta=True)
        assert out.dtype == ref.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(out, ref.detach()) and torch.equal(eta, eta_ref)
        assert float(eta[0, 0]) == 0.0 and bool((eta.flatten()[1:] > 0).all())
        first = out if first is None else first
        assert torch.equal(out, first)
    # A row that is not a sub-distribution anywhere in the batch: the general path's error.
    bad = lpn.clone()
    bad[2, 3, 0] = 0.5
    with pytest.raises(ValueError, match=r"new_logprobs: row \(2, 3\) has probabilities summing to more than 1"):
        trmath.project_kl_sparse(bad, lpo, 0.02)


def _skewed_rows(kind: str, V: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose log-ratio d = log(pi_new / pi_old) is far from Gaussian under pi_old, where a
    low-order model of its cumulant function misplaces the root."""
    g = np.random.default_rng(seed)
    w = g.normal(size=V) * 2.0
    z = w + 1e-3 * g.normal(size=V)
    if kind == "rare_token_up":  # pi_new moves mass onto a token pi_old deems rare
        i = int(np.argmin(w))
        z[i] = w.max() + 3.0
    elif kind == "top_token_down":  # pi_new takes most of the mass off pi_old's top token
        w[int(np.argmax(w))] += 8.0
        z = w.copy()
        z[int(np.argmax(w))] -= 9.0
    elif kind == "two_levels":  # d takes two values: half the tokens up by 5
        z[: V // 2] += 5.0
    elif kind == "two_tokens":
        z, w = np.array([0.0, 3.0]), np.array([2.5, -1.0])
    else:  # pragma: no cover
        raise ValueError(kind)
    return z, w


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("kind", ("rare_token_up", "top_token_down", "two_levels", "two_tokens"))
@pytest.mark.parametrize("eps", (0.3, 1e-2, 1e-6))
def test_kl_skewed_log_ratios_against_mpmath(backend, kind, eps, dtype):
    worst_eta = worst_kl = 0.0
    for seed in range(2):
        z, w = _skewed_rows(kind, 48, seed)
        zt, wt = torch.tensor(z).to(dtype), torch.tensor(w).to(dtype)
        lp, eta = trmath.project_kl(zt.unsqueeze(0), wt.unsqueeze(0), eps, return_eta=True)
        eta_ref, _ = mp_project_kl(zt, wt, eps)
        assert eta_ref > 0, "every case here is active"
        worst_eta = max(worst_eta, abs(float(eta[0]) / float(eta_ref) - 1.0))
        kl_at, _ = mp_projection_kl_at(zt, wt, float(eta[0]))
        worst_kl = max(worst_kl, abs(float(kl_at) / eps - 1.0))
    assert worst_eta <= ETA_RTOL, f"eta relative error {worst_eta:.3g}"
    assert worst_kl <= KL_RTOL, f"|KL/eps - 1| = {worst_kl:.3g}"


# ------------------------------------------------------------------------------------------------
# TROLL's loss
# ------------------------------------------------------------------------------------------------
def test_troll_loss_errors_name_its_arguments(backend):
    """Bad per-token inputs at valid positions raise naming them (they were not checked, and an
    infinite rollout log-prob gave a finite loss); bad logits rows name logits / rollout_logits
    (they were named after project_kl's arguments); padding may hold anything per token."""
    g = torch.Generator().manual_seed(19)
    logits = torch.randn(2, 3, 8, dtype=torch.float64, generator=g)
    old = torch.randn(2, 3, 8, dtype=torch.float64, generator=g)
    tok = torch.randint(0, 8, (2, 3), generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    lpo = torch.log_softmax(old, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    adv = torch.randn(2, 3, dtype=torch.float64, generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    kw = dict(logits=logits, rollout_logits=old, tokens=tok)
    for i, name in enumerate(("logprob", "rollout_logprob", "advantages")):
        for v, what in ((math.nan, "NaN"), (math.inf, r"\+inf")):
            args = [lp.clone(), lpo.clone(), adv.clone()]
            args[i][1, 2] = v  # padding: selected out
            loss, _ = trmath.troll_loss(*args, mask, **kw)
            assert math.isfinite(float(loss))
            args[i][0, 1] = v
            with pytest.raises(ValueError, match=rf"^{name}: contains {what} at valid position \(0, 1\)"):
                trmath.troll_loss(*args, mask, **kw)
    for key in ("logits", "rollout_logits"):
        bad = dict(kw)
        bad[key] = kw[key].clone()
        bad[key][1, 0, 3] = math.nan
        with pytest.raises(ValueError, match=rf"^{key}: row \(1, 0\) contains NaN"):
            trmath.troll_loss(lp, lpo, adv, mask, **bad)


def test_troll_loss_mask_is_bool_or_zero_one():
    """troll_loss takes the mask as every objective does: bool or 0/1, anything else an error
    (0.5 and 2.0 counted as valid before), on the logits' device."""
    g = torch.Generator().manual_seed(23)
    logits = torch.randn(1, 2, 6, dtype=torch.float64, generator=g)
    old = torch.randn(1, 2, 6, dtype=torch.float64, generator=g)
    tok = torch.tensor([[1, 4]])
    lp = torch.log_softmax(logits, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    lpo = torch.log_softmax(old, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    kw = dict(logits=logits, rollout_logits=old, tokens=tok)
    with pytest.raises(ValueError, match="mask: entries must be 0 or 1"):
        trmath.troll_loss(lp, lpo, adv, torch.tensor([[0.5, 2.0]]), **kw)
    ref, _ = trmath.troll_loss(lp, lpo, adv, torch.tensor([[True, False]]), **kw)
    got, _ = trmath.troll_loss(lp, lpo, adv, torch.tensor([[1.0, 0.0]]), **kw)
    assert torch.equal(got, ref)


def test_troll_loss_value_gradient_and_mask():
    g = torch.Generator().manual_seed(17)
    logits = (torch.randn(2, 5, 16, dtype=torch.float64, generator=g) * 2).requires_grad_()
    old = torch.randn(2, 5, 16, dtype=torch.float64, generator=g) * 2
    tok = torch.randint(0, 16, (2, 5), generator=g)
    adv = torch.randn(2, 5, dtype=torch.float64, generator=g)
    lp = torch.log_softmax(logits, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    lpo = torch.log_softmax(old, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    mask = torch.ones(2, 5, dtype=torch.bool); mask[1, 3:] = False
    eps, alpha = 0.05, 0.5
    kw = dict(logits=logits, rollout_logits=old, tokens=tok, epsilon=eps, alpha=alpha)
    loss, met = trmath.troll_loss(lp, lpo, adv, mask, **kw)
    # reference from the pieces
    lpt = trmath.project_kl(logits, old, eps)
    lpa = lpt.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    reg = trmath.kl(logits, lpt.detach())
    per = -adv * torch.exp(lpa - lpo) + alpha * reg
    ref = per[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    gl, = torch.autograd.grad(loss, logits)
    gr, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(gl, gr, rtol=1e-10, atol=1e-14)
    assert torch.all(gl[1, 3:] == 0)
    assert 0 <= float(met["projected_frac"]) <= 1 and float(met["kl_new_old"]) > 0
    # per-token matrix and a global normaliser (gradient accumulation)
    mat, _ = trmath.troll_loss(lp, lpo, adv, mask, aggregation=None, **kw)
    assert torch.all(mat[1, 3:] == 0)
    tot, _ = trmath.troll_loss(lp, lpo, adv, mask, normalizer=20, **kw)
    torch.testing.assert_close(tot, per[mask].sum() / 20, rtol=1e-12, atol=0)
    # fully masked: zero loss, zero gradient, finite metrics (no NaN); padding may hold NaN
    lpo_pad = lpo.clone(); lpo_pad[:] = math.nan
    loss0, met0 = trmath.troll_loss(lp, lpo_pad, adv, torch.zeros(2, 5), **kw)
    g0, = torch.autograd.grad(loss0, logits)
    assert float(loss0.detach()) == 0.0 and torch.all(g0 == 0)
    assert all(math.isfinite(float(v)) for v in met0.values())


def test_kl_old_zero_restricted_limit(backend):
    """KL(pi_new || pi_old) = +inf but pi_new restricted to the common support is in the ball:
    the solution is that restriction (eta = 0+), as the oracle finds."""
    z, w = _rows("old_zero", 24, 18)
    zt, wt = torch.tensor(z), torch.tensor(w)
    eta_ref, lp_ref = mp_project_kl(zt, wt, 5.0)
    assert eta_ref == 0 and np.isneginf(lp_ref[4])
    zr, wr = zt.unsqueeze(0).requires_grad_(), wt.unsqueeze(0).requires_grad_()
    lp, eta = trmath.project_kl(zr, wr, 5.0, return_eta=True)
    assert float(eta[0]) == 0.0
    fin = np.isfinite(lp_ref)
    assert np.max(np.abs(lp[0].detach().numpy()[fin] - lp_ref[fin])) < 1e-13
    assert torch.autograd.gradcheck(lambda a, b: trmath.project_kl(a, b, 5.0)[0, torch.from_numpy(fin)], (zr, wr))


# ------------------------------------------------------------------------------------------------
# properties on generated rows (Hypothesis)
# ------------------------------------------------------------------------------------------------
@given(pair=row_pairs(1, 48), eps=st.sampled_from([1e-4, 1e-2, 0.1, 1.0]),
       shift=st.floats(-50, 50))
def test_kl_properties_on_generated_rows(pair, eps, shift):
    z, w = (torch.from_numpy(x).unsqueeze(0) for x in pair)
    a, b = torch.log_softmax(z, -1), torch.log_softmax(w, -1)
    s = torch.isfinite(a) & torch.isfinite(b)
    lim = -float(torch.logsumexp(torch.where(s, b, -INF), -1))  # g(eta -> inf)
    if not lim < eps:
        with pytest.raises(ValueError, match="outside the support"):
            trmath.project_kl(z, w, eps)
        return
    (lp, eta), (lp_t, eta_t) = _both(lambda: trmath.project_kl(z, w, eps, return_eta=True))
    # Absolute rounding of log-probs formed as logit/T - log Z: a few ulps of the logit scale
    # (1.8e-12 per ulp for logits ~1e4), whatever |log pi~| is.
    scale = float(torch.cat([z[torch.isfinite(z)], w[torch.isfinite(w)]]).abs().max())
    ulps = 2.0 ** -52 * scale
    # backends agree
    assert torch.equal(torch.isinf(lp), torch.isinf(lp_t))
    assert (float(eta) == 0) == (float(eta_t) == 0)
    if float(eta) > 0:
        assert abs(float(eta) / float(eta_t) - 1) < 1e-8
    fin = torch.isfinite(lp)
    torch.testing.assert_close(lp[fin], lp_t[fin], rtol=1e-10, atol=1e-10)
    # feasibility, and tightness when active (absolute floor: the float64 rounding of log Z)
    kl = float(trmath.kl(lp, w))
    assert kl <= eps * (1 + KL_RTOL) + 1e-15
    if float(eta) > 0:
        assert abs(kl - eps) <= KL_RTOL * eps + 1e-15
    elif math.isfinite(float(trmath.kl(z, w))):
        torch.testing.assert_close(lp, a, rtol=0, atol=1e-13 + 4 * ulps)  # identity when inside
    # pi_old restricted to the support is feasible: the projection is at least as close to pi_new
    b_s = torch.where(s, b, -INF) - torch.logsumexp(torch.where(s, b, -INF), -1)
    if float(_kl_rows(b_s, b)) <= eps:
        assert float(_kl_rows(lp, a)) <= float(_kl_rows(b_s, a)) + 1e-12
    # shift invariance of both rows; z + shift and w - shift/2 are themselves rounded (by up to
    # half an ulp of the logit scale), and both outputs carry a few ulps of it
    lp2 = trmath.project_kl(z + shift, w - 0.5 * shift, eps)
    torch.testing.assert_close(lp2[fin], lp[fin], rtol=0, atol=1e-12 * (1 + abs(shift)) + 8 * ulps)


@given(pair=row_pairs(1, 48), frac=st.sampled_from([1e-6, 0.1, 0.5, 0.99, 2.0]),
       T=st.sampled_from([0.5, 1.0, 3.0]))
def test_tv_properties_on_generated_rows(pair, frac, T):
    """Both paths on generated rows (peaked, masked, equal, shifted, ... families), with the
    radius a fraction of the row's TV (2.0: inside the ball): values, lambda and gradients
    agree; the constraint is met with equality when active; inside, the output is pi_new."""
    z, w = (torch.from_numpy(x).unsqueeze(0) for x in pair)
    tv = float(trmath.tv(z, w, temperature=T))
    delta = frac * tv if tv > 0 else 0.5
    if not delta > 0:  # TV underflows to a subnormal fraction
        return
    res = []
    for force in (False, True):
        old = P._FORCE_TORCH[0]
        P._FORCE_TORCH[0] = force
        try:
            zz, ww = z.clone().requires_grad_(), w.clone().requires_grad_()
            lp, lam = trmath.project_tv(zz, ww, delta, temperature=T, return_lambda=True)
            c = torch.cos(torch.arange(lp.shape[-1], dtype=torch.float64))
            (torch.where(torch.isfinite(lp), lp, 0.0) * c).sum().backward()
            res.append((lp.detach(), float(lam.detach()), zz.grad, ww.grad))
        finally:
            P._FORCE_TORCH[0] = old
    (lp, lam, dz, dw), (lp_t, lam_t, dz_t, dw_t) = res
    assert lam == lam_t  # the same float64 TV kernel, the same division
    assert torch.equal(lp.isneginf(), lp_t.isneginf())
    assert bool(torch.isfinite(lp[~lp.isneginf()]).all())
    fin = torch.isfinite(lp)
    # Each path forms logit/T - lse + log(lam) (or log(1 - lam)), then the log-mixture: some 8
    # roundings of values up to the logit scale, so the two differ by up to ~16 ulps of it (15
    # seen over 3000 generated rows); 32 is that bound with a factor 2.
    scale = float(torch.cat([z[torch.isfinite(z)], w[torch.isfinite(w)]]).abs().max()) / T + 1.0
    torch.testing.assert_close(lp[fin], lp_t[fin], rtol=0, atol=32 * 2.0 ** -52 * scale)
    # Gradient terms are of size |g|/T (|g| <= 1 here); where they cancel to an exact 0 (one
    # token, say) each path keeps a few ulps of that size, not of the result. Outside the ball
    # dL/dlam = sum g (p - q) / pi~ is a difference of terms of size sum|g| <= V, and it reaches
    # the logits multiplied by lam / TV: its rounding, ~1e-16 V lam / (T TV), is each path's own
    # (rows equal but for their last bits have TV ~ 1e-17).
    gs = float(torch.cat([dz_t.abs().flatten(), dw_t.abs().flatten()]).max()) + 1.0 / T
    gtol = 1e-9 * gs + (1e-13 * z.shape[-1] / T * lam / tv if lam < 1.0 else 0.0)
    assert float((dz - dz_t).abs().max()) <= gtol and float((dw - dw_t).abs().max()) <= gtol
    got = float(trmath.tv(lp, w / T))  # lp is at temperature 1
    if lam < 1.0:  # (plus the rounding of log-probs formed at the logit scale)
        assert abs(got - delta) <= 1e-9 * delta + 32 * 2.0 ** -52 * scale
    else:
        # inside: z/T - lse exactly as formed, against log_softmax's own roundings (3.7 ulps of
        # the scale seen; each side ~4)
        ref = torch.log_softmax(z / T, -1)
        torch.testing.assert_close(lp, ref, rtol=0, atol=16 * 2.0 ** -52 * scale)


def test_sparse_support_logprobs_are_exact_and_differentiable():
    g = torch.Generator().manual_seed(19)
    z = (torch.randn(3, 300, generator=g) * 3).requires_grad_()
    w = torch.randn(3, 300, generator=g) * 3
    idx, lpn, lpo = trmath.sparse_support(z, w, 5, temperature=0.8)
    ref = torch.log_softmax(z.double() / 0.8, -1).gather(-1, idx)
    keep = torch.isfinite(lpn)
    torch.testing.assert_close(lpn[keep].double(), ref[keep], rtol=2e-7, atol=0)
    c = torch.randn(lpn.shape, dtype=torch.float64, generator=g)
    gz, = torch.autograd.grad((c * torch.where(keep, lpn.double(), 0.0)).sum(), z)
    gr, = torch.autograd.grad((c * torch.where(keep, ref, 0.0)).sum(), z)
    torch.testing.assert_close(gz, gr, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# regression: peaked rows whose logit spread is 1e2..1e4 (found by Hypothesis)
# ------------------------------------------------------------------------------------------------
# pi_new and pi_old are near point masses (mass e^-spread elsewhere); the log-ratio d spans
# ~2 spread, so KL(pi~ || pi_old) is a difference of terms of size ~spread when it is evaluated
# naively, and g(eta) falls from ~spread to below 1e-300 within a narrow band of eta.
_FOUND_Z = [-4.01061738e-01, 9.99976035e+03, 2.79576510e-01, -9.54676902e-01, -7.98951796e-01]
_FOUND_W = [-4.01061738e-01, -7.98951796e-01, 2.79576510e-01, -9.54676902e-01, 9.99976035e+03]


def _peaked_pair(spread: float, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    z = g.normal(size=6)
    w = z.copy() if kind == "swapped" else g.normal(size=6)
    if kind == "swapped":  # the peaks at different tokens, the rest of the rows equal
        z[1] += spread
        w[4] += spread
    elif kind == "shared":  # one shared peak; pi_old moves most of its mass to a second one
        z[1] += spread
        w[1] += spread
        w[3] += spread + 2.0
    elif kind == "two_peaks":  # pi_new split between two tokens, pi_old peaked at a third
        z[1] += spread
        z[2] += spread - 1.0
        w[5] += spread
    else:  # pragma: no cover
        raise ValueError(kind)
    return z, w


def _check_against_oracle(z: np.ndarray, w: np.ndarray, eps: float, dtype: torch.dtype) -> None:
    zt, wt = torch.tensor(z).to(dtype), torch.tensor(w).to(dtype)
    eta_ref, lp_ref = mp_project_kl(zt, wt, eps)
    fin = np.isfinite(lp_ref)
    for name, (lp, eta) in zip(BACKENDS, _both(lambda: trmath.project_kl(zt.unsqueeze(0), wt.unsqueeze(0), eps,
                                                                           return_eta=True))):
        where = f"{name}, eps={eps:g}, {dtype}"
        out = lp[0].double().numpy()
        assert not np.isnan(out).any() and math.isfinite(float(eta[0])), where
        assert np.array_equal(np.isfinite(out), fin), where
        # float64: the eta error times |d log pi~ / d eta| plus the rounding of
        # b + t d - Lambda at the scale of the logits (a few ulps of 1e4 ~ 1e-12);
        # float32 outputs: one rounding to float32 on top.
        tol = 1e-9 if dtype == torch.float64 else 2.0 ** -23
        err = float(np.max(np.abs(out[fin] - lp_ref[fin]) / np.maximum(1.0, np.abs(lp_ref[fin]))))
        assert err <= tol, f"{where}: log pi~ error {err:.3g}"
        if eta_ref == 0:
            assert float(eta[0]) == 0.0, where
            continue
        assert abs(float(eta[0]) / float(eta_ref) - 1.0) <= ETA_RTOL, f"{where}: eta {float(eta[0])!r} vs {eta_ref}"
        kl_at, _ = mp_projection_kl_at(zt, wt, float(eta[0]))
        assert abs(float(kl_at) / eps - 1.0) <= KL_RTOL, f"{where}: KL/eps - 1 = {float(kl_at) / eps - 1:.3g}"


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_kl_found_peaked_row_against_mpmath(dtype):
    z, w = np.array(_FOUND_Z), np.array(_FOUND_W)
    for eps in (1e-8, 1e-4, 1e-2, 1.0):
        _check_against_oracle(z, w, eps, dtype)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
@pytest.mark.parametrize("kind", ("swapped", "shared", "two_peaks"))
@pytest.mark.parametrize("spread", (1e2, 1e3, 1e4))
def test_kl_peaked_rows_against_mpmath(spread, kind, dtype):
    z, w = _peaked_pair(spread, kind, seed=int(math.log10(spread)))
    for eps in (1e-8, 1e-4, 0.3):
        _check_against_oracle(z, w, eps, dtype)


def test_kl_peaked_rows_in_a_batch_match_single_rows():
    """The C++ rows are independent: a batch of peaked and ordinary rows gives each row's result."""
    pairs = [_peaked_pair(s, k, 0) for s in (1e2, 1e4) for k in ("swapped", "shared", "two_peaks")]
    # the found row, padded with a token masked in both rows (which contributes nothing)
    pairs += [_rows("random", 6, 1), (np.array(_FOUND_Z + [-INF]), np.array(_FOUND_W + [-INF]))]
    z = torch.tensor(np.stack([p[0] for p in pairs]))
    w = torch.tensor(np.stack([p[1] for p in pairs]))
    lp, eta = trmath.project_kl(z, w, 1e-4, return_eta=True)
    assert not torch.isnan(lp).any()
    for i in range(len(pairs)):
        lpi, etai = trmath.project_kl(z[i:i + 1], w[i:i + 1], 1e-4, return_eta=True)
        assert torch.equal(lp[i:i + 1], lpi) and torch.equal(eta[i:i + 1], etai)


# ------------------------------------------------------------------------------------------------
# the sparse projection's tail buckets (compiled pass and torch reference)
# ------------------------------------------------------------------------------------------------
def _tail_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows of log-probabilities [B, S] with masses from 1e-13 to 1 - 1e-9, for every S from 1 to
    9 and a longer one (4-lane vectors and their remainders), some with -inf entries."""
    g = torch.Generator().manual_seed(23)
    out = []
    for S in (1, 2, 3, 4, 5, 7, 8, 9, 130):
        for mass in (1e-13, 0.3, 0.6, 0.999, 1 - 1e-9):
            x = torch.randn(S, dtype=torch.float64, generator=g) * 2
            if S > 2:
                x[S // 2] = -INF
            x = x - torch.logsumexp(x, 0) + math.log(mass)
            out.append(x.to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_sparse_tails_match_mpmath(dtype):
    import mpmath

    u = 2.0 ** -53
    for x in _tail_rows(dtype):
        S = x.shape[-1]
        z = x.unsqueeze(0)
        w = torch.flip(z, (-1,)).contiguous()
        got = {"cpp": trmath._backend.sparse_tails(z, w), "torch": P._tails_torch(z, w)}
        with mpmath.workdps(60):
            m = mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in x.double().tolist())
            ref_s = float(mpmath.log(m))
            # rounded to 16/32 bits, a row of mass 1 - 1e-9 can list slightly more than 1: its
            # tail is empty (the mass is clamped at 1)
            ref_t = float(mpmath.log(1 - m)) if m < 1 else -INF
        mass = float(m)
        for name, (both, s) in got.items():
            s = s.reshape(2)
            for k in range(2):  # w is z reversed: the same mass and tail
                # the entries are the input values, converted exactly
                xs = x if k == 0 else torch.flip(x, (0,))
                assert torch.equal(both[k, 0, :S], xs.double()), name
                # log-mass: S rounded exponentials and a log, a few ulps of the largest term
                assert abs(float(s[k]) - ref_s) <= 4 * (S + 4) * u, (name, S, mass)
                # tail = log(1 - e^s) amplifies the error of s by mass / (1 - mass); the final
                # log adds its own rounding
                if ref_t == -INF or (S + 4) * u * mass >= (1 - mass):  # tail within rounding of 0
                    assert float(both[k, 0, S]) < math.log((S + 4) * 8 * u), (name, S, mass)
                    continue
                tol = 4 * ((S + 4) * u * mass / (1 - mass) + 2 * u * abs(ref_t))
                assert abs(float(both[k, 0, S]) - ref_t) <= tol, (name, S, mass, float(both[k, 0, S]), ref_t)


def test_sparse_tails_strided_and_batched_rows_are_row_for_row_identical():
    g = torch.Generator().manual_seed(29)
    base = torch.randn(6, 5, 42, generator=g) - 5.0
    z = base[:, 1, ::2]  # strided, non-contiguous rows
    w = base[:, 3, 1::2]
    both, s = trmath._backend.sparse_tails(z, w)
    for r in range(z.shape[0]):
        b1, s1 = trmath._backend.sparse_tails(z[r:r + 1].contiguous(), w[r:r + 1].contiguous())
        assert torch.equal(both[:, r], b1[:, 0]) and torch.equal(s[:, r], s1[:, 0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_gradients_through_the_tails(backend, dtype):
    g = torch.Generator().manual_seed(31)
    a = torch.randn(3, 6, dtype=torch.float64, generator=g)
    b = torch.randn(3, 6, dtype=torch.float64, generator=g)
    b[1, 2] -= 4.0  # little pi_old mass where pi_new has none (the ball stays feasible)
    a = a - torch.logsumexp(a, -1, keepdim=True) + math.log(0.7)
    b = b - torch.logsumexp(b, -1, keepdim=True) + math.log(0.8)
    if dtype == torch.float64:
        # (finite inputs: a finite difference at a -inf entry is NaN)
        a.requires_grad_()
        b.requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y: trmath.project_kl_sparse(x, y, 0.05), (a, b))
        return
    a[1, 2] = -INF  # a token only pi_old has
    # 32-bit inputs: both backends give the float64 computation's gradients, in float32
    c = torch.randn(3, 7, dtype=torch.float64, generator=g)
    x, y = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    gx, gy = torch.autograd.grad((c * trmath.project_kl_sparse(x, y, 0.05)).sum(), (x, y))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    rx, ry = torch.autograd.grad((c * trmath.project_kl_sparse(x64, y64, 0.05)).sum(), (x64, y64))
    assert gx.dtype == dtype and gy.dtype == dtype
    # Not bitwise: the output is float32, so the gradient reaching it is rounded to float32
    # (2^-24 relative) before the float64 backward; through the Jacobian that is an error of a
    # few float32 ulps of the row's largest gradient, and the final rounding adds half an ulp.
    for got, ref in ((gx, rx), (gy, ry)):
        torch.testing.assert_close(got, ref.to(dtype), rtol=2.0**-22,
                                   atol=2.0**-22 * float(ref.abs().max()))
