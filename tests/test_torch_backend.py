"""Tests of the pure-PyTorch backend ``trmath._torch_backend``.

Forwards are checked against mpmath at 50 digits on the exact distributions the inputs represent
(``|err| <= 1e-12 |value| + 1e-300`` for float64 inputs, ``1e-5 |value| + 1e-30`` otherwise), on
random, near-identical, peaked and masked rows and at several temperatures; backwards against
autograd of a plain float64 implementation and against finite differences (``gradcheck``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from trmath import _torch_backend as tb
except Exception:  # the package may not import without its compiled core
    _path = Path(__file__).resolve().parents[1] / "trmath" / "_torch_backend.py"
    _spec = importlib.util.spec_from_file_location("trmath_torch_backend_under_test", _path)
    assert _spec is not None and _spec.loader is not None
    tb = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = tb
    _spec.loader.exec_module(tb)

F64 = torch.float64
F32 = torch.float32
LN2 = math.log(2.0)
INF = math.inf

# tolerance table: (rtol, atol) by input dtype (TARGETS.md)
TOL = {
    torch.float64: (1e-12, 1e-300),
    torch.float32: (1e-5, 1e-30),
    torch.bfloat16: (1e-5, 1e-30),
    torch.float16: (1e-5, 1e-30),
}

#: worst relative error seen per (operation, dtype), for reporting
WORST: dict[tuple[str, str], float] = {}

PAIR_OPS = ("kl", "tv", "js")


# ------------------------------------------------------------------------------------------------
# mpmath oracle
# ------------------------------------------------------------------------------------------------

mpmath.mp.dps = 50


@pytest.fixture(autouse=True)
def _mp_precision():
    """Every reference here at 50 digits, whatever precision another module's test left set."""
    with mpmath.workdps(50):
        yield


def _mp_logprobs(row: Sequence[float], T: float) -> tuple[list[mpmath.mpf | None], mpmath.mpf]:
    """Exact log-probabilities of softmax(row / T) (None for masked tokens) and the normaliser."""
    t = mpmath.mpf(T)
    vals = [None if v == -INF else mpmath.mpf(v) for v in row]
    finite = [v for v in vals if v is not None]
    mx = max(finite)
    lse = mx / t + mpmath.log(mpmath.fsum(mpmath.exp((v - mx) / t) for v in finite))
    return [None if v is None else v / t - lse for v in vals], lse


def ref_lse(z: Sequence[float], T: float) -> mpmath.mpf:
    return _mp_logprobs(z, T)[1]


def ref_entropy(z: Sequence[float], T: float) -> mpmath.mpf:
    lp, _ = _mp_logprobs(z, T)
    return -mpmath.fsum(mpmath.exp(a) * a for a in lp if a is not None)


def ref_logprob(z: Sequence[float], tok: int, T: float) -> mpmath.mpf:
    a = _mp_logprobs(z, T)[0][tok]
    return mpmath.ninf if a is None else a


def _pq(z: Sequence[float], w: Sequence[float], T: float):
    lp, _ = _mp_logprobs(z, T)
    lq, _ = _mp_logprobs(w, T)
    return lp, lq


def ref_kl(z: Sequence[float], w: Sequence[float], T: float) -> mpmath.mpf:
    lp, lq = _pq(z, w, T)
    terms = []
    for a, b in zip(lp, lq):
        if a is None:
            continue
        if b is None:
            return mpmath.inf
        terms.append(mpmath.exp(a) * (a - b))
    return mpmath.fsum(terms)


def ref_tv(z: Sequence[float], w: Sequence[float], T: float) -> mpmath.mpf:
    lp, lq = _pq(z, w, T)
    p = [mpmath.mpf(0) if a is None else mpmath.exp(a) for a in lp]
    q = [mpmath.mpf(0) if b is None else mpmath.exp(b) for b in lq]
    return mpmath.fsum(max(a - b, 0) for a, b in zip(p, q))


