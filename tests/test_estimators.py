"""The sampled KL estimators k1, k2, k3 (and their importance-weighted and straight-through
forms), the Rao-Blackwellized sequence KL and the registry: accuracy against mpmath, gradients,
validation, masks, clamps.

The expectation claims (bias, gradient identities) are proved by exact enumeration in
tests/test_expectation.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

import trmath
from trmath.testing import mp_estimator, mp_kl, ulps

# |lr| from 1e-30 to 80, both signs (TARGETS.md: k1, k2, k3 within a few ulps there).
_MAG = np.logspace(-30, math.log10(80.0), 240)
LRS = np.concatenate([_MAG, -_MAG, [1.0, -1.0, 1.6, -1.6, 0.999, -1.601, 0.5, -0.5]])

#: Bound in ulps of the result type. float64: the error analysis of trmath/_estimators_impl.py
#: gives at most ~3.2 unit roundings amplified by the alternating series / the expm1 - x
#: subtraction, plus <= 1 ulp of expm1 and the two-sum tail: 4 ulps. float32 (and narrower)
#: inputs: the float64 result, off by ~1e-9 float32 ulps, is rounded once: 1 ulp covers it.
ULP_BOUND = {"float64": 4.0, "float32": 1.0}


def _split(lr: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities (both <= 0) whose difference is exactly lr (already in dtype)."""
    lr = lr.astype(dtype)
    return (-np.maximum(lr, 0)).astype(dtype), np.minimum(lr, 0).astype(dtype)


