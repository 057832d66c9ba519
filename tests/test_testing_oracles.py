"""Tests of the verification package itself: oracles, strategies and assertions.

The oracles are checked against (a) plain float64 NumPy on benign rows, (b) closed forms, (c) an
independent, deliberately naive mpmath implementation at high precision (also used, through
numerical differentiation, to check the gradient oracles) and (d) their documented edge cases.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from trmath.testing import (
    DTYPES,
    PAIR_FAMILIES,
    ROW_FAMILIES,
    StableRNG,
    adversarial_batch,
    adversarial_pairs,
    adversarial_rows,
    as_float64,
    assert_close_to_reference,
    batches,
    cast,
    logit_rows,
    max_relative_error,
    mp_batch,
    mp_entropy,
    mp_grad_batch,
    mp_grad_entropy,
    mp_grad_js,
    mp_grad_kl,
    mp_grad_logsumexp,
    mp_grad_token_logprob,
    mp_grad_tv,
    mp_js,
    mp_kl,
    mp_log_softmax,
    mp_logsumexp,
    mp_softmax,
    mp_token_logprob,
    mp_tv,
    row_and_token,
    row_pairs,
    target_tolerance,
    temperatures,
    ulps,
)

FAST = settings(max_examples=20, deadline=None, derandomize=True)


# --------------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------------
def np_reference(z: np.ndarray, w: np.ndarray, T: float) -> dict[str, float]:
    """Textbook float64 formulas (fine on benign rows)."""
    a, b = z / T, w / T
    lse_p = a.max() + np.log(np.sum(np.exp(a - a.max())))
    lse_q = b.max() + np.log(np.sum(np.exp(b - b.max())))
    lp, lq = a - lse_p, b - lse_q
    p, q = np.exp(lp), np.exp(lq)
    m = (p + q) / 2
    return {
        "lse": lse_p,
        "entropy": -np.sum(p * lp),
        "token0": lp[0],
        "kl": np.sum(p * (lp - lq)),
        "tv": 0.5 * np.sum(np.abs(p - q)),
        "js": 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)),
    }


def naive_mp(z, w=None, T=1, dps=60):
    """Direct mpmath formulas on lists of numbers (mpf or float); -inf means p = 0."""
    with mpmath.workdps(dps):
        T = mpmath.mpf(T)

        def dist(x):
            e = [mpmath.exp(mpmath.mpf(v) / T) if v != -math.inf else mpmath.mpf(0) for v in x]
            s = mpmath.fsum(e)
            return [v / s for v in e], mpmath.log(s)

        p, lse = dist(z)
        out = {"lse": lse, "entropy": -mpmath.fsum(x * mpmath.log(x) for x in p if x), "p": p}
        if w is not None:
            q, _ = dist(w)
            if any(pi and not qi for pi, qi in zip(p, q)):
                out["kl"] = mpmath.inf
            else:
                out["kl"] = mpmath.fsum(pi * mpmath.log(pi / qi) for pi, qi in zip(p, q) if pi)
            out["tv"] = mpmath.fsum(abs(pi - qi) for pi, qi in zip(p, q)) / 2
            m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
            out["js"] = (mpmath.fsum(pi * mpmath.log(pi / mi) for pi, mi in zip(p, m) if pi)
                         + mpmath.fsum(qi * mpmath.log(qi / mi) for qi, mi in zip(q, m) if qi)) / 2
        return out


def assert_mp_close(a, b, digits: int = 45):
    with mpmath.workdps(80):
        rel = mpmath.mpf(10) ** -digits
        if a == b:
            return
        assert abs(a - b) <= rel * abs(b), (a, b)


def rows(seed: int, V: int, scale: float = 1.0) -> np.ndarray:
    return scale * np.random.default_rng(seed).standard_normal(V)


# --------------------------------------------------------------------------------------------
# value oracles
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1.0, 0.7, 2.5])
@pytest.mark.parametrize("seed", range(4))
def test_benign_rows_match_float64(seed: int, T: float) -> None:
    V = 3 + 11 * seed
    z, w = rows(seed, V), rows(100 + seed, V)
    ref = np_reference(z, w, T)
    got = {
        "lse": mp_logsumexp(z, T),
        "entropy": mp_entropy(z, T),
        "token0": mp_token_logprob(z, 0, T),
        "kl": mp_kl(z, w, T),
        "tv": mp_tv(z, w, T),
        "js": mp_js(z, w, T),
    }
    for k, v in got.items():
        assert isinstance(v, mpmath.mpf)
        assert float(v) == pytest.approx(ref[k], rel=1e-12, abs=1e-15), k


@pytest.mark.parametrize("V", [1, 2, 7, 1000])
def test_uniform_rows(V: int) -> None:
    z = np.full(V, 3.25)
    with mpmath.workdps(60):
        log_v = mpmath.log(V)
        assert_mp_close(mp_logsumexp(z), 3.25 + log_v)
        assert_mp_close(mp_logsumexp(z, 0.5), 6.5 + log_v)
        assert_mp_close(mp_entropy(z, 0.3), log_v)
        assert_mp_close(mp_token_logprob(z, V - 1), -log_v)
        # masking half of the row leaves a uniform distribution on the rest
        masked = z.copy()
        masked[: V // 2] = -np.inf
        k = V - V // 2
        assert_mp_close(mp_entropy(masked), mpmath.log(k))
        assert_mp_close(mp_logsumexp(masked), 3.25 + mpmath.log(k))
    if V == 1:
        assert mp_entropy(z) == 0 and mp_token_logprob(z, 0) == 0


@pytest.mark.parametrize("x, y", [(0.3, -1.2), (5.0, 4.999), (-20.0, 3.0), (1e-3, 2e-3)])
def test_two_point_closed_forms(x: float, y: float) -> None:
    z, w = np.array([0.0, x]), np.array([0.0, y])
    with mpmath.workdps(70):
        a = 1 / (1 + mpmath.exp(-mpmath.mpf(x)))  # p_1
        b = 1 / (1 + mpmath.exp(-mpmath.mpf(y)))  # q_1
        kl = a * mpmath.log(a / b) + (1 - a) * mpmath.log((1 - a) / (1 - b))
        ma, mb = (a + b) / 2, 1 - (a + b) / 2
        js = (a * mpmath.log(a / ma) + (1 - a) * mpmath.log((1 - a) / mb)
              + b * mpmath.log(b / ma) + (1 - b) * mpmath.log((1 - b) / mb)) / 2
        assert_mp_close(mp_kl(z, w), kl)
        assert_mp_close(mp_tv(z, w), abs(a - b))
        assert_mp_close(mp_js(z, w), js)
        assert_mp_close(mp_entropy(z), -a * mpmath.log(a) - (1 - a) * mpmath.log(1 - a))


def test_disjoint_supports() -> None:
    z = np.array([0.0, 1.0, -np.inf, -np.inf])
    w = np.array([-np.inf, -np.inf, 2.0, -3.0])
    assert mp_tv(z, w) == 1
    assert mp_kl(z, w) == mpmath.inf and mp_kl(w, z) == mpmath.inf
    with mpmath.workdps(60):
        assert_mp_close(mp_js(z, w), mpmath.log(2))


def test_masked_entries_are_removed() -> None:
    z = np.array([0.3, -np.inf, 1.5, -0.2, -np.inf])
    w = np.array([1.0, -np.inf, -0.5, 0.25, -np.inf])
    keep = np.isfinite(z)
    for f in (mp_kl, mp_tv, mp_js):
        assert f(z, w, 0.9) == f(z[keep], w[keep], 0.9)
    assert mp_entropy(z) == mp_entropy(z[keep])
    assert mp_logsumexp(z) == mp_logsumexp(z[keep])
    assert mp_token_logprob(z, 1) == -mpmath.inf
    # p_i = 0 < q_i is finite; q_i = 0 < p_i is infinite
    w2 = w.copy()
    w2[1] = 0.7
    assert mpmath.isfinite(mp_kl(z, w2))
    w3 = w.copy()
    w3[2] = -np.inf
    assert mp_kl(z, w3) == mpmath.inf
    ref = naive_mp(z.tolist(), w2.tolist())
    assert_mp_close(mp_kl(z, w2), ref["kl"])
    assert_mp_close(mp_js(z, w2), ref["js"])


@pytest.mark.parametrize("kind", ["nan", "posinf", "all_masked", "empty", "2d"])
def test_invalid_rows_raise(kind: str) -> None:
    good = np.array([0.0, 1.0, 2.0])
    bad = {
        "nan": np.array([0.0, np.nan, 1.0]),
        "posinf": np.array([0.0, np.inf, 1.0]),
        "all_masked": np.full(3, -np.inf),
        "empty": np.zeros(0),
        "2d": np.zeros((2, 3)),
    }[kind]
    with pytest.raises(ValueError):
        mp_entropy(bad)
    with pytest.raises(ValueError):
        mp_logsumexp(bad)
    if kind != "empty" and kind != "2d":
        with pytest.raises(ValueError, match="w"):
            mp_kl(good, bad)
        with pytest.raises(ValueError, match="z"):
            mp_tv(bad, good)
        with pytest.raises(ValueError):
            mp_grad_js(bad, good)


def test_invalid_arguments_raise() -> None:
    z = np.array([0.0, 1.0])
    for T in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            mp_entropy(z, T)
    with pytest.raises(ValueError, match="token"):
        mp_token_logprob(z, 2)
    with pytest.raises(ValueError, match="token"):
        mp_token_logprob(z, -1)
    with pytest.raises(ValueError, match="shape"):
        mp_kl(z, np.zeros(3))
    with pytest.raises(ValueError, match="valid names"):
        mp_batch("klx", z[None], z[None])


def test_same_distribution_is_exactly_zero() -> None:
    z = np.array([0.5, -1.25, 3.0, -np.inf, 0.0])
    for w in (z, z + 8.0, z - 0.375):
        for f in (mp_kl, mp_tv, mp_js):
            assert f(z, w) == 0
            assert f(z, w, 0.7) == 0


@pytest.mark.parametrize("noise", [1e-15, 1e-9, 1e-4])
@pytest.mark.parametrize("T", [1.0, 0.3])
def test_near_identical_rows_against_naive_mpmath(noise: float, T: float) -> None:
    z = rows(7, 9, 2.0)
    w = z + noise * rows(8, 9)
    ref = naive_mp(z.tolist(), w.tolist(), T, dps=120)
    for name, f in (("kl", mp_kl), ("tv", mp_tv), ("js", mp_js)):
        got = f(z, w, T)
        assert got > 0
        assert_mp_close(got, ref[name])


def test_peaked_rows_keep_relative_accuracy() -> None:
    # tails of e^-1000: results far below float64's range must still carry all digits
    z = np.array([0.0, -1000.0, -1001.5, -999.0])
    w = np.array([0.0, -1000.0 + 1e-9, -1001.5, -999.0 - 2e-9])
    ref = naive_mp(z.tolist(), w.tolist(), dps=2100)
    for name, f in (("kl", mp_kl), ("tv", mp_tv), ("js", mp_js)):
        got = f(z, w)
        assert 0 < got < mpmath.mpf(10) ** -400
        assert_mp_close(got, ref[name])
    assert_mp_close(mp_entropy(z), naive_mp(z.tolist(), dps=1200)["entropy"])


def test_precision_keyword() -> None:
    z, w = rows(1, 5), rows(2, 5)
    hi = mp_kl(z, w, dps=100)
    lo = mp_kl(z, w, dps=20)
    with mpmath.workdps(120):
        assert abs(hi - lo) < mpmath.mpf(10) ** -19 * hi
        assert abs(hi - naive_mp(z.tolist(), w.tolist(), dps=130)["kl"]) < mpmath.mpf(10) ** -99


def test_low_precision_inputs_are_read_exactly() -> None:
    z64 = rows(3, 6)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        t = torch.tensor(z64, dtype=dt)
        exact = t.to(torch.float64).numpy()
        assert np.array_equal(as_float64(t), exact)
        assert mp_entropy(t) == mp_entropy(exact)
        assert mp_entropy(t) != mp_entropy(z64)


def test_softmax_helpers() -> None:
    z = np.array([0.0, 1.0, -np.inf])
    p = mp_softmax(z)
    assert p[2] == 0 and p.sum() == pytest.approx(1.0, abs=1e-16)
    assert mp_log_softmax(z)[2] == -np.inf
    assert mp_log_softmax(z)[1] == pytest.approx(-math.log1p(math.exp(-1.0)), rel=1e-15)


# --------------------------------------------------------------------------------------------
# batched helpers
# --------------------------------------------------------------------------------------------
def test_mp_batch_shapes_and_modes() -> None:
    z = np.stack([rows(i, 7) for i in range(6)]).reshape(2, 3, 7)
    w = np.stack([rows(10 + i, 7) for i in range(6)]).reshape(2, 3, 7)
    vals, objs = mp_batch("kl", z, w, temperature=0.8, return_mpf=True)
    assert vals.shape == (2, 3) and vals.dtype == np.float64 and objs.shape == (2, 3)
    assert vals[1, 2] == float(mp_kl(z[1, 2], w[1, 2], 0.8))
    assert isinstance(objs[0, 0], mpmath.mpf)
    tokens = np.array([[0, 6, 3], [1, 2, 5]])
    lp = mp_batch("token_logprobs", z, tokens=tokens)
    assert lp[1, 2] == float(mp_token_logprob(z[1, 2], 5))
    z_bad = z.copy()
    z_bad[0, 1] = -np.inf
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mp_batch("entropy", z_bad)
    h = mp_batch(mp_entropy, z_bad, invalid="nan")
    assert np.isnan(h[0, 1]) and np.isfinite(h[1, 1])


def test_mp_grad_batch() -> None:
    z = np.stack([rows(i, 5) for i in range(3)])
    w = np.stack([rows(20 + i, 5) for i in range(3)])
    g = np.array([1.0, -2.0, 0.5])
    dz, dw = mp_grad_batch("kl", z, w, grad_output=g, temperature=0.9)
    assert dz.shape == z.shape and dw.shape == w.shape
    ref_z, ref_w = mp_grad_kl(z[1], w[1], 0.9, grad_output=-2.0)
    assert np.array_equal(dz[1], ref_z) and np.array_equal(dw[1], ref_w)
    d = mp_grad_batch("token_logprobs", z, tokens=np.array([0, 4, 2]))
    assert d.shape == z.shape and np.array_equal(d[1], mp_grad_token_logprob(z[1], 4))


# --------------------------------------------------------------------------------------------
# gradient oracles against numerical differentiation of the naive mpmath formulas
# --------------------------------------------------------------------------------------------
def _numeric_grad(fn, x: list, j: int) -> float:
    """Central difference with step 1e-25 at 60 digits: error ~1e-35 relative."""
    with mpmath.workdps(60):
        h = mpmath.mpf(10) ** -25

        def f(s):
            y = [mpmath.mpf(v) if v != -math.inf else v for v in x]
            y[j] = y[j] + s
            return fn(y)

        return float((f(h) - f(-h)) / (2 * h))


GRAD_CASES = [
    (np.array([0.3, -1.1, 2.0, 0.4]), np.array([1.0, 0.2, -0.5, 0.0]), 1.0),
    (np.array([0.3, -np.inf, 2.0, 0.4, -0.7]), np.array([1.0, 0.2, -0.5, 0.0, 0.9]), 0.7),
    (np.array([5.0, -1.0, 0.25]), np.array([5.0, -1.0 + 1e-3, 0.25 - 2e-3]), 1.8),
]


@pytest.mark.parametrize("z, w, T", GRAD_CASES)
def test_pair_gradients_match_numerical_derivatives(z, w, T) -> None:
    g = -1.5
    for name, grad_fn in (("kl", mp_grad_kl), ("tv", mp_grad_tv), ("js", mp_grad_js)):
        dz, dw = grad_fn(z, w, T, grad_output=g)
        assert dz.dtype == np.float64 and dz.shape == z.shape

        def of_z(y, n=name):
            return naive_mp(y, w.tolist(), T)[n]

        def of_w(y, n=name):
            return naive_mp(z.tolist(), y, T)[n]

        for j in range(z.size):
            if np.isfinite(z[j]):
                num = g * _numeric_grad(of_z, z.tolist(), j)
                assert dz[j] == pytest.approx(num, rel=1e-12, abs=1e-300), (name, "z", j)
            else:
                assert dz[j] == 0
            if np.isfinite(w[j]):
                num = g * _numeric_grad(of_w, w.tolist(), j)
                assert dw[j] == pytest.approx(num, rel=1e-12, abs=1e-300), (name, "w", j)


@pytest.mark.parametrize("z, T", [(GRAD_CASES[0][0], 1.0), (GRAD_CASES[1][0], 0.6)])
def test_single_row_gradients_match_numerical_derivatives(z, T) -> None:
    g = 0.75
    dl = mp_grad_logsumexp(z, T, grad_output=g)
    dh = mp_grad_entropy(z, T, grad_output=g)
    dt = mp_grad_token_logprob(z, 2, T, grad_output=g)
    for j in range(z.size):
        if not np.isfinite(z[j]):
            assert dl[j] == 0 and dh[j] == 0 and dt[j] == 0
            continue
        lse = _numeric_grad(lambda y: naive_mp(y, None, T)["lse"], z.tolist(), j)
        ent = _numeric_grad(lambda y: naive_mp(y, None, T)["entropy"], z.tolist(), j)
        tok = _numeric_grad(lambda y: mpmath.log(naive_mp(y, None, T)["p"][2]), z.tolist(), j)
        assert dl[j] == pytest.approx(g * lse, rel=1e-12)
        assert dh[j] == pytest.approx(g * ent, rel=1e-12)
        assert dt[j] == pytest.approx(g * tok, rel=1e-12)


def test_gradient_edge_cases() -> None:
    z = np.array([0.0, 1.0, 2.0])
    w = np.array([0.0, -np.inf, 2.0])
    dz, dw = mp_grad_kl(z, w)  # KL = +inf: dz undefined, dw = q - p
    assert np.isnan(dz).all()
    assert dw == pytest.approx(mp_softmax(w) - mp_softmax(z), rel=1e-15)
    dz, dw = mp_grad_tv(z, z + 1.0)  # identical distributions: every sign is 0
    assert not dz.any() and not dw.any()
    dz, dw = mp_grad_js(z, z)
    assert not dz.any() and not dw.any()


# --------------------------------------------------------------------------------------------
# strategies and generators
# --------------------------------------------------------------------------------------------
def _check_row(x, dtype, min_v=1, max_v=None) -> np.ndarray:
    if dtype is None:
        assert isinstance(x, np.ndarray) and x.dtype == np.float64
    else:
        assert isinstance(x, torch.Tensor) and x.dtype == getattr(torch, dtype)
    a = as_float64(x)
    assert not np.isnan(a).any() and not (a == np.inf).any()
    assert np.isfinite(a).any(axis=-1).all(), "a row is entirely -inf"
    assert a.shape[-1] >= min_v and (max_v is None or a.shape[-1] <= max_v)
    return a


@pytest.mark.parametrize("dtype", [None, *DTYPES])
def test_logit_rows_strategy(dtype) -> None:
    @FAST
    @given(logit_rows(1, 40, dtype=dtype))
    def check(z):
        _check_row(z, dtype, 1, 40)
        mp_entropy(z, dps=20)  # the oracle accepts every generated row

    check()


@pytest.mark.parametrize("family", PAIR_FAMILIES)
@pytest.mark.parametrize("dtype", [None, "bfloat16", "float16"])
def test_row_pairs_strategy(family, dtype) -> None:
    @settings(max_examples=8, deadline=None, derandomize=True)
    @given(row_pairs(1, 24, dtype=dtype, family=family), temperatures())
    def check(pair, T):
        z, w = pair
        a, b = _check_row(z, dtype, 1, 24), _check_row(w, dtype, 1, 24)
        assert a.shape == b.shape
        tv, js = mp_tv(z, w, T, dps=20), mp_js(z, w, T, dps=20)
        with mpmath.workdps(30):  # JS may round up to log 2 at 20 digits
            assert 0 <= tv <= 1 and 0 <= js <= mpmath.log(2) * (1 + mpmath.mpf(10) ** -19)
        assert mp_kl(z, w, T, dps=20) >= 0

    check()


def test_row_pairs_finite_kl_option() -> None:
    @FAST
    @given(row_pairs(2, 30, family="masked", allow_infinite_kl=False))
    def check(pair):
        z, w = pair
        assert not (np.isfinite(z) & ~np.isfinite(w)).any()

    check()


def test_masked_pairs_reach_infinite_kl() -> None:
    items = adversarial_pairs(16, 40, seed=3, families="masked")
    kls = [mp_kl(it.z, it.w, dps=15) for it in items]
    assert any(k == mpmath.inf for k in kls) and any(mpmath.isfinite(k) for k in kls)


def test_near_pairs_reach_tiny_kl_after_casting() -> None:
    items = adversarial_pairs(64, 24, seed=1, dtype="float32", families="near")
    kls = [float(mp_kl(it.z, it.w, dps=15)) for it in items]
    assert min(k for k in kls if k > 0) < 1e-11


def test_row_and_token_and_batches() -> None:
    @FAST
    @given(row_and_token(1, 30, dtype="float32"), batches(1, 5, 1, 70, dtype="bfloat16"),
           batches(1, 4, 1, 50, pairs=True))
    def check(row_token, batch, pair_batch):
        z, t = row_token
        assert np.isfinite(as_float64(z)[t])
        b = _check_row(batch, "bfloat16")
        assert b.ndim == 2 and 1 <= b.shape[0] <= 5
        bz, bw = pair_batch
        assert bz.shape == bw.shape and bz.ndim == 2 and bz.shape[0] <= 4
        _check_row(bz, None)

    check()


def test_adversarial_generators_are_deterministic() -> None:
    a = adversarial_pairs(33, 10, seed=42, dtype="bfloat16")
    b = adversarial_pairs(33, 4, seed=42, dtype="bfloat16")  # item i does not depend on n
    for x, y in zip(a, b):
        assert x.family == y.family and x.params == y.params
        assert torch.equal(x.z, y.z) and torch.equal(x.w, y.w)
    assert {it.family for it in a} == set(PAIR_FAMILIES)
    rows_ = adversarial_rows(17, 10, seed=5)
    assert {r.family for r in rows_} == set(ROW_FAMILIES) - {"elements"}
    for r in rows_:
        _check_row(r.z, None, 17, 17)
    labels, z, w = adversarial_batch(7, 129, seed=9, dtype="float16")
    assert len(labels) == 7 and z.shape == (7, 129) and w.dtype == torch.float16
    _check_row(z, "float16")
    with pytest.raises(ValueError, match="valid families"):
        adversarial_pairs(4, 2, families="bogus")


def test_stable_rng_matches_splitmix64() -> None:
    # reference values of SplitMix64 with seed 0
    assert StableRNG(0).next_u64(2).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    r = StableRNG(123)
    u = r.uniform(1000)
    assert ((0 <= u) & (u < 1)).all()
    n = StableRNG(7).normal(20000)
    assert abs(n.mean()) < 0.05 and abs(n.std() - 1) < 0.05 and np.abs(n).max() <= 6


def test_cast_keeps_rows_valid() -> None:
    x = np.array([1e6, -1e6, -np.inf, 0.1])
    t = cast(x, "float16")
    assert t.dtype == torch.float16 and torch.isfinite(t[:2]).all() and t[2] == -math.inf
    assert cast(x, None) is not None and cast(x, None).dtype == np.float64
    with pytest.raises(ValueError):
        cast(x, "int8")


# --------------------------------------------------------------------------------------------
# assertions
# --------------------------------------------------------------------------------------------
def test_assert_close_passes_and_handles_specials() -> None:
    ref = np.array([1.0, np.inf, -np.inf, np.nan, 0.0])
    act = np.array([1.0 + 1e-7, np.inf, -np.inf, np.nan, 1e-31])
    assert_close_to_reference(act, ref, rtol=1e-6, atol=1e-30)
    assert_close_to_reference(torch.tensor(act, dtype=torch.float32)[:3], ref[:3],
                              rtol=1e-6, atol=0)
    objs = np.array([mpmath.mpf(2), mpmath.mpf("0.5")], dtype=object)
    assert_close_to_reference([2.0, 0.5], objs, rtol=0, atol=0)


@pytest.mark.parametrize(
    "act",
    [[1.0, 2.0, np.nan], [1.0, 2.0, np.inf], [1.0, 2.1, 3.0], [1.0, 2.0, -np.inf]],
)
def test_assert_close_failures(act) -> None:
    ref = np.array([1.0, 2.0, 3.0])
    with pytest.raises(AssertionError):
        assert_close_to_reference(np.array(act), ref, rtol=1e-3, atol=0)


def test_assert_close_message_lists_worst_points_and_inputs() -> None:
    ref = np.arange(1.0, 9.0).reshape(2, 4)
    act = ref.copy()
    act[1, 2] *= 1.5
    act[0, 1] *= 1.01
    z = np.zeros((2, 4, 5))
    z[1, 2, 3] = -np.inf
    with pytest.raises(AssertionError) as info:
        assert_close_to_reference(act, ref, rtol=1e-3, atol=0, inputs=z, name="kl")
    msg = str(info.value)
    assert msg.startswith("kl: 2 of 8 values")
    assert msg.index("[1, 2]") < msg.index("[0, 1]")  # worst first
    assert "V=5" in msg and "1 x -inf" in msg
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(np.zeros(3), np.zeros(4), rtol=0, atol=0)


def test_error_measures() -> None:
    ref = np.array([1.0, 0.0, np.inf, 2.0])
    act = np.array([1.0 + 1e-6, 1e-20, np.inf, 2.0])
    assert max_relative_error(act, ref, atol=1e-10) == pytest.approx(1e-6, rel=1e-6)
    assert max_relative_error(act, ref) == np.inf
    assert max_relative_error([1.0], [np.nan]) == np.inf
    u = ulps(np.float32(1.0) + np.finfo(np.float32).eps * np.array([0, 1, 3]), [1.0, 1.0, 1.0],
             "float32")
    assert u.tolist() == [0.0, 1.0, 3.0]
    assert ulps([1.0 + 2.0**-7], [1.0], "bfloat16")[0] == 1.0
    assert ulps([0.0], [0.0])[0] == 0.0
    assert target_tolerance(torch.bfloat16) == (1e-5, 1e-30)
    assert target_tolerance("float64") == (1e-12, 1e-300)


def test_token_logprob_gradient_oracle_where_the_token_holds_all_but_1e_130():
    """The token's own entry g (1 - p_t) / T is the other tokens' mass, not a difference that
    vanishes below the working precision (z = [300, 0.3]: 1 - p_t = e^-299.7 = 6.95e-131)."""
    import mpmath

    from trmath.testing import mp_grad_token_logprob

    got = mp_grad_token_logprob(np.array([300.0, 0.3]), 0)
    with mpmath.workdps(60):
        rest = mpmath.mpf(1) / (1 + mpmath.exp(mpmath.mpf(300) - mpmath.mpf("0.3")))
    # the oracle rounds its 50-digit value to float64 once: within a few ulps (2.2e-16 each)
    assert got[0] == pytest.approx(float(rest), rel=1e-15) and got[1] == pytest.approx(-float(rest), rel=1e-15)