def ref_js(z: Sequence[float], w: Sequence[float], T: float) -> mpmath.mpf:
    lp, lq = _pq(z, w, T)
    terms = []
    for a, b in zip(lp, lq):
        p = mpmath.mpf(0) if a is None else mpmath.exp(a)
        q = mpmath.mpf(0) if b is None else mpmath.exp(b)
        m = (p + q) / 2
        if p > 0:
            terms.append(p * mpmath.log(p / m) / 2)
        if q > 0:
            terms.append(q * mpmath.log(q / m) / 2)
    return mpmath.fsum(terms)


REF_PAIR: dict[str, Callable[..., mpmath.mpf]] = {"kl": ref_kl, "tv": ref_tv, "js": ref_js}


def _rows(x: torch.Tensor) -> list[list[float]]:
    """Exact values of the input rows as Python floats."""
    return x.to(F64).tolist()


def _check(name: str, dtype: torch.dtype, ours: torch.Tensor, refs: Sequence[mpmath.mpf]) -> float:
    """Assert ``|ours - ref| <= rtol |ref| + atol`` row by row; returns the worst relative error."""
    rtol, atol = TOL[dtype]
    vals = ours.to(F64).tolist()
    worst = 0.0
    bad = []
    for i, (o, r) in enumerate(zip(vals, refs)):
        if mpmath.isinf(r):
            if not (math.isinf(o) and (o > 0) == (r > 0)):
                bad.append((i, o, r))
            continue
        err = abs(mpmath.mpf(o) - r)
        if err > rtol * abs(r) + atol:
            bad.append((i, o, r))
        if r != 0:
            worst = max(worst, float(err / abs(r)))
    key = (name, str(dtype).replace("torch.", ""))
    WORST[key] = max(WORST.get(key, 0.0), worst)
    assert not bad, (
        f"{name} [{dtype}] rows off (row, ours, exact): {bad[:4]} (worst rel {worst:.3e})"
    )
    return worst