def _oracle(name, s, o, b=None):
    if b is None:
        return np.array([float(mp_estimator(name, a, c)) for a, c in zip(s.ravel(), o.ravel())])
    return np.array([float(mp_estimator(name, a, c, d)) for a, c, d in zip(s.ravel(), o.ravel(), b.ravel())])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_accuracy_exact_log_ratio(name, dtype):
    s, o = _split(LRS, dtype)
    got = getattr(trmath, name)(s, o)
    assert got.dtype == (np.float64 if dtype == np.float64 else np.float32)
    ref = _oracle(name, s, o)
    u = ulps(got, ref, np.dtype(got.dtype).name)
    worst = int(np.argmax(u))
    assert u.max() <= ULP_BOUND[np.dtype(got.dtype).name], (
        f"{name}: {u.max():.2f} ulps at lr={o[worst] - s[worst]!r} (got {got[worst]!r}, ref {ref[worst]!r})")
    if name != "k1":
        assert (got >= 0).all()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_k3_accuracy_with_rounded_log_ratio(dtype):
    """Log-probs of different magnitudes: o - s rounds in float64; the two-sum keeps k3 exact."""
    rng = np.random.default_rng(7)
    base = -rng.uniform(0.0, 30.0, LRS.size).astype(dtype)
    other = np.minimum(base + LRS, 0).astype(dtype)
    got = trmath.k3(base, other)
    ref = _oracle("k3", base, other)
    u = ulps(got, ref, np.dtype(got.dtype).name)
    assert u.max() <= ULP_BOUND[np.dtype(got.dtype).name], f"{u.max():.2f} ulps"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32(dtype):
    s, o = _split(LRS[np.abs(LRS) < 60], np.float64)
    st_, ot = torch.tensor(s).to(dtype), torch.tensor(o).to(dtype)
    got = trmath.k3(st_, ot)
    assert got.dtype == torch.float32
    ref = _oracle("k3", st_.double().numpy(), ot.double().numpy())  # exact values of the inputs
    assert ulps(got, ref, "float32").max() <= ULP_BOUND["float32"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_k3_gradient_is_expm1(dtype):
    """d k3 / d other = expm1(lr) = -d k3 / d sampler, to a few ulps (expm1 is well conditioned)."""
    s_np, o_np = _split(LRS[np.abs(LRS) < 60], np.float64 if dtype == torch.float64 else np.float32)
    s = torch.tensor(s_np, requires_grad=True)
    o = torch.tensor(o_np, requires_grad=True)
    trmath.k3(s, o).sum().backward()
    import mpmath
    ref = np.array([float(mpmath.expm1(mpmath.mpf(float(b)) - mpmath.mpf(float(a)))) for a, b in zip(s_np, o_np)])
    name = "float64" if dtype == torch.float64 else "float32"
    assert ulps(o.grad, ref, name).max() <= ULP_BOUND[name]
    assert torch.equal(s.grad, -o.grad)


def test_textbook_k3_fails_in_float32_and_ours_does_not():
    """The demonstration in docs/theory/estimators.rst: exp(l) - 1 - l in float32."""
    lr = torch.tensor([1e-5, -1e-5, 1e-4, 3e-4, -5e-4], dtype=torch.float32)
    naive = torch.exp(lr) - 1 - lr
    ours = trmath.k3(torch.zeros_like(lr), lr)
    ref = _oracle("k3", np.zeros(5, np.float32), lr.numpy())
    assert (naive < 0).any()                                   # negative "KL" estimates
    assert (np.abs(naive.numpy() - ref) > 0.1 * ref).all()     # every one wrong by > 10 %
    assert ulps(ours, ref, "float32").max() <= 1.0


def test_output_clamp_zeroes_gradients_and_reports_fraction():
    """A [-10, 10] output clamp (some frameworks' default) silently kills the gradient of the
    most drifted tokens; ours is opt-in and reports how many it clamped."""
    s = torch.tensor([-1.0, -1.0, -13.0, -1.0], requires_grad=True)
    o = torch.tensor([-1.5, -0.9, -0.5, -40.0])
    plain = trmath.k3(s, o)
    assert (plain > 10).sum() == 2  # no hidden clamp
    res = trmath.k3(s, o, clamp=(-10.0, 10.0))
    assert isinstance(res, trmath.ClampedEstimate)
    assert float(res.clamped_fraction) == 0.5
    res.value.sum().backward()
    assert s.grad[2] == 0 and s.grad[3] == 0 and s.grad[0] != 0
    s.grad = None
    plain.sum().backward()
    assert (s.grad != 0).all()


def test_output_dtype_numpy_and_shapes():
    s = np.array([[-0.2, -1.0]], np.float32)
    o = np.array([[-0.3, -0.8]], np.float64)
    out = trmath.k2(s, o)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (1, 2)
    out32 = trmath.k2(s, s)
    assert out32.dtype == np.float32 and (out32 == 0).all()


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_values_against_definition(name):
    rng = np.random.default_rng(1)
    s = -rng.uniform(0, 5, 50)
    o = -rng.uniform(0, 5, 50)
    b = -rng.uniform(0, 5, 50)
    f = getattr(trmath, name)
    np.testing.assert_allclose(f(s, o), _oracle(name, s, o), rtol=4e-16, atol=0)
    np.testing.assert_allclose(f(s, o, behaviour_logprob=b), _oracle(name + "_is", s, o, b), rtol=1e-14)
    np.testing.assert_array_equal(f(s, o, straight_through=True), f(s, o))  # value unchanged


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_importance_weighted_accuracy_wide_range(name, on_both_paths):
    """Importance-weighted float64 estimators with s - b from -80 to 1 (the weight e^(s - b) from
    1e-35 to e): the weight comes from the exact two-sum s - b = hi + lo as e^hi (1 + lo), so the
    rounding of s - b (half an ulp of |s - b|: 60 ulps of the weight at s - b ~ -78) does not
    reach it. Bound: the estimator's 4 ulps, plus the weight (the exponential within an ulp, the
    neglected lo^2 / 2 below 2^-100) and the product's rounding: 6 ulps."""
    rng = np.random.default_rng(7)
    n = 400
    s = -rng.uniform(0, 80, n)
    o = np.minimum(s + rng.uniform(-3, 3, n), 0.0)
    b = -rng.uniform(0, 1, n)
    ref = _oracle(name + "_is", s, o, b)
    for got in on_both_paths(lambda: getattr(trmath, name)(s, o, behaviour_logprob=b)):
        u = ulps(got, ref, "float64")
        assert u.max() <= ULP_BOUND["float64"] + 2, f"{u.max():.2f} ulps at index {int(np.argmax(u))}"


def test_importance_weight_underflow_and_overflow_keep_the_exact_product(on_both_paths):
    """Valid inputs whose weight e^(s - b) under- or overflows in float64: the estimate is the
    exact product's limit -- +inf for an infinite k1 times a weight that underflowed, 0 for k3(0)
    times one that overflowed -- never the NaN of 0 * inf; likewise the gradients."""
    f64 = torch.float64
    s = torch.tensor([-1e4, 0.0, -2.0], dtype=f64, requires_grad=True)
    o = torch.tensor([-math.inf, 0.0, -2.0], dtype=f64, requires_grad=True)
    b = torch.tensor([0.0, -800.0, -900.0], dtype=f64)

    def run():
        out = {}
        for name in ("k1", "k2", "k3"):
            v = getattr(trmath, name)(s, o, behaviour_logprob=b)
            g = torch.autograd.grad(v[1:].sum(), (s, o))
            out[name] = (v.detach(), g)
        return out
    for res in on_both_paths(run):
        for name, (v, (gs, go)) in res.items():
            assert float(v[0]) == math.inf, name  # k(lr = -inf) = +inf, weight e^-1e4 > 0
            assert float(v[1]) == 0.0 and float(v[2]) == 0.0, name  # k(0) = 0, weight e^800, e^898
            # (entry 0 is outside the summed loss: its gradient is 0 times an infinite slope,
            # NaN as torch's own 0 * inf; entries 1, 2 overflow honestly to +-inf or are 0)
            assert not bool(torch.isnan(gs[1:]).any() | torch.isnan(go[1:]).any()), name


def test_numpy_inputs_of_any_layout_and_unsupported_dtypes():
    """A numpy mask (or input) with negative strides is read as given; a numpy dtype torch has
    no counterpart for raises TypeError naming the argument."""
    rng = np.random.default_rng(3)
    a, b = -rng.random(6), -rng.random(6)
    m = a > -0.5
    np.testing.assert_array_equal(trmath.k3(a, b, mask=m[::-1]), trmath.k3(a, b, mask=m[::-1].copy()))
    np.testing.assert_array_equal(trmath.k3(a[::-1], b), trmath.k3(a[::-1].copy(), b))
    if np.dtype(np.longdouble).itemsize > 8:  # a distinct extended type on this platform
        with pytest.raises(TypeError, match=r"^sampler_logprob: expected a float16, float32 or float64 array"):
            trmath.k3(a.astype(np.longdouble), b)
    with pytest.raises(TypeError, match=r"^mask: numpy dtype"):
        trmath.k3(a, b, mask=np.array(["x"] * 6))


def test_gradients_by_gradcheck():
    torch.manual_seed(0)
    s = -torch.rand(6, dtype=torch.float64) * 3
    o = -torch.rand(6, dtype=torch.float64) * 3
    b = -torch.rand(6, dtype=torch.float64) * 3
    for name in ["k1", "k2", "k3"]:
        f = getattr(trmath, name)
        for args, kw in [((s, o), {}), ((s, o), {"behaviour": True})]:
            ins = [x.clone().requires_grad_() for x in args]
            if kw:
                bb = b.clone().requires_grad_()
                assert torch.autograd.gradcheck(lambda x, y, z: f(x, y, behaviour_logprob=z), (*ins, bb))
            else:
                assert torch.autograd.gradcheck(f, tuple(ins))


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_straight_through_gradient_is_k2s(name):
    s = torch.tensor([-0.3, -2.0, -1.0], dtype=torch.float64, requires_grad=True)
    o = torch.tensor([-1.0, -0.1, -1.0], dtype=torch.float64, requires_grad=True)
    getattr(trmath, name)(s, o, straight_through=True).sum().backward()
    g_st = (s.grad.clone(), o.grad.clone())
    s.grad = o.grad = None
    trmath.k2(s, o).sum().backward()
    assert torch.equal(g_st[0], s.grad) and torch.equal(g_st[1], o.grad)


@given(st.lists(st.floats(-60, 0), min_size=1, max_size=20), st.data())
def test_k2_k3_never_negative(s_list, data):
    s = np.array(s_list)
    o = np.array(data.draw(st.lists(st.floats(-60, 0), min_size=len(s), max_size=len(s))))
    for dt in (np.float32, np.float64):
        assert (trmath.k2(s.astype(dt), o.astype(dt)) >= 0).all()
        assert (trmath.k3(s.astype(dt), o.astype(dt)) >= 0).all()


def test_infinite_other_logprob_gives_inf():
    out = trmath.k3(torch.tensor([-1.0, -80.0]), torch.tensor([-math.inf, 0.0]))
    assert out[0] == math.inf and math.isfinite(out[1])
    assert trmath.k1(torch.tensor([-1.0]), torch.tensor([-math.inf]))[0] == math.inf


# ------------------------------------------------------------------------------- validation


def test_nan_raises_naming_argument_and_index():
    good = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    bad = good.clone()
    bad[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"sampler_logprob: entry at index \(1, 0\) contains NaN"):
        trmath.k3(bad, good)
    with pytest.raises(ValueError, match=r"other_logprob: entry at index \(1, 0\) contains NaN"):
        trmath.k1(good, bad)
    with pytest.raises(ValueError, match="behaviour_logprob: .*NaN"):
        trmath.k3(good, good, behaviour_logprob=bad)


@pytest.mark.parametrize("kind", ("k1", "k2", "k3"))
@pytest.mark.parametrize("arg, value", [(0, math.nan), (0, math.inf), (0, -math.inf),
                                        (1, math.nan), (1, math.inf),
                                        (2, math.nan), (2, math.inf), (2, -math.inf)])
def test_unvalidated_invalid_entry_gives_nan(kind, arg, value):
    """validate=False: NaN or an infinity validation rejects gives NaN at that entry -- also through the opt-in
    clamp and the importance weight (+inf was clamped to a bound, and a +inf behaviour log-prob
    made the weight and the estimate 0) -- with a NaN gradient there; a masked entry is free."""
    fn = getattr(trmath, kind)
    x = [torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64) for _ in range(3)]
    x[1] = x[1] - 0.3
    x[2] = x[2] + 0.2
    x[arg][1] = value
    s = x[0].clone().requires_grad_()
    for clamp in (None, (-1.0, 1.0)):
        out = fn(s, x[1], behaviour_logprob=x[2], clamp=clamp, validate=False)
        val = out if clamp is None else out.value
        assert torch.isnan(val[1]) and not bool(torch.isnan(val[[0, 2]]).any())
    (g,) = torch.autograd.grad(fn(s, x[1], behaviour_logprob=x[2], validate=False).sum(), s)
    assert torch.isnan(g[1]) and bool(torch.isfinite(g[[0, 2]]).all())
    if arg < 2:  # on-policy too (k1's gradient is a constant +-1 that ignored the NaN)
        o = x[1].clone().requires_grad_()
        gs, go = torch.autograd.grad(fn(s, o, validate=False).sum(), (s, o))
        for gg in (gs, go):
            assert torch.isnan(gg[1]) and bool(torch.isfinite(gg[[0, 2]]).all())
    masked = fn(s, x[1], behaviour_logprob=x[2], mask=torch.tensor([True, False, True]), validate=False)
    assert float(masked.detach()[1]) == 0.0
    with pytest.raises(ValueError, match=("sampler", "other", "behaviour")[arg]):
        fn(s, x[1], behaviour_logprob=x[2])


