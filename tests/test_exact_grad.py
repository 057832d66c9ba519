"""Gradients of the exact reductions.

* ``torch.autograd.gradcheck`` in float64 of every function with respect to every logits
  argument, at temperatures 1 and 0.7 (TV on rows without ties, where it is differentiable);
* backward values against the mpmath gradient oracles (:mod:`trmath.testing.oracles`) for
  float32 inputs (error <= 1e-5 of the row's largest gradient) and for bfloat16 / float16
  inputs (gradients in the input's dtype, one rounding to that dtype on top);
* masked (``-inf``) tokens get exactly zero gradient, and no gradient is NaN;
* the gradient of every shift-invariant quantity sums to 0 over the vocabulary (both backends);
* ``torch.compile(fullgraph=True)`` of a small loss using ``kl`` and ``token_logprobs``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trmath
from trmath import _ops
from trmath.testing import StableRNG, cast, mp_grad_batch, mp_grad_kl

INF = math.inf
PAIR = ("kl", "tv", "js")
TEMPERATURES = (1.0, 0.7)

# Oracle comparison: |grad - ref| <= rtol_max * max|ref| over the row + rtol_elem * |ref| + ATOL.
# float32 inputs give float32 gradients (1e-5 of the row's largest, the stated target);
# 16-bit inputs give gradients in their own dtype, rounded once: half an ulp relative on top
# (2**-8 for bfloat16, 2**-11 for float16), plus the subnormal spacing of the dtype. ATOL is
# the absolute floor of the accuracy target of the values (TARGETS.md: 1e-30 for 16/32-bit
# inputs): gradients below it (float32 subnormals) may flush to zero.
GRAD_TOL = {
    torch.float32: (1e-5, 0.0),
    torch.bfloat16: (1e-5, 2.0**-8),
    torch.float16: (1e-5, 2.0**-11),
}
ATOL = 1e-30


def _dname(d) -> str:
    return str(d).replace("torch.", "")


# ------------------------------------------------------------------------------------------------
# gradcheck (float64)
# ------------------------------------------------------------------------------------------------
def _gradcheck_rows(seed: int, no_ties: bool, masked: bool):
    """[3, 6] float64 rows; with ``no_ties`` every |log p_i - log q_i| >= 0.05 (TV is
    differentiable there and a finite-difference step cannot cross a kink)."""
    rng = StableRNG(seed)
    while True:
        z = rng.normal(18).reshape(3, 6)
        w = z + 0.5 * rng.normal(18).reshape(3, 6)
        if masked:
            z[0, 2] = w[0, 2] = -INF  # masked in both
            z[1, 4] = -INF  # p = 0 < q
        lp = torch.log_softmax(torch.from_numpy(z), -1)
        lq = torch.log_softmax(torch.from_numpy(w), -1)
        fin = torch.isfinite(lp) & torch.isfinite(lq)
        if not no_ties or bool(((lp - lq).abs()[fin] >= 0.05).all()):
            return torch.from_numpy(z), torch.from_numpy(w)
        seed += 1000
        rng = StableRNG(seed)


@pytest.mark.parametrize("masked", (False, True), ids=("dense", "masked"))
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("func", PAIR)
def test_gradcheck_pair(func, T, masked):
    z, w = _gradcheck_rows(1, no_ties=(func == "tv"), masked=masked)
    z.requires_grad_(True)
    w.requires_grad_(True)
    f = getattr(trmath, func)
    assert torch.autograd.gradcheck(lambda a, b: f(a, b, temperature=T), (z, w),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("masked", (False, True), ids=("dense", "masked"))
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("func", ("logsumexp", "entropy", "token_logprobs",
                                  "token_logprobs+entropy"))
def test_gradcheck_single(func, T, masked):
    z, _ = _gradcheck_rows(2, no_ties=False, masked=masked)
    z.requires_grad_(True)
    tokens = torch.tensor([0, 3, 5])
    if func in ("logsumexp", "entropy"):
        fn = lambda a: getattr(trmath, func)(a, temperature=T)  # noqa: E731
    else:
        ent = func.endswith("entropy")
        fn = lambda a: trmath.token_logprobs(a, tokens, temperature=T,  # noqa: E731
                                             return_entropy=ent)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# backward against the mpmath gradient oracles
# ------------------------------------------------------------------------------------------------
def _oracle_rows(V: int, dtype, family: str, seed: int):
    """[6, V] pairs cast to ``dtype``; no q_i = 0 < p_i (the KL gradient is then undefined)."""
    rng = StableRNG(seed)
    zs, ws = [], []
    for i in range(6):
        s = (1.0, 3.0, 0.3)[i % 3]
        z = s * rng.normal(V)
        if family == "random":
            w = s * rng.normal(V) + 2.0
        elif family == "near":
            w = z + (1e-2, 1e-4, 1e-6)[i % 3] * rng.normal(V)
        elif family == "peaked":
            z[rng.integers(0, V)] += (20.0, 80.0, 1e4)[i % 3]
            w = z + 0.3 * rng.normal(V)
        else:  # masked: in both, and p = 0 < q
            w = z + 0.2 * rng.normal(V)
            if V > 2:
                z[1::3] = -INF
                w[2::5] = -INF
                w[1::6] = -INF
                w[np.isfinite(z) & ~np.isfinite(w)] = 0.0  # keep q > 0 wherever p > 0
        zc = cast(z, dtype)
        zs.append(zc)
        ws.append(cast(w, dtype) if family != "near" else
                  cast(zc.double().numpy() + (w - z), dtype))
    return torch.stack(zs), torch.stack(ws)


def _term_scale(g, T, *rows):
    """Per row: (|g| / T) max_j p_j (1 + |log p_j|) over the given logit rows.

    Every backward formula is p_j (or q_j) times an O(1 + |log p_j|) factor formed in float32
    (e.g. -p_j (log p_j + H), p_j (eps_j - KL), p_j (s_j - sum p s)); its absolute error is a
    few float32 ulps of that term, whatever the (possibly cancelled) value of the entry.
    """
    scale = 0.0
    for z in rows:
        lp = torch.log_softmax(z.to(torch.float64) / T, -1)
        p = lp.exp()
        term = torch.where(p > 0, p * (1 + lp.abs()), torch.zeros_like(p)).amax(-1)
        scale = scale + term
    return (g.abs() / T * scale).numpy()[:, None]


def _assert_grad_vs_oracle(got, ref, dtype, what, term_scale=None):
    assert got.dtype == dtype, (what, got.dtype)
    g = got.to(torch.float64).numpy().reshape(-1, got.shape[-1])
    r = np.asarray(ref, dtype=np.float64).reshape(g.shape)
    assert not np.isnan(g).any(), (what, "NaN gradient")
    rtol_max, rtol_elem = GRAD_TOL[dtype]
    tiny = float(torch.finfo(dtype).tiny * torch.finfo(dtype).eps)
    allowed = rtol_max * np.abs(r).max(-1, keepdims=True) + rtol_elem * np.abs(r) + tiny + ATOL
    if term_scale is not None:
        # float32 arithmetic of the kernels: 16 ulps of the largest term of the row (see
        # _term_scale); this only matters where the row's gradient cancels far below its terms.
        allowed = allowed + 16 * float(torch.finfo(torch.float32).eps) * term_scale
    err = np.abs(g - r)
    bad = err > allowed
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        worst = np.unravel_index(np.argmax(np.where(bad, err / allowed, 0)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} gradient entries in rows {rows.tolist()} off; worst "
            f"{tuple(int(i) for i in worst)}: got {g[worst]!r}, oracle {r[worst]!r}, "
            f"row max {np.abs(r[worst[0]]).max():.3g}")


@pytest.mark.parametrize(
    "backend, dtype, T",
    [("cpp", d, T) for d in GRAD_TOL for T in TEMPERATURES]
    + [("torch", torch.float32, T) for T in TEMPERATURES],
    ids=lambda v: _dname(v) if isinstance(v, torch.dtype) else str(v),
)
@pytest.mark.parametrize("family", ("random", "near", "peaked", "masked"))
def test_backward_against_oracle(family, backend, dtype, T):
    """C++ kernels (every 16/32-bit dtype) and the torch backend (float32) vs mpmath."""
    _ops._FORCE_TORCH[0] = backend == "torch"
    failures = []
    for V in (2, 7, 64, 300):
        z, w = _oracle_rows(V, dtype, family, seed=V + 17)
        n = z.shape[0]
        g = torch.from_numpy(StableRNG(V).uniform(n, 0.5, 2.0))
        g1 = torch.from_numpy(StableRNG(V + 1).uniform(n, -1.0, 1.0))
        tokens = torch.tensor([int(np.flatnonzero(np.isfinite(r))[k % 2])
                               for k, r in enumerate(z.double().numpy())])
        funcs = [f for f in PAIR if not (f == "tv" and family == "near")]  # TV: no near-ties
        for func in funcs + ["logsumexp", "entropy", "token_logprobs+entropy"]:
            zz = z.clone().requires_grad_(True)
            ww = w.clone().requires_grad_(True)
            if func in PAIR:
                (getattr(trmath, func)(zz, ww, temperature=T) * g.float()).sum().backward()
                refs = mp_grad_batch(func, z, w, temperature=T, grad_output=g)
                got = (zz.grad, ww.grad)
            elif func == "token_logprobs+entropy":
                lp, h = trmath.token_logprobs(zz, tokens, temperature=T, return_entropy=True)
                (lp * g.float() + h * g1.float()).sum().backward()
                refs = (mp_grad_batch("token_logprobs", z, tokens=tokens, temperature=T,
                                      grad_output=g)
                        + mp_grad_batch("entropy", z, temperature=T, grad_output=g1),)
                got = (zz.grad,)
            else:
                (getattr(trmath, func)(zz, temperature=T) * g.float()).sum().backward()
                refs = (mp_grad_batch(func, z, temperature=T, grad_output=g),)
                got = (zz.grad,)
            gg = g if func != "token_logprobs+entropy" else g.abs() + g1.abs()
            scale = _term_scale(gg, T, z, w) if func in PAIR else _term_scale(gg, T, z)
            for k, (a, r) in enumerate(zip(got, refs)):
                try:
                    _assert_grad_vs_oracle(a, r, dtype, f"d{func}/d{'zw'[k]} V={V}", scale)
                except AssertionError as exc:
                    failures.append(str(exc))
    assert not failures, "\n".join(failures)


def check_confident_token_gradients(dtype, T, device="cpu"):
    """Gradients of ``token_logprobs`` (alone and with the entropy) and ``entropy`` on rows where
    the token holds p_t = 1 - 1e-3 ... 1 - 1e-15 (float64 also 1 - 1e-30) against mpmath, every
    entry within the target relative to the row's largest gradient (float64 1e-12, else 1e-5;
    bfloat16 gradients also half an ulp of their own). Also run by the GPU tests."""
    rng = StableRNG(int(100 * T) + {torch.float32: 1, torch.bfloat16: 2, torch.float64: 3}[dtype])
    gaps = [1e-3, 1e-6, 1e-9, 1e-12, 1e-15] + ([1e-30] if dtype == torch.float64 else [])
    V = 50
    rows, tokens = [], []
    for rest in gaps:
        z = rng.normal(V)
        t = int(rng.integers(0, V))
        # p_t = 1 - rest: z_t / T - lse(others / T) = log((1 - rest) / rest)
        others = np.delete(z, t) / T
        m = others.max()
        lse_o = m + math.log(np.exp(others - m).sum())
        z[t] = T * (lse_o + math.log1p(-rest) - math.log(rest))
        rows.append(z)
        tokens.append(t)
    z = torch.stack([cast(r, dtype) for r in rows])
    tok = torch.tensor(tokens)
    n = z.shape[0]
    g = torch.from_numpy(StableRNG(7).uniform(n, 0.5, 2.0))
    g1 = torch.from_numpy(StableRNG(8).uniform(n, -1.0, 1.0))
    ref_lp = np.asarray(mp_grad_batch("token_logprobs", z, tokens=tok, temperature=T, grad_output=g))
    ref_h = np.asarray(mp_grad_batch("entropy", z, temperature=T, grad_output=g1))
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    elem = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    gf = g.to(torch.float64 if dtype == torch.float64 else torch.float32).to(device)
    g1f = g1.to(gf.dtype).to(device)
    zd, tokd = z.to(device), tok.to(device)
    for mode, ref in (("token_logprobs", ref_lp), ("entropy", ref_h),
                      ("token_logprobs+entropy", ref_lp + ref_h)):
        zz = zd.clone().requires_grad_(True)
        if mode == "token_logprobs":
            (trmath.token_logprobs(zz, tokd, temperature=T) * gf).sum().backward()
        elif mode == "entropy":
            (trmath.entropy(zz, temperature=T) * g1f).sum().backward()
        else:
            lp, h = trmath.token_logprobs(zz, tokd, temperature=T, return_entropy=True)
            (lp * gf + h * g1f).sum().backward()
        got = zz.grad.cpu().to(torch.float64).numpy()
        allowed = rel * np.abs(ref).max(-1, keepdims=True) + elem * np.abs(ref) + 1e-300
        err = np.abs(got - ref)
        bad = err > allowed
        assert not bad.any(), (
            f"{mode} ({device}): rows {np.unique(np.nonzero(bad)[0]).tolist()} (1 - p_t = "
            f"{[gaps[i] for i in np.unique(np.nonzero(bad)[0])]}); worst relative to the row max "
            f"{float((err / np.abs(ref).max(-1, keepdims=True)).max()):.3g}")


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=_dname)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_token_and_entropy_gradients_where_one_token_takes_nearly_all_mass(backend, dtype, T):
    """A confident token: the gradient of log p_t at the token itself is g (1 - p_t) / T and
    that of the entropy -g p_t (log p_t + H) / T, both far below p_t. Formed as g - g p_t, the
    first came out 0 for 1 - p_t < 3e-8 in float32 and 1e-16 in float64 (float64, T = 0.7,
    1 - p_t = 4.5e-16: 0; T = 1, 1.5e-11: 6.5e-5 off); formed about (lse - H) T, the second lost
    1e-16 |lse| (float64, H = 1e-11: 3e-4 off). Now every entry is within the target of the
    oracle relative to the row's largest gradient, with no allowance for float32 arithmetic on
    the terms: the token's entry from -expm1(log p_t), log p + H as (z - M)/T - (log A - H)
    with the per-row M and log A of the forward."""
    _ops._FORCE_TORCH[0] = backend == "torch"
    check_confident_token_gradients(dtype, T)


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("T", (1.0, 0.7, 2.0))
def test_float64_pair_gradients_of_peaked_and_near_rows(backend, T):
    """float64 inputs keep the relative target, 1e-12 of the row's largest gradient, on rows
    where one token holds nearly all of p and q (the gradient is then of the order of the mass
    left to the others: 1e-9 ... 1e-23 here) and on near-identical rows under a constant logit
    offset. The torch backend lost both: its backward re-formed the log-ratio centre from the
    two rounded normalisers (1e-16 |lse| off: 2e-12 of a near row's gradient, and the sign of
    a dominant token's p - q for TV), and formed a dominant token's p (eps - KL) and q - p as
    small differences of O(1) numbers: on these rows its entries were off by up to 6e4 times
    the row's largest gradient. It now keeps the forward's centre and takes such an entry as
    minus the sum of the row's others."""
    _ops._FORCE_TORCH[0] = backend == "torch"
    rng = StableRNG(int(10 * T) + 5)
    V = 300
    zs, ws = [], []
    for k in range(8):
        z = rng.normal(V) * (0.5, 3.0)[k % 2]
        if k < 4:  # one dominant token, in both rows
            top = int(rng.integers(0, V))
            z[top] += T * (20.0, 35.0, 50.0, 12.0)[k]
            w = z + 0.3 * rng.normal(V)
        else:  # near-identical, with and without an offset
            w = z + (1e-3, 1e-6)[k % 2] * rng.normal(V) + (0.0, 5.0)[(k // 2) % 2]
        zs.append(z)
        ws.append(w)
    z = torch.from_numpy(np.stack(zs))
    w = torch.from_numpy(np.stack(ws))
    g = torch.from_numpy(StableRNG(3).uniform(z.shape[0], 0.5, 2.0))
    failures = []
    for func in PAIR:
        zz = z.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        (getattr(trmath, func)(zz, ww, temperature=T) * g).sum().backward()
        refs = mp_grad_batch(func, z, w, temperature=T, grad_output=g)
        for k, (got, ref) in enumerate(zip((zz.grad, ww.grad), refs)):
            r = np.asarray(ref, dtype=np.float64)
            err = np.abs(got.numpy() - r)
            allowed = 1e-12 * np.abs(r).max(-1, keepdims=True) + 1e-300
            if (err > allowed).any():
                rows = np.unique(np.nonzero(err > allowed)[0]).tolist()
                worst = float((err / np.abs(r).max(-1, keepdims=True)).max())
                failures.append(f"d{func}/d{'zw'[k]}: rows {rows}, worst {worst:.3g} of the row max")
    assert not failures, "\n".join(failures)


def _dominant_rows(T: float, V: int, seed: int):
    """Rows where one token holds 1 - 1e-3 ... 1 - 1e-22 of p: q peaked on the same token
    (both sides dominant, JS's dw too), on the same token with a log-ratio of 3 there (p_j - q_j
    a difference of two numbers near 1: KL's d/dw), on another token (KL large), or nowhere; and
    rows where q is so peaked and p spread."""
    rng = StableRNG(seed)
    zs, ws = [], []
    for k, gap in enumerate((7.0, 14.0, 20.0, 30.0, 50.0)):
        for mode in ("same", "shifted", "other", "flat", "q only"):
            z = rng.normal(V)
            top = int(rng.integers(0, V))
            z[top] += gap
            if mode in ("same", "shifted"):
                w = z + 0.3 * rng.normal(V)
                if mode == "shifted":
                    w[top] += 3.0
            elif mode == "other":
                w = rng.normal(V)
                w[(top + 1 + k) % V] += gap
            elif mode == "flat":
                w = 2.0 * rng.normal(V)
            else:
                z, w = 2.0 * rng.normal(V), z
            zs.append(T * z)
            ws.append(T * w)
    return np.stack(zs), np.stack(ws)


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64),
                         ids=_dname)
@pytest.mark.parametrize("T", (1.0, 0.7, 0.05))
def test_pair_gradients_at_a_dominant_token(backend, dtype, T):
    """KL's and JS's gradient entry at a token holding nearly all of p (JS's dw: of q) within the
    target of the oracle relative to the row's largest gradient, with no allowance for the
    arithmetic on the terms (but for JS's near-log 2 terms, below). The direct formula
    p_j (eps_j - KL) / T is a difference of numbers
    of the size p_j (|eps_j| + KL) while the entry is of the order of the mass left to the other
    tokens: formed so, the float kernels returned -1.9e-6 for an exact 2.7e-9 (the row's largest
    entry; p_j = 1 - 1e-13) and 9.5e-6 for 8.1e-6, and the float64 kernels 4e-12 for 1e-17 at
    T = 0.01. The entry is now minus the sum of the row's others (the gradient rows sum to 0)
    where that is the more accurate: in the kernels and in the torch backend."""
    _ops._FORCE_TORCH[0] = backend == "torch"
    check_dominant_token_gradients(dtype, T)


def check_dominant_token_gradients(dtype, T, device="cpu"):
    """The body of test_pair_gradients_at_a_dominant_token, also run on the GPU kernels
    (tests/test_cuda.py)."""
    V = 200 if dtype != torch.float64 else 300
    z64, w64 = _dominant_rows(T, V, seed=int(100 * T) + 3)
    z = torch.stack([cast(r, dtype) for r in z64])
    w = torch.stack([cast(r, dtype) for r in w64])
    g = torch.from_numpy(StableRNG(11).uniform(z.shape[0], 0.5, 2.0))
    rel = 1e-12 if dtype == torch.float64 else 1e-5
    elem = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(dtype, 0.0)
    tiny = float(torch.finfo(dtype).tiny * torch.finfo(dtype).eps)
    gf = g.to(torch.float64 if dtype == torch.float64 else torch.float32)
    failures = []
    for func in ("kl", "js"):
        zz = z.clone().to(device).requires_grad_(True)
        ww = w.clone().to(device).requires_grad_(True)
        (getattr(trmath, func)(zz, ww, temperature=T) * gf.to(device)).sum().backward()
        refs = mp_grad_batch(func, z, w, temperature=T, grad_output=g)
        for k, (got, ref) in enumerate(zip((zz.grad.cpu(), ww.grad.cpu()), refs)):
            assert got.dtype == dtype
            r = np.asarray(ref, dtype=np.float64)
            err = np.abs(got.double().numpy() - r)
            allowed = rel * np.abs(r).max(-1, keepdims=True) + elem * np.abs(r) + tiny + ATOL
            if func == "js" and dtype != torch.float64:
                # JS's entries q_i (log(q_i/m_i) - KL(q||m)) where the other row is nearly a point
                # mass elsewhere: both terms lie near log 2, and log 2 - KL(q||m) carries the
                # float32 rounding of the summed KL terms, a few ulps of log 2 (up to 2e-5 of the
                # row's largest entry measured at T = 1, 1.2e-4 at T = 0.05): 16 float32 ulps of
                # (|g| / T) max_j q_j (p_j for d/dz), as the oracle tests allow every term.
                side = torch.softmax((z if k == 0 else w).double() / T, -1).amax(-1).numpy()
                allowed = allowed + (16 * 2.0**-23 * np.abs(g.numpy()) / T * side)[:, None]
            if (err > allowed).any():
                rows = np.unique(np.nonzero(err > allowed)[0]).tolist()
                worst = float((err / np.abs(r).max(-1, keepdims=True)).max())
                failures.append(f"d{func}/d{'zw'[k]}: rows {rows}, worst {worst:.3g} of the row max")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("T", (1.0, 0.7))
@pytest.mark.parametrize("V", (64, 1000, 5000))
def test_entropy_gradient_of_near_uniform_rows(V, T):
    """Near-uniform rows: -p (log p + H) cancels (log p and -H are both about -log V), so the
    gradient is far below its terms. The kernel forms log p + H as (z - M)/T - (log A - H), the
    row constant log A - H (from the forward's M, log A and H) kept as two floats; every entry is
    then within some 17 float32 ulps of the row's largest gradient: p's argument carries the
    forward's log-normaliser (float exponentials summed in double, a few 1e-7 absolute: up to ~7
    ulp of p), the exponential <= 2 ulp, the centred log-ratio (a subtraction, a scaling and the
    two parts of the constant) <= 4 ulp, g / T and the two products 3 ulp; 16.4 ulp seen over
    these rows (14.3 with the constant (lse - H) T, which lost all of log p + H on peaked rows),
    32 allowed. The log p + H formed after rounding log p left up to 4600 ulp (1.7e-4 relative at
    V = 1000, spread 1e-3)."""
    rng = StableRNG(V + int(10 * T))
    for spread in (1e-3, 1e-5, 1.0):
        z = torch.from_numpy(spread * rng.normal(3 * V).reshape(3, V)).to(torch.float32)
        g = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
        tokens = torch.tensor([0, V // 2, V - 1])
        ref = np.asarray(mp_grad_batch("entropy", z, temperature=T, grad_output=g), dtype=np.float64)
        bound = 32 * 2.0 ** -24 * np.abs(ref).max(-1, keepdims=True)
        for mode in ("entropy", "token_logprobs+entropy"):
            zz = z.clone().requires_grad_(True)
            if mode == "entropy":
                h = trmath.entropy(zz, temperature=T)
            else:
                _, h = trmath.token_logprobs(zz, tokens, temperature=T, return_entropy=True)
            (h * g.float()).sum().backward()
            err = np.abs(zz.grad.double().numpy() - ref)
            assert (err <= bound).all(), (mode, spread, float((err / bound).max()) * 32)


@pytest.mark.parametrize("dtype", tuple(GRAD_TOL), ids=_dname)
@pytest.mark.parametrize("func", PAIR)
def test_backward_log_ratios_in_bands_around_the_series_radii(func, dtype):
    """Rows whose log-ratios all lie in one band around 1/2 or 1 in magnitude, where the
    backward kernels switch between series and closed forms (the float lanes' JS series cover
    |x| < 1, KL's expm1 series |x| < 1): every vector takes one branch, or a mix, across the
    switch. Against mpmath, as test_backward_against_oracle."""
    failures = []
    for k, (lo, hi) in enumerate(((0.3, 0.7), (0.45, 0.55), (0.6, 0.99), (0.9, 1.1), (0.99, 1.01),
                                  (1.0, 1.6))):
        for V in (64, 300):
            rng = StableRNG(1000 * k + V)
            z = 2.0 * rng.normal(4 * V).reshape(4, V)
            mag = rng.uniform(4 * V, lo, hi).reshape(4, V)
            sign = np.where(rng.uniform(4 * V) < 0.5, -1.0, 1.0).reshape(4, V)
            z, w = cast(z, dtype), cast(z - sign * mag, dtype)
            g = torch.from_numpy(StableRNG(V + k).uniform(4, 0.5, 2.0))
            zz, ww = z.clone().requires_grad_(True), w.clone().requires_grad_(True)
            (getattr(trmath, func)(zz, ww) * g.float()).sum().backward()
            refs = mp_grad_batch(func, z, w, temperature=1.0, grad_output=g)
            scale = _term_scale(g, 1.0, z, w)
            for j, (a, r) in enumerate(zip((zz.grad, ww.grad), refs)):
                try:
                    _assert_grad_vs_oracle(a, r, dtype, f"d{func}/d{'zw'[j]} |x| in ({lo}, {hi}) V={V}",
                                           scale)
                except AssertionError as exc:
                    failures.append(str(exc))
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------
# masked tokens, NaN, and gradient sums
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32, torch.float64),
                         ids=_dname)
def test_masked_tokens_get_zero_gradient(dtype):
    z64 = np.array([[0.5, -INF, 2.0, -INF, 1.0], [1.0, 2.0, -INF, 0.0, -INF],
                    [-INF, 3.0, 0.0, 1.0, -INF]])
    w64 = np.array([[0.4, -INF, 2.5, 0.0, 1.0], [1.5, 2.0, 0.5, -INF, -INF],
                    [0.0, 3.0, 0.0, 1.0, -INF]])
    z, w = cast(z64, dtype), cast(w64, dtype)
    zmask, wmask = torch.isinf(z), torch.isinf(w)
    tokens = torch.tensor([0, 1, 3])
    for func in ("kl", "tv", "js", "logsumexp", "entropy", "token_logprobs+entropy"):
        # row 1 has q_3 = 0 < p_3: KL = +inf there, its z-gradient is undefined; use rows 0, 2
        rows = [0, 2] if func == "kl" else [0, 1, 2]
        zz = z[rows].clone().requires_grad_(True)
        ww = w[rows].clone().requires_grad_(True)
        if func in PAIR:
            getattr(trmath, func)(zz, ww).sum().backward()
            pairs = [(zz.grad, zmask[rows]), (ww.grad, wmask[rows])]
        elif func == "token_logprobs+entropy":
            lp, h = trmath.token_logprobs(zz, tokens[rows], return_entropy=True)
            (lp + h).sum().backward()
            pairs = [(zz.grad, zmask[rows])]
        else:
            getattr(trmath, func)(zz).sum().backward()
            pairs = [(zz.grad, zmask[rows])]
        for k, (grad, mask) in enumerate(pairs):
            assert grad.dtype == dtype, (func, grad.dtype)
            assert not torch.isnan(grad).any(), (func, k, grad)
            assert torch.isfinite(grad).all(), (func, k, grad)
            assert (grad[mask] == 0).all(), (func, k, grad)
            assert (grad[~mask] != 0).any(), (func, k, grad)


@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=_dname)
def test_gradients_sum_to_zero_over_the_vocabulary(dtype, backend):
    """Shift invariance: adding c to a row changes nothing, so sum_j dD/dz_j = 0 (and = g/T for
    logsumexp). Holds for every valid subgradient of TV too, including identical rows."""
    _ops._FORCE_TORCH[0] = backend == "torch"
    rng = StableRNG(3)
    V = 9
    z = rng.normal(4 * V).reshape(4, V)
    w = z + np.array([[0.3], [1e-3], [0.0], [0.0]]) * rng.normal(4 * V).reshape(4, V)
    w[3] = z[3] - 0.375  # the same distribution through an exact offset
    z, w = cast(z, dtype), cast(w, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for T in TEMPERATURES:
        for func in ("kl", "tv", "js", "logsumexp", "entropy", "token_logprobs+entropy"):
            zz = z.clone().requires_grad_(True)
            ww = w.clone().requires_grad_(True)
            if func in PAIR:
                getattr(trmath, func)(zz, ww, temperature=T).sum().backward()
                grads, expect = (zz.grad, ww.grad), (0.0, 0.0)
            elif func == "token_logprobs+entropy":
                lp, h = trmath.token_logprobs(zz, torch.tensor([0, 1, 2, 3]), temperature=T,
                                              return_entropy=True)
                (lp + h).sum().backward()
                grads, expect = (zz.grad,), (0.0,)
            else:
                getattr(trmath, func)(zz, temperature=T).sum().backward()
                grads = (zz.grad,)
                expect = (1.0 / T,) if func == "logsumexp" else (0.0,)
            # the log-ratio is formed in double from logits of size |z|/T: a few ulps of that
            # is the floor of any gradient entry's absolute error (e.g. where the exact
            # gradient is 0, identical distributions)
            floor = 16 * 2.0**-52 * (1.0 + float(z.abs().max()) / T)
            for k, (grad, e) in enumerate(zip(grads, expect)):
                s = grad.to(torch.float64).sum(-1)
                scale = grad.to(torch.float64).abs().sum(-1) + abs(e)
                bad = (s - e).abs() > tol * scale + floor
                assert not bad.any(), (
                    f"{backend} {func} T={T} d/d{'zw'[k]}: row sums {s.tolist()} != {e}; "
                    f"rows {torch.nonzero(bad).reshape(-1).tolist()}, grad {grad.tolist()}")


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
def _loss(z, w, tokens):
    return trmath.kl(z, w, temperature=0.7).mean() - trmath.token_logprobs(z, tokens).sum()


def _compile_available() -> str | None:
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is None or not dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    return None


@pytest.mark.parametrize(
    "backend",
    ["aot_eager",  # traces through the fake kernels and AOT autograd, no code generation
     pytest.param("inductor", marks=pytest.mark.slow)],  # generates C++: ~10 s on 2 cores
)
def test_torch_compile_fullgraph_matches_eager(backend):
    reason = _compile_available()
    if reason:
        pytest.skip(reason)
    rng = StableRNG(4)
    z = torch.from_numpy(rng.normal(3 * 50).reshape(3, 50)).float()
    w = z + 0.1 * torch.from_numpy(rng.normal(3 * 50).reshape(3, 50)).float()
    tokens = torch.tensor([1, 7, 49])

    def run(fn):
        zz = z.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        out = fn(zz, ww, tokens)
        out.backward()
        return out.detach(), zz.grad, ww.grad

    torch._dynamo.reset()
    eager = run(_loss)
    # No compile caches: a cached graph keyed without the custom op's fake kernel can outlive a
    # change of the op's output shapes (seen: stats of 6 columns cached, the op now returns 12).
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=True):
        compiled = run(torch.compile(_loss, fullgraph=True, backend=backend))
    for a, b in zip(eager, compiled):
        assert b is not None
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# 16-bit gradients: the float32 arithmetic, rounded once to nearest even
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ("cpp", "torch"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=_dname)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_kl_gradients_where_kl_is_infinite(backend, dtype, T):
    """A row with some q_i = 0 < p_i has KL = +inf: its z-gradient is undefined (NaN wherever
    p_j > 0, 0 at masked tokens), its w-gradient keeps the formula (q - p) / T (the oracle's
    convention; it came out [0, 0, -0.5, -0.5] for [0.25, 0.25, -0.25, -0.25]: the mass where
    q = 0 was missing from lse_p), and a row selected out of the loss (upstream gradient 0) gets
    0, so the other rows' gradients stay finite (0 * NaN poisoned them)."""
    _ops._FORCE_TORCH[0] = backend == "torch"
    rng = StableRNG(int(10 * T) + 31)
    V = 40
    z = rng.normal(3 * V).reshape(3, V)
    w = rng.normal(3 * V).reshape(3, V)
    w[0, 3::7] = -INF   # q = 0 where p > 0: KL = +inf
    w[1, :5] = -INF
    z[1, :2] = -INF     # and p = 0 at two of those tokens
    z, w = cast(z, dtype), cast(w, dtype)
    zz, ww = z.clone().requires_grad_(True), w.clone().requires_grad_(True)
    k = trmath.kl(zz, ww, temperature=T)
    assert bool(torch.isinf(k[:2]).all()) and bool(torch.isfinite(k[2]))
    g = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    (k[:2] * g[:2].to(k.dtype)).sum().backward(retain_graph=True)
    for r in range(2):
        dz_ref, dw_ref = mp_grad_kl(z[r], w[r], temperature=T, grad_output=float(g[r]))
        got_z = zz.grad[r].double().numpy()
        assert np.array_equal(np.isnan(got_z), np.isnan(dz_ref)), (r, got_z, dz_ref)
        assert np.all(got_z[~np.isnan(dz_ref)] == 0)
        # the accuracy targets (float64 1e-12, float32 1e-5 of the row's largest entry) and, for
        # bfloat16 gradients, their one rounding to bfloat16 (half an ulp, 2**-8 relative)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-8}[dtype]
        np.testing.assert_allclose(ww.grad[r].double().numpy(), dw_ref,
                                   rtol=tol, atol=tol * np.abs(dw_ref).max())
    zz.grad = ww.grad = None
    torch.where(torch.isfinite(k), k, torch.zeros_like(k)).sum().backward()
    assert bool((zz.grad[:2] == 0).all()) and bool((ww.grad[:2] == 0).all())
    assert bool(torch.isfinite(zz.grad[2]).all()) and bool((zz.grad[2] != 0).any())