def _assert_allclose(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> None:
    """``|a - b| <= atol + rtol |b|`` elementwise (torch.testing is slow to import)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    err = (a - b).abs()
    ok = err <= atol + rtol * b.abs()
    assert bool(ok.all()), f"max abs err {err.max().item():.3e} at {int(err.argmax())}"


def _check_single(z: torch.Tensor, T: float, tokens: torch.Tensor | None = None) -> None:
    rows = _rows(z)
    dtype = z.dtype
    out_dtype = F64 if dtype == F64 else F32
    lse, st = tb.lse_forward(z, T)
    assert lse.dtype == out_dtype and st.dtype == F64 and st.shape == (z.shape[0], 4)
    _check("lse", dtype, lse, [ref_lse(r, T) for r in rows])
    h, st_h = tb.entropy_forward(z, T)
    assert h.dtype == out_dtype
    refs_h = [ref_entropy(r, T) for r in rows]
    _check("entropy", dtype, h, refs_h)
    _check("entropy.stats", F64 if dtype == F64 else F32, st_h[:, 1], refs_h)
    if tokens is None:
        tokens = torch.argmax(z.to(F64), dim=1)
    lp, h2, st2 = tb.token_logprobs_forward(z, tokens, T, True)
    assert lp.dtype == out_dtype and h2.dtype == out_dtype
    _check("token_logprobs", dtype, lp, [ref_logprob(r, int(t), T) for r, t in zip(rows, tokens)])
    _check("token_logprobs.entropy", dtype, h2, refs_h)
    lp0, h0, st0 = tb.token_logprobs_forward(z, tokens, T, False)
    assert torch.equal(lp0, lp) and torch.equal(h0, torch.zeros_like(h0))
    assert torch.equal(st0[:, 0], st2[:, 0]) and torch.equal(st0[:, 1], torch.zeros_like(st0[:, 1]))


def _check_pair(z: torch.Tensor, w: torch.Tensor, T: float, ops: Sequence[str] = PAIR_OPS) -> None:
    zr, wr = _rows(z), _rows(w)
    dtype = F64 if F64 in (z.dtype, w.dtype) else z.dtype
    for op in ops:
        out, st = getattr(tb, f"{op}_forward")(z, w, T)
        assert out.dtype == (F64 if dtype == F64 else F32) and st.dtype == F64
        assert st.shape == (z.shape[0], 6)
        _check(op, dtype, out, [REF_PAIR[op](a, b, T) for a, b in zip(zr, wr)])


# ------------------------------------------------------------------------------------------------
# single-input reductions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1.0, 0.7, 2.5])
def test_single_random(dtype: torch.dtype, T: float) -> None:
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(6, 11, generator=g, dtype=F64) * 3).to(dtype)
    tokens = torch.randint(0, 11, (6,), generator=g)
    _check_single(z, T, tokens)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("T", [1.0, 0.6])
def test_single_peaked(dtype: torch.dtype, T: float) -> None:
    """Logit spread 1e4; the arg-max log-probability is ~ -1e-9 and must keep its digits."""
    g = torch.Generator().manual_seed(2)
    z = -1e4 * torch.rand(5, 9, generator=g, dtype=F64)
    z[:, 0] = 0.0
    z[:, 1] = -20.0 - torch.rand(5, generator=g, dtype=F64)
    z[0, 1] = -1.0  # a mildly peaked row
    z = (z + 1234.5).to(dtype)
    _check_single(z, T, torch.zeros(5, dtype=torch.int64))
    _check_single(z, T, torch.full((5,), 1, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [F64, F32])
def test_single_masked(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 8, generator=g, dtype=F64) * 2
    z[0, [1, 5]] = -INF
    z[1, :7] = -INF  # a single live token: lse = z/T, H = 0
    z[2, 0] = -INF
    z = z.to(dtype)
    _check_single(z, 0.8, torch.tensor([0, 7, 3, 2]))
    lp, _, _ = tb.token_logprobs_forward(z, torch.tensor([1, 0, 0, 0]), 0.8, False)
    assert lp[0] == -INF and lp[1] == -INF and lp[2] == -INF
    h, _ = tb.entropy_forward(z, 0.8)
    assert h[1] == 0.0


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_single_log_probabilities_summing_to_one(T: float) -> None:
    """float64 log-probabilities whose probabilities sum to 1 - delta, delta down to 1e-26
    reached by deep cancellation (1 - p_max ~ 1e-9 against the others' mass), and two equal
    maxima: at T = 1 lse ~ -delta, and m/T + log1p(r) cancels; the flagged rows are summed again
    in double-double (lse was 0.0 for the first row, a relative error of 1)."""
    rows = []
    for eps, split in ((1.0865725966288572e-09, 1), (3e-7, 1), (2e-5, 3), (1e-12, 2)):
        rest = math.log(-math.expm1(-eps) / split)
        rows.append([-eps] + [rest] * split + [-INF] * (4 - split))
    rows.append([math.log(0.5), math.log(0.5), -INF, -INF, -INF])
    _check_single(torch.tensor(rows, dtype=F64), T, torch.zeros(len(rows), dtype=torch.int64))


def test_single_large_vocab() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 1500, generator=g, dtype=F64) * 4
    z[1, ::7] = -INF
    _check_single(z, 1.0)
    _check_single(z.to(F32), 1.3)


# ------------------------------------------------------------------------------------------------
# pair reductions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 0.7, 3.0])
def test_pair_random(dtype: torch.dtype, T: float) -> None:
    g = torch.Generator().manual_seed(5)
    z = (torch.randn(5, 10, generator=g, dtype=F64) * 3).to(dtype)
    w = (torch.randn(5, 10, generator=g, dtype=F64) * 3).to(dtype)
    _check_pair(z, w, T)


@pytest.mark.parametrize("offset", [0.0, 3.7, -1000.0])
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_pair_near_identical_f64(offset: float, T: float) -> None:
    """KL ~ 1e-12, with and without a constant logit offset between the two rows."""
    g = torch.Generator().manual_seed(6)
    z = torch.randn(6, 12, generator=g, dtype=F64) * 3
    w = z + offset + 1e-6 * torch.randn(6, 12, generator=g, dtype=F64)
    w[5] = z[5] + offset  # identical up to the offset's rounding
    kl = [float(ref_kl(a, b, T)) for a, b in zip(_rows(z), _rows(w))]
    assert max(kl[:5]) < 1e-11
    _check_pair(z, w, T)


@pytest.mark.parametrize("offset", [0.0, 5.0])
def test_pair_near_identical_f32(offset: float) -> None:
    """Rows a few float32 ulps apart: the textbook float32 formula has the wrong sign here."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 16, generator=g, dtype=F32) * 2
    w = (z + offset + 3e-7 * torch.randn(6, 16, generator=g, dtype=F32)).to(F32)
    _check_pair(z, w, 1.0)
    kl, _ = tb.kl_forward(z, w, 1.0)
    assert bool((kl >= 0).all())


def test_pair_identical_rows() -> None:
    z = torch.randn(3, 7, dtype=F64)
    for op in PAIR_OPS:
        out, _ = getattr(tb, f"{op}_forward")(z, z, 1.3)
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("T", [1.0, 0.5])
def test_pair_peaked(dtype: torch.dtype, T: float) -> None:
    g = torch.Generator().manual_seed(8)
    z = -1e4 * torch.rand(6, 9, generator=g, dtype=F64)
    z[:, 0] = 0.0
    z[:, 1] = -15.0 - torch.rand(6, generator=g, dtype=F64)
    w = z + 1e-4 * torch.randn(6, 9, generator=g, dtype=F64)  # near-identical, peaked
    w[3:] = -1e4 * torch.rand(3, 9, generator=g, dtype=F64)  # independent peaked rows
    w[3:, 2] = 0.0
    w[4, 0] = -3.0
    _check_pair(z.to(dtype), w.to(dtype), T)


def test_pair_peaked_offset_unresolved_dominant() -> None:
    """A dominant token whose log-ratio (~1e-93) is far below any resolution of the logits.

    TV (~1e-93) must come from the side of the small tokens, whose log-ratios are resolved.  The
    oracle needs 250 digits here: at T = 0.5, TV ~ 1e-180 sits under a dominant probability ~1.
    """
    z = (
        torch.tensor(
            [
                [0.0, -200.0, -201.0],
                [0.0, -200.0, -201.0],
                [5.0, -195.0, -198.5],
                [0.0, -3.0, -80.0],
            ],
            dtype=F64,
        )
        + 0.123456789
    )  # so that z - w is inexact under an offset
    d = torch.tensor(
        [[3.1e-7, 1e-6, -2e-6], [-2.7e-7, -1e-6, 3e-6], [1.3e-7, 1e-6, 1e-6], [0.0, 1e-7, 1e-6]],
        dtype=F64,
    )
    with mpmath.workdps(250):
        for offset in (1e4, -3e3, 0.0):
            w = z + offset + d
            _check_pair(z, w, 1.0)
            _check_pair(w, z, 1.0)
            _check_pair(z, w, 0.5, ops=("tv",))
        # the dominant token's log-ratio (~7e-27) is resolved only to ~1e-29: TV must be summed
        # over the side of the small token
        z = torch.tensor([[-INF, 9.09275882569726, -3.086288801921475]], dtype=F64)
        w = torch.tensor([[-INF, 10009.092758824705, 9996.913711198027]], dtype=F64)
        _check_pair(z, w, 0.3)
        _check_pair(w, z, 0.3)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_pair_masked(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(9)
    z = torch.randn(6, 8, generator=g, dtype=F64) * 2
    w = torch.randn(6, 8, generator=g, dtype=F64) * 2
    z[0, [1, 3]] = -INF  # p = 0 < q
    w[1, 2] = -INF  # q = 0 < p: KL = inf
    z[2, [0, 4]] = -INF  # both masked on some, p-only on another
    w[2, [0, 4, 6]] = -INF
    z[3, :4] = -INF  # disjoint supports: TV = 1, JS = log 2, KL = inf
    w[3, 4:] = -INF
    w[4] = z[4] + 1e-6 * torch.randn(8, generator=g, dtype=F64)  # near-identical, masked
    z[4, [2, 5]] = -INF
    w[4, [2, 5]] = -INF
    z[5, 1:] = -INF  # p is a point mass
    z, w = z.to(dtype), w.to(dtype)
    _check_pair(z, w, 0.9)
    kl, _ = tb.kl_forward(z, w, 0.9)
    tv, _ = tb.tv_forward(z, w, 0.9)
    js, _ = tb.js_forward(z, w, 0.9)
    assert kl[1] == INF and kl[3] == INF and math.isfinite(float(kl[0]))
    assert float(tv[3]) == 1.0
    assert abs(float(js[3]) - LN2) <= (4e-16 if dtype == F64 else 1e-7) * LN2


def test_pair_mixed_dtypes() -> None:
    g = torch.Generator().manual_seed(10)
    z = torch.randn(3, 6, generator=g, dtype=F32)
    w = torch.randn(3, 6, generator=g, dtype=F64)
    _check_pair(z, w, 1.0)
    zb = z.to(torch.bfloat16)
    out, _ = tb.kl_forward(zb, z, 1.0)
    assert out.dtype == F32


# ------------------------------------------------------------------------------------------------
# invariants (hypothesis)
# ------------------------------------------------------------------------------------------------


@st.composite
def _pair_rows(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, float]:
    v = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([F32, F64]))
    elems = st.floats(-60.0, 60.0, allow_nan=False, allow_infinity=False)
    z = torch.tensor(draw(st.lists(elems, min_size=v, max_size=v)), dtype=F64)
    scale = draw(st.sampled_from([0.0, 1e-9, 1e-7, 1e-4, 1.0, 30.0]))
    noise = torch.tensor(draw(st.lists(st.floats(-1, 1), min_size=v, max_size=v)), dtype=F64)
    w = z + draw(st.sampled_from([0.0, 2.5, -700.0])) + scale * noise
    zmask = torch.tensor(draw(st.lists(st.booleans(), min_size=v, max_size=v)))
    wmask = torch.tensor(draw(st.lists(st.booleans(), min_size=v, max_size=v)))
    if draw(st.booleans()):
        z = torch.where(zmask & ~zmask.all(), -INF, z)
        w = torch.where(wmask & ~wmask.all(), -INF, w)
    T = draw(st.sampled_from([1.0, 0.3, 2.0]))
    return z[None].to(dtype), w[None].to(dtype), T


@settings(max_examples=max(settings.default.max_examples, 100), deadline=None)
@given(_pair_rows())
def test_invariants(rows: tuple[torch.Tensor, torch.Tensor, float]) -> None:
    z, w, T = rows
    kl, kl_stats = tb.kl_forward(z, w, T)
    tv, _ = tb.tv_forward(z, w, T)
    js, _ = tb.js_forward(z, w, T)
    h, _ = tb.entropy_forward(z, T)
    assert not torch.isnan(kl).any() and not torch.isnan(tv).any() and not torch.isnan(js).any()
    assert (kl >= 0).all()
    assert ((tv >= 0) & (tv <= 1)).all()
    assert ((js >= 0) & (js <= LN2)).all()
    assert (h >= 0).all()
    # Pinsker, TV^2 <= KL/2, on the float64 KL of the stats; below TV = 1e-150 (float64) the
    # KL ~ TV^2 underflows, and float32 TV rounds to denormals below the 1e-30 floor of TARGETS.md
    tv64 = tv.to(F64)
    floor = 1e-150 if z.dtype == F64 else 1e-30
    assert ((tv64**2 <= kl_stats[:, 2] / 2 * (1 + 1e-5)) | (tv64 <= floor)).all()


def test_shift_invariance() -> None:
    """Adding a constant to a row changes nothing (the values below make the shifts exact)."""
    g = torch.Generator().manual_seed(11)
    z = torch.randint(-(2**22), 2**22, (4, 9), generator=g).to(F64) / 2**20
    w = z + torch.randint(-1000, 1000, (4, 9), generator=g).to(F64) / 2**36
    for op in PAIR_OPS:
        f = getattr(tb, f"{op}_forward")
        a, _ = f(z, w, 1.0)
        b, _ = f(z + 17.25, w - 3.125, 1.0)
        _assert_allclose(a, b, rtol=1e-12, atol=0.0)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------


def _safe_log_softmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(x, dim=-1)
    mask = x == -INF
    return torch.where(mask, torch.zeros_like(lp), lp), lp.exp(), mask


def naive(
    op: str, z: torch.Tensor, w: torch.Tensor | None, T: float, tok: torch.Tensor | None = None
):
    """Textbook float64 formulas, written so that masked tokens do not poison autograd."""
    lp, p, _ = _safe_log_softmax(z / T)
    if op == "lse":
        return torch.logsumexp(z / T, dim=-1)
    if op == "entropy":
        return -(p * lp).sum(-1)
    if op == "token_logprobs":
        assert tok is not None
        return torch.log_softmax(z / T, -1).gather(1, tok[:, None]).squeeze(1), -(p * lp).sum(-1)
    assert w is not None
    lq, q, _ = _safe_log_softmax(w / T)
    if op == "kl":
        return (p * (lp - lq)).sum(-1)
    if op == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    m = (p + q) / 2
    lm = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
    return 0.5 * (p * (lp - lm)).sum(-1) + 0.5 * (q * (lq - lm)).sum(-1)


class _SingleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, T: float, op: str) -> torch.Tensor:  # type: ignore[override]
        out, stats = getattr(tb, f"{op}_forward")(z, T)
        ctx.save_for_backward(z, stats)
        ctx.T, ctx.op = T, op
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        z, stats = ctx.saved_tensors
        return getattr(tb, f"{ctx.op}_backward")(g, z, stats, ctx.T), None, None


class _TokenFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, tok: torch.Tensor, T: float):  # type: ignore[override]
        lp, h, stats = tb.token_logprobs_forward(z, tok, T, True)
        ctx.save_for_backward(z, tok, stats)
        ctx.T = T
        return lp, h

    @staticmethod
    def backward(ctx, g_lp: torch.Tensor, g_h: torch.Tensor):  # type: ignore[override]
        z, tok, stats = ctx.saved_tensors
        return tb.token_logprobs_backward(g_lp, g_h, z, tok, stats, ctx.T), None, None