def test_positive_logprob_beyond_tolerance_raises():
    with pytest.raises(ValueError, match="other_logprob: entry at index 1 is a log-probability above 0"):
        trmath.k3(np.array([-1.0, -1.0]), np.array([-1.0, 0.5]))
    # rounding-level positive values pass (a float32 log-softmax may give +1e-7)
    assert np.isfinite(trmath.k3(np.array([1e-7], np.float32), np.array([-1.0], np.float32))).all()
    with pytest.raises(ValueError, match="sampler_logprob.*above 0"):
        trmath.k3(torch.tensor([math.inf]), torch.tensor([-1.0]))


def test_sampled_token_with_zero_probability_raises():
    with pytest.raises(ValueError, match="sampler_logprob: entry at index 0 is -inf"):
        trmath.k3(torch.tensor([-math.inf]), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="behaviour_logprob: entry at index 0 is -inf"):
        trmath.k3(torch.tensor([-1.0]), torch.tensor([-1.0]), behaviour_logprob=torch.tensor([-math.inf]))


def test_shape_mismatch_is_not_broadcast():
    with pytest.raises(ValueError, match=r"shapes differ \(\(2, 3\) vs \(2, 3, 1\)\)"):
        trmath.k3(torch.zeros(2, 3), torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="mask: expected shape"):
        trmath.k3(torch.zeros(2), torch.zeros(2), mask=torch.ones(3, dtype=torch.bool))