def test_torch_compile_fullgraph_with_a_dynamic_temperature():
    """A compiled function called with a second temperature traces it as a dynamic float; its
    check (math.isfinite) broke the graph then. Values and gradients equal eager's, bitwise."""
    if _compile_available() is not None:
        pytest.skip(_compile_available())

    def f(z, w, T):
        return (trmath.kl(z, w, temperature=T) + trmath.js(z, w, temperature=T)
                + trmath.entropy(z, temperature=T)).sum()

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(4)
    z0, w = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    for T in (0.7, 0.9, 1.3):
        a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
        ref, got = f(a, w, T), cf(b, w, T)
        ref.backward()
        got.backward()
        assert torch.equal(ref, got) and torch.equal(a.grad, b.grad), T


def _grads(func, xs, g):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    if func in PAIR:
        out = getattr(trmath, func)(*xs, temperature=1.3)  # T != 1; g / T stays finite
    elif func == "token_logprobs":
        out = trmath.token_logprobs(xs[0], torch.arange(xs[0].shape[0]) % xs[0].shape[-1])
    else:
        out = getattr(trmath, func)(xs[0])
    out.backward(g)
    return [x.grad for x in xs]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("func", ["logsumexp", "entropy", "token_logprobs", *PAIR])
def test_16bit_gradients_are_float32_gradients_rounded_to_nearest_even(func, dtype):
    """A 16-bit input is widened exactly and computed in float32 like a float32 input, so its
    gradient must be the float32 input's gradient rounded once to the dtype (ties to even),
    bitwise -- the vectorised conversion included: every lane position and the row tail
    (V = 16384 + 21), upstream gradients from 1e-36 (16-bit subnormals and zeros) to past the
    dtype's largest finite value (the last row has one dominant token, where logsumexp's
    gradient rounds to infinity), and masked tokens (exactly zero)."""
    rng = StableRNG(11)
    N, V = 6, 16384 + 21
    masked = torch.from_numpy(rng.integers(0, V, V // 50))
    xs = []
    for _ in range(2 if func in PAIR else 1):
        x = torch.from_numpy(rng.normal(N * V).reshape(N, V) * 3).to(dtype)
        x[:, masked] = -INF  # the same tokens in both rows: finite divergences
        x[N - 1, 5] = 60.0
        xs.append(x)
    # float32 values above the largest bfloat16 (3.3895e38) from 3.3961e38, and float16 (65504)
    # from 65520, round to infinity
    big = 3.4e38 if dtype == torch.bfloat16 else 7e4
    g = torch.tensor([1e-36, 1e-8, 0.37, 1.0, 3e3, big], dtype=torch.float32)
    g16 = _grads(func, xs, g)
    g32 = _grads(func, [x.float() for x in xs], g)
    if func == "logsumexp":
        assert torch.isinf(g16[0][N - 1, 5]) and torch.isfinite(g32[0][N - 1, 5])
    for a, b in zip(g16, g32):
        assert a.dtype == dtype
        ref = b.to(dtype)
        assert not torch.isnan(ref).any()
        same = a.view(torch.int16) == ref.view(torch.int16)
        assert bool(same.all()), (
            f"{func}: {int((~same).sum())} of {same.numel()} gradients differ from the float32 "
            f"gradient rounded to {dtype}; first at {tuple(torch.nonzero(~same)[0].tolist())}: "
            f"{float(a[~same][0])} vs {float(ref[~same][0])} (float32 {float(b[~same][0])})")