class _PairFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, z: torch.Tensor, w: torch.Tensor, T: float, op: str
    ) -> torch.Tensor:
        out, stats = getattr(tb, f"{op}_forward")(z, w, T)
        ctx.save_for_backward(z, w, stats)
        ctx.T, ctx.op = T, op
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        z, w, stats = ctx.saved_tensors
        dz, dw = getattr(tb, f"{ctx.op}_backward")(
            g, z, w, stats, ctx.T, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return dz, dw, None, None


def _ours(
    op: str, z: torch.Tensor, w: torch.Tensor | None, T: float, tok: torch.Tensor | None = None
):
    if op in ("lse", "entropy"):
        return _SingleFn.apply(z, T, op)
    if op == "token_logprobs":
        return _TokenFn.apply(z, tok, T)
    return _PairFn.apply(z, w, T, op)


ALL_OPS = ("lse", "entropy", "token_logprobs", *PAIR_OPS)


def _grads(fn, z: torch.Tensor, w: torch.Tensor, gs: Sequence[torch.Tensor]):
    z = z.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(z, w)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * g).sum() for o, g in zip(outs, gs))
    grads = torch.autograd.grad(loss, [z, w], allow_unused=True)
    return [torch.zeros_like(z) if x is None else x for x in grads]


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True])
def test_backward_vs_autograd(op: str, T: float, masked: bool) -> None:
    g = torch.Generator().manual_seed(12)
    z = torch.randn(5, 9, generator=g, dtype=F64) * 2
    w = torch.randn(5, 9, generator=g, dtype=F64) * 2
    w[1] = z[1] + 1e-3 * torch.randn(9, generator=g, dtype=F64)
    tok = torch.randint(0, 9, (5,), generator=g)
    if masked:
        z[0, [2, 4]] = -INF
        w[0, [2, 4]] = -INF
        z[2, 3] = -INF  # p = 0 < q
        z[3, 5] = -INF
        w[3, 5] = -INF
        tok[0] = 1
        tok[2] = 0
    gs = [torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)]
    mine = _grads(lambda a, b: _ours(op, a, b, T, tok), z, w, gs)
    ref = _grads(lambda a, b: naive(op, a, b, T, tok), z, w, gs)
    for a, b in zip(mine, ref):
        _assert_allclose(a, b, rtol=1e-9, atol=1e-13)
    assert (mine[0][z == -INF] == 0).all() and (mine[1][w == -INF] == 0).all()