def test_type_errors():
    with pytest.raises(TypeError, match="sampler_logprob: expected a torch.Tensor or numpy.ndarray"):
        trmath.k3([-1.0], torch.tensor([-1.0]))
    with pytest.raises(TypeError, match="other_logprob: expected a floating-point array"):
        trmath.k3(np.array([-1.0]), np.array([-1]))
    with pytest.raises(TypeError, match="mask"):
        trmath.k3(torch.zeros(2), torch.zeros(2), mask=torch.ones(2))
    with pytest.raises(ValueError, match="clamp"):
        trmath.k3(torch.zeros(2), torch.zeros(2), clamp=(1.0, -1.0))


def test_mask_selects_out_padding():
    s = torch.tensor([-1.0, math.nan, -math.inf, -0.5], requires_grad=True)
    o = torch.tensor([-2.0, math.nan, -1.0, 3.0])
    m = torch.tensor([True, False, False, False])
    out = trmath.k3(s, o, mask=m)
    assert torch.isfinite(out).all() and (out[1:] == 0).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[1:] == 0).all()
    ref = trmath.k3(s[:1].detach(), o[:1])
    assert out[0] == ref[0]
    frac = trmath.k3(s, o, mask=m, clamp=(0.0, 0.1)).clamped_fraction
    assert float(frac) == 1.0  # the one valid entry (k3 = 0.718) is clamped; padding not counted


# ------------------------------------------------------------------------------- registry


