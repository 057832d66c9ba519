"""Bad input to the coarse divergences and their builders: every error names the argument and
what is wrong; NaN never turns into a number; rounding-level positive log-probabilities and kept
masses are clamped only within the documented tolerance (4 eps of the input dtype).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import trmath

F64 = torch.float64
BIN = (trmath.binary_tv, trmath.binary_kl)
TOPK = (trmath.topk_tv, trmath.topk_kl)
ALL = BIN + TOPK


def m(text: str) -> str:
    return re.escape(text)


def _args(fn, shape=(2, 3)):
    return torch.full(shape, -2.0, dtype=F64), torch.full(shape, -2.5, dtype=F64)


# ------------------------------------------------------------------------------------------------
# shapes, types, dtypes
# ------------------------------------------------------------------------------------------------
def test_topk_k_differs():
    for fn in TOPK:
        with pytest.raises(ValueError, match=m("p_logprobs and q_logprobs: numbers of kept tokens K differ (3 vs 4)")):
            fn(torch.full((2, 3), -2.0), torch.full((2, 4), -2.0))


def test_topk_batch_shapes_differ():
    for fn in TOPK:
        with pytest.raises(ValueError, match=m("batch shapes differ ((2,) vs (3,))")):
            fn(torch.full((2, 3), -2.0), torch.full((3, 3), -2.0))
        with pytest.raises(ValueError, match="batch shapes differ"):
            fn(torch.full((3,), -2.0), torch.full((1, 3), -2.0))  # no silent broadcasting


def test_topk_empty_and_scalar():
    for fn in TOPK:
        with pytest.raises(ValueError, match="p_logprobs: the kept-token axis"):
            fn(torch.zeros(2, 0), torch.zeros(2, 0))
        with pytest.raises(ValueError, match="p_logprobs: expected shape"):
            fn(torch.tensor(-1.0), torch.tensor(-1.0))


def test_binary_shapes_differ():
    for fn in BIN:
        with pytest.raises(ValueError, match=m("p_logprob and q_logprob: shapes differ ((3,) vs (2,))")):
            fn(torch.full((3,), -1.0), torch.full((2,), -1.0))


@pytest.mark.parametrize("bad", (torch.int64, torch.int32, torch.bool, torch.complex64))
@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_non_float_dtypes(fn, bad):
    good = torch.full((2, 3), -1.0)
    x = torch.zeros(2, 3, dtype=bad)
    p = "p_logprobs" if fn in TOPK else "p_logprob"
    q = "q_logprobs" if fn in TOPK else "q_logprob"
    with pytest.raises(TypeError, match=f"{p}: expected a floating dtype"):
        fn(x, good)
    with pytest.raises(TypeError, match=f"{q}: expected a floating dtype"):
        fn(good, x)


@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_wrong_types(fn):
    with pytest.raises(TypeError, match="expected a torch.Tensor or numpy.ndarray, got list"):
        fn([-1.0], torch.tensor([-1.0]))
    with pytest.raises(TypeError, match="floating-point array"):
        fn(np.zeros(3, dtype=np.int64), np.zeros(3))


# ------------------------------------------------------------------------------------------------
# values: NaN, positive log-probs, kept mass > 1
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_nan_raises_and_never_becomes_a_number(fn):
    lp, lq = _args(fn)
    lq[1, 2] = math.nan
    q = "q_logprobs" if fn in TOPK else "q_logprob"
    with pytest.raises(ValueError, match=m(f"{q}: contains NaN at index (1, 2)")):
        fn(lp, lq)
    out = fn(lp, lq, validate=False)
    if fn in TOPK:
        assert torch.isnan(out[1]) and torch.isfinite(out[0])
    else:
        assert torch.isnan(out[1, 2]) and bool(torch.isfinite(out[0]).all())


@pytest.mark.parametrize("bad", (math.nan, math.inf), ids=("nan", "inf"))
@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_unvalidated_bad_entry_gives_nan_gradients(fn, bad):
    """validate=False: an invalid entry (NaN, +inf) makes its row's value and both arguments'
    gradients NaN, at the entry itself too (it was 0 there: the entry was replaced by 0 and the
    value selected NaN, which passes no gradient); every other row is unchanged."""
    lp, lq = _args(fn)
    ref_p, ref_q = lp.clone().requires_grad_(), lq.clone().requires_grad_()
    fn(ref_p, ref_q).sum().backward()
    lq[1, 2] = bad
    p, q = lp.clone().requires_grad_(), lq.clone().requires_grad_()
    out = fn(p, q, validate=False)
    out.sum().backward()
    rows = [0] + list(range(2, lp.shape[0]))
    if fn in TOPK:  # one value per row
        assert torch.isnan(out[1]) and bool(torch.isfinite(out[rows]).all())
        for g, ref in ((p.grad, ref_p.grad), (q.grad, ref_q.grad)):
            assert torch.isnan(g[1]).all() and torch.equal(g[rows], ref[rows])
    else:  # one value per entry
        assert torch.isnan(out[1, 2]) and int(torch.isnan(out).sum()) == 1
        for g, ref in ((p.grad, ref_p.grad), (q.grad, ref_q.grad)):
            assert torch.isnan(g[1, 2]) and int(torch.isnan(g).sum()) == 1
            keep = ~torch.isnan(g)
            assert torch.equal(g[keep], ref[keep])


@pytest.mark.parametrize("dt", (torch.float16, torch.bfloat16, torch.float32, F64))
@pytest.mark.parametrize("fn", ALL, ids=lambda f: f.__name__)
def test_positive_logprob_tolerance(fn, dt):
    eps = torch.finfo(dt).eps
    lp, lq = (t.to(dt) for t in _args(fn))
    if fn in TOPK:
        lp[0, 1:] = -math.inf  # row 0 keeps one token of probability (about) 1
    # within the tolerance: clamped to 0 (probability 1)
    lp[0, 0] = 3 * eps
    ok = fn(lp, lq)
    lp0 = lp.clone()
    lp0[0, 0] = 0.0
    assert torch.equal(ok, fn(lp0, lq))
    # beyond: an error naming the argument, the index and the value
    lp[0, 0] = 8 * eps
    p = "p_logprobs" if fn in TOPK else "p_logprob"
    with pytest.raises(ValueError, match=m(f"{p}: entry at index (0, 0) is") + ".*" + m("> 0; a log-probability must be <= 0")):
        fn(lp, lq)
    assert torch.isnan(fn(lp, lq, validate=False).reshape(2, -1)[0, 0])
    with pytest.raises(ValueError, match="q_logprob.*> 0"):
        fn(lq, torch.full_like(lq, math.inf))


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("K", [5, 20, 100])
def test_kept_mass_tolerance_grows_with_log_k(dt, K, on_both_paths):
    """The kept-mass tolerance is 4 eps (1 + ln K): a row of K equal probabilities of total mass
    exp(2 tol) raises (both paths: kernel and torch formulas flag the row), one at exp(tol / 2) is
    rounding (a zero tail); a float32 log_softmax of large logits rounded to the dtype passes
    (its log kept mass stays below a quarter eps, measured)."""
    eps = torch.finfo(dt).eps
    tol = 4 * eps * (1 + math.log(K))
    for mass_log, bad in ((2 * tol, True), (tol / 2, False)):
        row = torch.full((1, K), mass_log - math.log(K), dtype=F64).to(dt)
        A = float(torch.logsumexp(row.double(), -1))
        assert (A > tol) == bad  # the rounding to dt leaves the row on its side of the bar
        other = torch.full((1, K), math.log(0.5 / K), dtype=dt)
        for fn in TOPK:
            if bad:
                with pytest.raises(ValueError, match="p_logprobs: the kept probabilities of row 0"):
                    fn(row, other)
                for got in on_both_paths(lambda: fn(row, other, validate=False)):
                    assert bool(torch.isnan(got).all())
            else:
                assert bool(torch.isfinite(fn(row, other)).all())
    g = torch.Generator().manual_seed(K)
    z = torch.randn(16, 50000, generator=g) * 5 + 100
    z[:, 0] += 15
    lp = torch.log_softmax(z, -1).topk(K, -1).values.to(dt)
    for fn in TOPK:
        assert bool(torch.isfinite(fn(lp, lp)).all())


def test_kept_mass_above_one():
    lp = torch.tensor([[math.log(0.6), math.log(0.5)]], dtype=F64)
    lq = torch.tensor([[math.log(0.3), math.log(0.5)]], dtype=F64)
    for fn in TOPK:
        with pytest.raises(ValueError, match=m("p_logprobs: the kept probabilities of row 0 sum to exp(")
                           + ".*" + m("> 1")):
            fn(lp, lq)
        with pytest.raises(ValueError, match="q_logprobs: the kept probabilities"):
            fn(lq, lp)
        assert torch.isnan(fn(lp, lq, validate=False)).all()
    # within rounding (kept mass 1 + 1 ulp): a zero tail, not an error and not negative
    one = torch.tensor([[math.log(0.25)] * 4], dtype=F64)
    one[0, 0] = math.log(0.25) + 2**-52
    assert float(trmath.topk_kl(one, one)) == 0.0
    assert float(trmath.topk_tv(one, torch.tensor([[math.log(0.4), math.log(0.1), math.log(0.25), math.log(0.25)]],
                                                  dtype=F64))) >= 0


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def test_builder_errors():
    z, w = torch.zeros(2, 5), torch.zeros(2, 5)
    tok = torch.tensor([1, 4])
    with pytest.raises(ValueError, match=m("k: must be in [1, V] = [1, 5], got 0")):
        trmath.topk_logprobs(z, w, 0, tok)
    with pytest.raises(ValueError, match=m("k: must be in [1, V] = [1, 5], got 6")):
        trmath.topk_logprobs(z, w, 6, tok)
    with pytest.raises(TypeError, match="k: expected an integer"):
        trmath.topk_logprobs(z, w, 2.0, tok)
    with pytest.raises(ValueError, match=m("tokens: entry at index 1 is 5, outside [0, 5)")):
        trmath.topk_logprobs(z, w, 2, torch.tensor([1, 5]))
    with pytest.raises(ValueError, match=m("tokens: entry at index 0 is -1")):
        trmath.topk_logprobs(z, w, 2, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="tokens: expected an integer dtype"):
        trmath.topk_logprobs(z, w, 2, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="tokens: expected shape"):
        trmath.topk_logprobs(z, w, 2, torch.tensor([1, 0, 2]))
    with pytest.raises(ValueError, match=m("slots: expected one of ('k_plus_1', 'exactly_k'), got 'k'")):
        trmath.topk_logprobs(z, w, 2, tok, slots="k")
    with pytest.raises(ValueError, match="p_logits and q_logits"):
        trmath.topk_logprobs(z, torch.zeros(2, 6), 2, tok)
    with pytest.raises(ValueError, match="temperature"):
        trmath.topk_logprobs(z, w, 2, tok, temperature=0.0)
    bad = z.clone()
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match=m("p_logits: row 1 contains NaN")):
        trmath.topk_logprobs(bad, w, 2, tok)
    with pytest.raises(ValueError, match=m("q_logits: row 1 contains NaN")):
        trmath.topk_logprobs(z, bad, 2, tok)
    with pytest.raises(ValueError, match=m("ids: entry at index (0, 1) is 7, outside [0, 5)")):
        trmath.gather_logprobs(z, torch.tensor([[0, 7], [1, 1]]))
    with pytest.raises(ValueError, match="ids: expected shape"):
        trmath.gather_logprobs(z, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="logits: expected a floating dtype"):
        trmath.gather_logprobs(torch.zeros(2, 5, dtype=torch.int64), torch.tensor([[0], [1]]))


def test_unvalidated_coarse_divergences_compile_without_graph_breaks():
    """validate=False has no data-dependent branch (the rows entirely -inf are handled by
    selection): the Top-K and binary divergences compile with fullgraph=True, to the eager bits,
    an invalid row included."""
    g = torch.Generator().manual_seed(6)
    p = torch.log_softmax(torch.randn(4, 6, generator=g), -1)[:, :4].contiguous()
    q = torch.log_softmax(torch.randn(4, 6, generator=g), -1)[:, :4].contiguous()
    q[2] = -math.inf  # all of q's mass in the tail: a valid coarse distribution
    p[3, 1] = math.nan
    for fn in TOPK + (trmath.binary_tv, trmath.binary_kl):
        torch._dynamo.reset()
        f = torch.compile(lambda a, b, fn=fn: fn(a, b, validate=False), backend="aot_eager", fullgraph=True)
        got, ref = f(p, q), fn(p, q, validate=False)
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num())
        assert bool(got.isnan().any())