@pytest.mark.parametrize("op", ALL_OPS)
def test_gradcheck(op: str) -> None:
    g = torch.Generator().manual_seed(13)
    z = (torch.randn(3, 6, generator=g, dtype=F64) * 1.5).requires_grad_(True)
    w = (torch.randn(3, 6, generator=g, dtype=F64) * 1.5).requires_grad_(True)
    tok = torch.tensor([0, 3, 5])
    if op in ("lse", "entropy"):
        assert torch.autograd.gradcheck(lambda a: _ours(op, a, None, 0.8), (z,))
    elif op == "token_logprobs":
        assert torch.autograd.gradcheck(lambda a: _ours(op, a, None, 0.8, tok), (z,))
    else:
        assert torch.autograd.gradcheck(lambda a, b: _ours(op, a, b, 0.8), (z, w))
        # one side only
        dz, dw = getattr(tb, f"{op}_backward")(
            torch.ones(3, dtype=F64),
            z.detach(),
            w.detach(),
            getattr(tb, f"{op}_forward")(z.detach(), w.detach(), 0.8)[1],
            0.8,
            True,
            False,
        )
        assert dz is not None and dw is None


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16])
def test_backward_dtypes(dtype: torch.dtype) -> None:
    z = torch.randn(3, 7).to(dtype)
    w = torch.randn(3, 7, dtype=F64)
    g = torch.ones(3, dtype=F32)
    _, st = tb.lse_forward(z, 1.0)
    assert tb.lse_backward(g, z, st, 1.0).dtype == dtype
    _, st = tb.entropy_forward(z, 1.0)
    assert tb.entropy_backward(g, z, st, 1.0).dtype == dtype
    tok = torch.zeros(3, dtype=torch.int64)
    _, _, st = tb.token_logprobs_forward(z, tok, 1.0, True)
    assert tb.token_logprobs_backward(g, g, z, tok, st, 1.0).dtype == dtype
    for op in PAIR_OPS:
        _, st = getattr(tb, f"{op}_forward")(z, w, 1.0)
        dz, dw = getattr(tb, f"{op}_backward")(g, z, w, st, 1.0, True, True)
        assert dz.dtype == dtype and dw.dtype == F64