def test_registry_entries_and_unknown_name():
    assert set(trmath.ESTIMATORS) >= {"k1", "k2", "k3", "k1_st", "k3_st", "k1_is", "k2_is", "k3_is", "rb"}
    info = trmath.get_estimator("k3")
    with pytest.raises(Exception):
        info.value_unbiased = False  # frozen
    with pytest.raises(ValueError, match="valid names: k1, k2, k3"):
        trmath.get_estimator("k4")
    for name, e in trmath.ESTIMATORS.items():
        assert e.name == name
        assert e.sampling in ("on-policy", "off-policy")
        assert e.placement in ("reward", "loss", "metric", "none")
        assert e.loss_gradient in (None, "0", "grad KL(pi||o)", "grad KL(o||pi)", "grad KL(P||Q)")


def test_kl_estimate_dispatch():
    s = torch.tensor([-0.3, -1.2]); o = torch.tensor([-0.5, -1.0]); b = torch.tensor([-0.4, -1.1])
    assert torch.equal(trmath.kl_estimate("k3", s, o), trmath.k3(s, o))
    assert torch.equal(trmath.kl_estimate("k3_is", s, o, behaviour_logprob=b), trmath.k3(s, o, behaviour_logprob=b))
    with pytest.raises(ValueError, match="behaviour_logprob: required"):
        trmath.kl_estimate("k1_is", s, o)
    with pytest.raises(ValueError, match="on-policy; use k3_is"):
        trmath.kl_estimate("k3_st", s, o, behaviour_logprob=b)
    with pytest.raises(ValueError, match="rb_kl"):
        trmath.kl_estimate("rb", s, o)


# ------------------------------------------------------------------------------- rb_kl


def test_rb_kl_matches_exact_kl_and_handles_padding():
    torch.manual_seed(3)
    p = torch.randn(2, 5, 7, dtype=torch.float64)
    q = torch.randn(2, 5, 7, dtype=torch.float64)
    tokens = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    p_pad, q_pad, tok_pad = p.clone(), q.clone(), tokens.clone()
    p_pad[1, 3:] = math.nan          # padding holding garbage must not leak
    q_pad[1, 3:] = -math.inf
    tok_pad[1, 3:] = -100
    pp = p_pad.clone().requires_grad_()
    res = trmath.rb_kl(pp, q_pad, tok_pad, mask)
    per = trmath.kl(p, q)
    exp_per = torch.where(mask, per, torch.zeros(()))
    torch.testing.assert_close(res.per_position, exp_per, rtol=1e-15, atol=0)
    torch.testing.assert_close(res.kl, exp_per.sum(-1), rtol=1e-15, atol=0)
    assert torch.equal(res.loss.detach(), res.kl)
    res.loss.sum().backward()
    assert torch.isfinite(pp.grad).all() and (pp.grad[1, 3:] == 0).all()


def test_rb_kl_surrogate_gradient_formula():
    """grad loss = sum_n grad KL_n + sum_n grad log p(y_n) * sum_{m>n} KL_m, checked term by term."""
    torch.manual_seed(4)
    p = torch.randn(1, 4, 5, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 4, 5, dtype=torch.float64)
    tok = torch.randint(0, 5, (1, 4))
    trmath.rb_kl(p, q, tok).loss.sum().backward()
    pr = p.detach().clone().requires_grad_()
    kln = trmath.kl(pr, q)[0]
    lp = torch.log_softmax(pr, -1)[0].gather(-1, tok[0, :, None])[:, 0]
    fut = torch.tensor([kln[n + 1:].sum().item() for n in range(4)], dtype=torch.float64)
    (kln.sum() + (lp * fut).sum()).backward()
    torch.testing.assert_close(p.grad, pr.grad, rtol=1e-12, atol=1e-15)


def test_rb_kl_float32_and_temperature_and_errors():
    p = torch.randn(3, 4, 6)
    q = torch.randn(3, 4, 6)
    tok = torch.randint(0, 6, (3, 4))
    res = trmath.rb_kl(p, q, tok, temperature=0.7)
    assert res.kl.dtype == torch.float32
    torch.testing.assert_close(res.kl, trmath.kl(p, q, temperature=0.7).double().sum(-1).float())
    with pytest.raises(ValueError, match="tokens: expected shape"):
        trmath.rb_kl(p, q, tok[:, :2])
    with pytest.raises(ValueError, match="mask: expected shape"):
        trmath.rb_kl(p, q, tok, torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="p_logits and q_logits"):
        trmath.rb_kl(p, q[:, :3], tok)
    with pytest.raises(ValueError, match="tokens: entry"):
        trmath.rb_kl(p, q, torch.full((3, 4), 6))
    bad = p.clone(); bad[0, 1, 2] = math.nan
    with pytest.raises(ValueError, match="p_logits"):
        trmath.rb_kl(bad, q, tok)