# ------------------------------------------------------------------------------------------------
# chunking, strides, invalid rows, argument errors
# ------------------------------------------------------------------------------------------------


def _run_all(z: torch.Tensor, w: torch.Tensor, tok: torch.Tensor, T: float) -> list[torch.Tensor]:
    g = torch.linspace(-1, 1, z.shape[0], dtype=F64)
    res: list[torch.Tensor] = []
    for op in ("lse", "entropy"):
        out, st = getattr(tb, f"{op}_forward")(z, T)
        res += [out, st, getattr(tb, f"{op}_backward")(g, z, st, T)]
    lp, h, st = tb.token_logprobs_forward(z, tok, T, True)
    res += [lp, h, st, tb.token_logprobs_backward(g, g, z, tok, st, T)]
    for op in PAIR_OPS:
        out, st = getattr(tb, f"{op}_forward")(z, w, T)
        res += [out, st, *getattr(tb, f"{op}_backward")(g, z, w, st, T, True, True)]
    return res


def test_chunking_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(14)
    z = torch.randn(13, 10, generator=g, dtype=F64) * 3
    w = z + 1e-4 * torch.randn(13, 10, generator=g, dtype=F64)
    z[3, 2] = -INF
    w[5, 1] = -INF
    z[7, 0] = math.nan
    tok = torch.randint(0, 10, (13,), generator=g)
    base = _run_all(z, w, tok, 0.9)
    for elems in (1, 10, 25, 64, 1000):
        monkeypatch.setattr(tb, "_CHUNK_ELEMS", elems)
        for a, b in zip(base, _run_all(z, w, tok, 0.9)):
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def test_non_contiguous() -> None:
    g = torch.Generator().manual_seed(15)
    zt = torch.randn(9, 4, generator=g, dtype=F32)  # [V, N]
    wt = torch.randn(9, 4, generator=g, dtype=F32)
    z, w = zt.t(), wt.t()
    assert not z.is_contiguous()
    tok = torch.tensor([0, 1, 2, 3])
    for a, b in zip(_run_all(z, w, tok, 1.1), _run_all(z.contiguous(), w.contiguous(), tok, 1.1)):
        assert torch.equal(a, b)


def test_invalid_rows_nan() -> None:
    z = torch.randn(5, 6, dtype=F64)
    w = torch.randn(5, 6, dtype=F64)
    z[0, 2] = math.nan
    z[1, 4] = INF
    z[2] = -INF
    w[3, 0] = math.nan
    w[4, 1] = INF
    tok = torch.zeros(5, dtype=torch.int64)
    for op in ("lse", "entropy"):
        out, st = getattr(tb, f"{op}_forward")(z, 1.0)
        assert out[:3].isnan().all() and not out[3:].isnan().any()
        assert st[:3].isnan().all() and not st[3:].isnan().any()
        dz = getattr(tb, f"{op}_backward")(torch.ones(5, dtype=F64), z, st, 1.0)
        assert dz[:3].isnan().all() and not dz[3:].isnan().any()
    lp, h, st = tb.token_logprobs_forward(z, tok, 1.0, True)
    assert lp[:3].isnan().all() and h[:3].isnan().all() and st[:3].isnan().all()
    assert not lp[3:].isnan().any()
    for op in PAIR_OPS:
        out, st = getattr(tb, f"{op}_forward")(z, w, 1.0)
        assert out.isnan().all() and st.isnan().all()
        dz, dw = getattr(tb, f"{op}_backward")(torch.ones(5, dtype=F64), z, w, st, 1.0, True, True)
        assert dz.isnan().all() and dw.isnan().all()
        # rows 0-2: invalid p with a valid q; rows 3-4: valid p with an invalid q.  A valid pair
        # next to an invalid one is unaffected.
        zz = torch.cat([z[:1], w[:1]])
        ww = torch.cat([w[:1], z[3:4]])
        out, st = getattr(tb, f"{op}_forward")(zz, ww, 1.0)
        assert out[0].isnan() and not st[1].isnan().any()
        assert out[1] == getattr(tb, f"{op}_forward")(zz[1:], ww[1:], 1.0)[0][0]