def test_rb_kl_value_against_mpmath():
    rng = np.random.default_rng(5)
    p = rng.normal(size=(1, 3, 4)); q = rng.normal(size=(1, 3, 4))
    res = trmath.rb_kl(torch.tensor(p), torch.tensor(q), torch.zeros(1, 3, dtype=torch.long))
    ref = sum(mp_kl(p[0, n], q[0, n]) for n in range(3))
    assert abs(float(res.kl[0]) - float(ref)) <= 1e-14 * float(ref)


def test_reference_table_matches_registry():
    """The registry table of docs/reference/estimators.rst states what ESTIMATORS says."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "reference" / "estimators.rst").read_text()
    table = text.split(".. list-table:: The registered estimators")[1].split("\n\n\"--\"")[0]
    rows = table.split("\n   * - ")[2:]  # [0]: options, [1]: the header row
    assert len(rows) == len(trmath.ESTIMATORS)
    grad = {"0": "0", "--": None}
    for row in rows:
        cells = [c.strip() for c in row.split("\n     - ")]
        name = cells[0].strip("`")
        e = trmath.get_estimator(name)
        unbiased, nonneg, lg, rg, sampling, placement = cells[2:8]
        assert (unbiased == "yes") == e.value_unbiased, name
        assert (nonneg == "yes") == e.nonnegative, name
        assert sampling == e.sampling and placement == e.placement, name

        def code(c):
            if c in grad:
                return grad[c]
            if r"\mathrm{KL}(\pi\|o)" in c:
                return "grad KL(pi||o)"
            if r"\mathrm{KL}(o\|\pi)" in c:
                return "grad KL(o||pi)"
            if r"\mathrm{KL}(P\|Q)" in c:
                return "grad KL(P||Q)"
            raise AssertionError(f"unparsed cell {c!r}")

        assert code(lg) == e.loss_gradient, name
        assert code(rg) == e.reward_gradient, name


def test_rb_kl_numpy_in_numpy_out():
    rng = np.random.default_rng(9)
    p, q = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    tok = rng.integers(0, 4, size=(2, 3))
    res = trmath.rb_kl(p, q, tok, np.array([[1, 1, 0], [1, 1, 1]]))
    assert all(isinstance(x, np.ndarray) for x in res)
    np.testing.assert_array_equal(res.per_position[0, 2], 0.0)
    np.testing.assert_allclose(res.kl, [trmath.kl(p[0, :2], q[0, :2]).sum(), trmath.kl(p[1], q[1]).sum()],
                               rtol=1e-15)
    with pytest.raises(TypeError, match="tokens"):
        trmath.rb_kl(p, q, tok.astype(float))


def test_rb_kl_fully_masked_rows():
    p = torch.full((2, 3, 4), float("nan"), requires_grad=True)  # padding only
    res = trmath.rb_kl(p, torch.zeros(2, 3, 4), torch.full((2, 3), -100), torch.zeros(2, 3, dtype=torch.bool))
    assert (res.kl == 0).all() and (res.per_position == 0).all()
    res.loss.sum().backward()
    assert (p.grad == 0).all()


def test_straight_through_is_on_policy_only():
    with pytest.raises(ValueError, match="straight_through: only defined on-policy"):
        trmath.k3(torch.zeros(1), torch.zeros(1), behaviour_logprob=torch.zeros(1), straight_through=True)


@given(st.floats(-100, 0, width=32), st.floats(-100, 0, width=32), st.sampled_from(["k1", "k2", "k3"]))
@example(s=-89.0, o=0.0, name="k3")  # k3 = 4.5e38 overflows float32: +inf is the right rounding
def test_random_float32_pairs_against_mpmath(s, o, name):
    sv, ov = np.array([s], np.float32), np.array([o], np.float32)
    got = getattr(trmath, name)(sv, ov)
    ref = _oracle(name, sv, ov)
    if abs(ref[0]) > np.finfo(np.float32).max:
        assert got[0] == np.inf
    else:
        assert ulps(got, ref, "float32").max() <= ULP_BOUND["float32"]


@given(st.floats(-700, 0), st.floats(-700, 0))
def test_random_float64_pairs_against_mpmath(s, o):
    """float64 log-probs of any magnitudes: the two-sum keeps k3 to a few ulps (|lr| <= 80)."""
    if o - s > 80:
        o = s + 80.0
    sv, ov = np.array([s]), np.array([min(o, 0.0)])
    got = trmath.k3(sv, ov)
    assert ulps(got, _oracle("k3", sv, ov), "float64").max() <= ULP_BOUND["float64"]


def test_unvalidated_estimators_compile_without_graph_breaks():
    """validate=False has no data-dependent branch (the NaN factor is applied unconditionally):
    k1/k2/k3 and the binary coarse divergences compile with fullgraph=True, to the eager bits."""
    g = torch.Generator().manual_seed(5)
    a = -torch.rand(3, 4, generator=g) - 1e-3
    b = -torch.rand(3, 4, generator=g) - 1e-3
    a[1, 2] = math.nan
    for fn in (trmath.k1, trmath.k2, trmath.k3, trmath.binary_tv, trmath.binary_kl):
        torch._dynamo.reset()
        f = torch.compile(lambda x, y, fn=fn: fn(x, y, validate=False), backend="aot_eager", fullgraph=True)
        got, ref = f(a, b), fn(a, b, validate=False)
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and bool(torch.isnan(got[1, 2]))
        assert torch.equal(got.nan_to_num(), ref.nan_to_num()), fn.__name__


# --------------------------------------------------------------------------------------------
# the compiled element kernel (CPU) against the torch path that serves other devices



_N_CHUNKS = 3 * 16384 + 7  # several of the kernel's chunks (16384 entries) and a short tail


def _wide_pairs(n: int, dtype, seed: int):
    """Log-probabilities with |lr| from 1e-12 to 80, both signs: every branch of k3."""
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(n, generator=g, dtype=torch.float64) * 30
    mag = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * 13.9 - 12)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    o = torch.minimum(s + sign * mag, torch.zeros((), dtype=torch.float64))
    return s.to(dtype), o.to(dtype), torch.rand(n, generator=g) > 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,straight", [("k1", False), ("k2", False), ("k3", False), ("k3", True), ("k1", True)])
def test_element_kernel_matches_the_torch_path(dtype, name, straight, on_both_paths):
    """Values and both gradients, masked, across chunk boundaries: the kernel and the torch path
    are each within a few float64 ulps of the exact value, so after rounding to the output (or
    gradient) dtype they differ by at most one of its ulps; masked entries are exactly 0."""
    s, o, mask = _wide_pairs(_N_CHUNKS, dtype, 3)
    gout = torch.linspace(-1.0, 1.0, _N_CHUNKS)

    def run():
        ss, oo = s.clone().requires_grad_(), o.clone().requires_grad_()
        v = getattr(trmath, name)(ss, oo, mask=mask, straight_through=straight)
        v.backward(gout.to(v.dtype))
        return v.detach(), ss.grad, oo.grad

    (v1, gs1, go1), (v2, gs2, go2) = on_both_paths(run)
    out = "float64" if dtype == torch.float64 else "float32"
    assert v1.dtype == v2.dtype
    assert ulps(v1, v2, out).max() <= (1.0 if out == "float32" else 8.0)
    gname = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16",
             torch.float16: "float16"}[dtype]
    for a, b in ((gs1, gs2), (go1, go2)):
        assert a.dtype == dtype
        assert ulps(a, b, gname).max() <= (8.0 if dtype == torch.float64 else 1.0)
    assert torch.equal(v1[~mask], torch.zeros_like(v1[~mask])) and bool((gs1[~mask] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_element_kernel_importance_weighted_matches_the_torch_path(dtype, name, on_both_paths):
    """w k with w = exp(s - b): values and the three gradients (through w too), masked, across
    chunks; within an ulp of the output / gradient dtype (float64: a few of its ulps, as w's
    exponential differs between the paths by up to an ulp)."""
    s, o, mask = _wide_pairs(_N_CHUNKS, dtype, 6)
    g = torch.Generator().manual_seed(8)
    b = (s.double() + 0.3 * torch.randn(_N_CHUNKS, generator=g, dtype=torch.float64)).clamp(max=0).to(dtype)
    gout = torch.linspace(-1.0, 1.0, _N_CHUNKS)

    def run():
        ins = [x.clone().requires_grad_() for x in (s, o, b)]
        v = getattr(trmath, name)(ins[0], ins[1], behaviour_logprob=ins[2], mask=mask)
        v.backward(gout.to(v.dtype))
        return (v.detach(), *(x.grad for x in ins))

    r1, r2 = on_both_paths(run)
    bound = {torch.float64: 16.0, torch.float32: 1.0, torch.bfloat16: 1.0}[dtype]
    out = "float64" if dtype == torch.float64 else "float32"
    gname = {torch.float64: "float64", torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    assert ulps(r1[0], r2[0], out).max() <= bound
    gs1, go1, gb1 = r1[1:]
    for a, c in zip((go1, gb1), r2[2:]):
        assert a.dtype == dtype and ulps(a, c, gname).max() <= bound
    # d/ds = g (w k - w k') is a difference (it cancels where k = k', e.g. k1 at lr = 1): its
    # error scale is that of the two terms, |d/do| + |d/db|.
    eps = torch.finfo(dtype).eps
    scale = go1.double().abs() + gb1.double().abs()
    assert bool(((gs1.double() - r2[1].double()).abs() <= bound * eps * scale).all())
    for a in (gs1, go1, gb1):
        assert a.dtype == dtype and bool((a[~mask] == 0).all())


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_element_kernel_invalid_entries_give_nan_on_both_paths(kind, on_both_paths):
    """validate=False: s = +-inf, o = +inf and NaN give NaN values and NaN gradients at exactly
    the same entries on both paths (k1's constant slope included); o = -inf gives +inf."""
    s, o, _ = _wide_pairs(_N_CHUNKS, torch.float32, 4)
    spots = {17: ("s", math.inf), 16390: ("s", -math.inf), 20000: ("s", math.nan),
             33000: ("o", math.inf), 49000: ("o", math.nan), _N_CHUNKS - 1: ("s", math.nan)}
    for i, (which, v) in spots.items():
        (s if which == "s" else o)[i] = v
    o[100] = -math.inf

    def run():
        ss, oo = s.clone().requires_grad_(), o.clone().requires_grad_()
        v = getattr(trmath, kind)(ss, oo, validate=False)
        v.backward(torch.ones_like(v))
        return v.detach(), ss.grad
    (v1, g1), (v2, g2) = on_both_paths(run)
    nan_at = sorted(spots)
    assert torch.nonzero(torch.isnan(v1)).flatten().tolist() == nan_at
    assert torch.nonzero(torch.isnan(v2)).flatten().tolist() == nan_at
    assert torch.nonzero(torch.isnan(g1)).flatten().tolist() == nan_at
    assert torch.equal(torch.isnan(g1), torch.isnan(g2))
    assert v1[100] == math.inf == v2[100]


@pytest.mark.parametrize("where", [5, 16384 * 2 + 1, _N_CHUNKS - 1])
@pytest.mark.parametrize("arg,value", [("sampler_logprob", math.nan), ("sampler_logprob", -math.inf),
                                       ("sampler_logprob", 0.01), ("other_logprob", math.nan),
                                       ("other_logprob", math.inf), ("other_logprob", 0.5)])
@pytest.mark.parametrize("grad", [False, True])
def test_validation_in_the_kernel_names_the_first_bad_entry(where, arg, value, grad, on_both_paths):
    """Validation runs inside the kernel's pass; a flagged entry is named exactly as the torch
    path's checks name it (argument, index, what), and a masked-out one is not an error."""
    s, o, _ = _wide_pairs(_N_CHUNKS, torch.float32, 5)
    t = s if arg == "sampler_logprob" else o
    t[where] = value
    t[min(where + 3, _N_CHUNKS - 1)] = value  # a later bad entry is not the one named

    def run():
        ss, oo = s.clone().requires_grad_(grad), o.clone().requires_grad_(grad)
        with pytest.raises(ValueError) as e:
            trmath.k3(ss, oo)
        return str(e.value)
    m1, m2 = on_both_paths(run)
    assert m1 == m2 and m1.startswith(f"{arg}: entry at index {where} ")
    mask = torch.ones(_N_CHUNKS, dtype=torch.bool)
    mask[where] = mask[min(where + 3, _N_CHUNKS - 1)] = False
    assert torch.isfinite(trmath.k3(s, o, mask=mask)).all()


def test_torch_path_accuracy_exact_log_ratio(on_both_paths):
    """The torch path (other devices) to the same ulp bounds as the kernel."""
    def run():
        out = []
        for dtype in (np.float64, np.float32):
            s, o = _split(LRS, dtype)
            for name in ("k1", "k2", "k3"):
                got = getattr(trmath, name)(torch.from_numpy(s), torch.from_numpy(o)).numpy()
                out.append(ulps(got, _oracle(name, s, o), np.dtype(got.dtype).name).max()
                           / ULP_BOUND[np.dtype(got.dtype).name])
        return max(out)
    kern, tor = on_both_paths(run)
    assert kern <= 1.0 and tor <= 1.0, (kern, tor)


@pytest.mark.parametrize("bad", [("behaviour_logprob", 20000), ("sampler_logprob", 40000)])
def test_validation_in_the_kernel_off_policy(bad, on_both_paths):
    """Off-policy, the behaviour log-prob is validated in the same pass, and the first argument
    (in signature order) with a bad entry is the one named, on both paths."""
    s, o, _ = _wide_pairs(_N_CHUNKS, torch.float32, 9)
    b = s.clone()
    b[30000] = -math.inf if bad[0] == "sampler_logprob" else b[30000]
    (s if bad[0] == "sampler_logprob" else b)[bad[1]] = math.nan

    def run():
        with pytest.raises(ValueError) as e:
            trmath.k3(s, o, behaviour_logprob=b)
        return str(e.value)
    m1, m2 = on_both_paths(run)
    assert m1 == m2 and m1.startswith(f"{bad[0]}: entry at index {bad[1]} contains NaN")