def test_token_out_of_range_nan() -> None:
    z = torch.randn(3, 5, dtype=F64)
    tok = torch.tensor([-1, 5, 2])
    lp, _, st = tb.token_logprobs_forward(z, tok, 1.0, False)
    assert lp[:2].isnan().all() and not lp[2].isnan()
    dz = tb.token_logprobs_backward(torch.ones(3, dtype=F64), None, z, tok, st, 1.0)
    assert dz[:2].isnan().all() and not dz[2].isnan().any()


def test_empty_shapes() -> None:
    z = torch.zeros(0, 5)
    out, st = tb.kl_forward(z, z, 1.0)
    assert out.shape == (0,) and st.shape == (0, 6)
    z = torch.zeros(2, 0)
    out, st = tb.lse_forward(z, 1.0)
    assert out.isnan().all() and st.shape == (2, 4)
    out, st = tb.js_forward(z, z, 1.0)
    assert out.isnan().all()


def test_argument_errors() -> None:
    z = torch.randn(2, 3)
    with pytest.raises(ValueError):
        tb.lse_forward(torch.randn(3), 1.0)
    with pytest.raises(ValueError):
        tb.kl_forward(torch.randn(2, 3, 4), torch.randn(2, 3, 4), 1.0)
    with pytest.raises(TypeError):
        tb.entropy_forward(torch.ones(2, 3, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError):
        tb.lse_forward(z.numpy(), 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tb.tv_forward(z, torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError):
        tb.lse_forward(z, 0.0)
    with pytest.raises(TypeError):
        tb.token_logprobs_forward(z, torch.zeros(2), 1.0, False)
    with pytest.raises(ValueError):
        tb.token_logprobs_forward(z, torch.zeros(3, dtype=torch.int64), 1.0, False)
    _, st = tb.kl_forward(z, z, 1.0)
    with pytest.raises(ValueError):
        tb.kl_backward(torch.ones(2), z, z, st[:, :2], 1.0, True, True)
    with pytest.raises(ValueError):
        tb.kl_backward(torch.ones(3), z, z, st, 1.0, True, True)
