"""Binary / Top-K coarse divergences: accuracy against the mpmath oracles, properties, gradients,
builders (shift invariance, backend parity, determinism) and the textbook-formula demonstration.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import trmath
from trmath import _ops
from trmath.testing import (
    assert_close_to_reference,
    mp_binary_kl,
    mp_binary_tv,
    mp_coarse_batch,
    mp_topk_kl,
    mp_topk_tv,
    target_tolerance,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NEG_INF = -math.inf
F64 = torch.float64


def dtname(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def as64(x: torch.Tensor) -> np.ndarray:
    """The exact values of ``x`` (any float dtype) as float64."""
    return x.to(F64).numpy()


# ------------------------------------------------------------------------------------------------
# input families
# ------------------------------------------------------------------------------------------------
def binary_family(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pairs of log-probabilities (float64) of the sampled token, by adversarial family."""
    n = 24
    fam = {}
    # p(a), q(a) -> 1: log-probs like -1e-12, both sides, close and far apart
    e = -(10.0 ** -rng.uniform(1, 15, n))
    fam["near_one"] = (e, e * (1 + rng.uniform(-0.9, 3, n)))
    fam["near_one_close"] = (e, e * (1 + 10.0 ** -rng.uniform(3, 9, n)))
    fam["one_vs_not"] = (e, -rng.uniform(0.01, 5, n))
    fam["not_vs_one"] = (-rng.uniform(0.01, 5, n), e)
    # near-equal in the bulk (KL ~ d^2 down to 1e-24)
    a = -rng.uniform(0.01, 20, n)
    fam["near_equal"] = (a, a + a * 10.0 ** -rng.uniform(4, 12, n))
    fam["equal"] = (a, a.copy())
    # far tails: log-probs down to -1e4
    b = -(10.0 ** rng.uniform(1, 4, n))
    fam["deep"] = (b, b * (1 + rng.uniform(-0.5, 0.5, n)))
    fam["deep_vs_bulk"] = (b, -rng.uniform(0.0, 3, n))
    fam["bulk_vs_deep"] = (-rng.uniform(1e-6, 3, n), b)
    fam["random"] = (-rng.exponential(2.0, n), -rng.exponential(2.0, n))
    fam["edges"] = (
        np.array([0.0, 0.0, NEG_INF, NEG_INF, -1.0, -1e-300, -1e4, -5e-324]),
        np.array([-1.0, 0.0, -1.0, NEG_INF, NEG_INF, -2e-300, -1e4, -1e-323]),
    )
    return fam


def softmax_rows(rng: np.random.Generator, n: int, V: int, scale: float) -> np.ndarray:
    z = rng.standard_normal((n, V)) * scale
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


def topk_family(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Kept-set log-probabilities ``[n, K]`` (float64), by adversarial family."""
    fam = {}
    n, V = 8, 16
    z = rng.standard_normal((n, V)) * 2
    w = z + rng.standard_normal((n, V)) * 0.3
    lz = z - np.logaddexp.reduce(z, -1, keepdims=True)
    lw = w - np.logaddexp.reduce(w, -1, keepdims=True)
    order = np.argsort(-lz, -1)[:, :5]
    fam["random_k5"] = (np.take_along_axis(lz, order, -1), np.take_along_axis(lw, order, -1))
    fam["random_k1"] = (lz[:, :1], lw[:, :1])
    # near-identical rows (KL ~ 1e-12 .. 1e-20), moderate tails
    w2 = z + rng.standard_normal((n, V)) * 10.0 ** -rng.uniform(3, 9, (n, 1))
    lw2 = w2 - np.logaddexp.reduce(w2, -1, keepdims=True)
    fam["near_identical"] = (np.take_along_axis(lz, order, -1), np.take_along_axis(lw2, order, -1))
    # tiny tails: kept tokens near 0, tail tokens at -20..-60 (R ~ 1e-8 .. 1e-25)
    kept = rng.standard_normal((n, 4))
    tail_p = -rng.uniform(20, 60, (n, 1)) + rng.standard_normal((n, 12)) * 0.5
    tail_q = tail_p + rng.standard_normal((n, 12))
    zp = np.concatenate([kept, tail_p], -1)
    zq = np.concatenate([kept + rng.standard_normal((n, 4)) * 0.05, tail_q], -1)
    lzp = zp - np.logaddexp.reduce(zp, -1, keepdims=True)
    lzq = zq - np.logaddexp.reduce(zq, -1, keepdims=True)
    fam["tiny_tail"] = (lzp[:, :4], lzq[:, :4])
    # large tails: a few kept tokens out of a flat vocabulary of 10^5
    Vb = 100000
    lzb = np.full((n, 3), -math.log(Vb)) + rng.standard_normal((n, 3)) * 0.1
    fam["large_tail"] = (lzb, lzb + rng.standard_normal((n, 3)) * 0.2)
    # one token next to probability 1 (log-prob ~ -1e-12), the rest tiny
    eps_ = 10.0 ** -rng.uniform(6, 14, (n, 1))
    top = np.log1p(-eps_)
    rest_p = np.log(eps_) + np.log(rng.dirichlet(np.ones(3), n) * 0.5)
    rest_q = rest_p + rng.standard_normal((n, 3)) * 0.1
    top_q = np.log1p(-eps_ * (1 + rng.uniform(-0.5, 0.5, (n, 1))))
    fam["near_one"] = (np.concatenate([top, rest_p], -1), np.concatenate([top_q, rest_q], -1))
    # log-probs down to -1e4, empty slots and zero probabilities
    deep = -(10.0 ** rng.uniform(1, 4, (n, 3)))
    fam["deep"] = (deep, deep * (1 + rng.uniform(-0.1, 0.1, (n, 3))))
    ninf = np.array([[math.log(0.3), NEG_INF, math.log(0.2)], [math.log(0.5), math.log(0.1), NEG_INF],
                     [NEG_INF, NEG_INF, NEG_INF], [math.log(0.4), NEG_INF, NEG_INF]])
    ninq = np.array([[math.log(0.3), math.log(0.1), math.log(0.25)], [math.log(0.4), math.log(0.1), NEG_INF],
                     [math.log(0.5), NEG_INF, NEG_INF], [math.log(0.4), NEG_INF, NEG_INF]])
    fam["masked"] = (ninf, ninq)
    fam["equal"] = (lz[:, :6], lz[:, :6].copy())
    # tail cancellation: the kept tokens trade mass (delta) while the tail barely moves (c),
    # tails 1e-6 .. 1e-14 -- the case that needs R_q - R_p in double-double
    R = 10.0 ** -rng.uniform(6, 14, n)
    delta = R * 10.0 ** rng.uniform(-1, 1, n)
    c = R * 10.0 ** -rng.uniform(3, 7, n)
    pk = np.stack([np.full(n, 0.5), 0.5 - R], -1)
    qk = np.stack([0.5 + delta, 0.5 - R - delta - c], -1)
    fam["tail_cancel"] = (np.log(pk), np.log(qk))
    return fam


def _cast_valid(lp: np.ndarray, lq: np.ndarray, dt: torch.dtype, topk: bool):
    """Cast to ``dt`` (nearest) and keep the entries/rows that are valid exactly (log-prob <= 0
    after rounding; kept mass <= 1 -- a rounded row whose kept mass exceeds 1 has no exact value)."""
    tp = torch.from_numpy(lp).to(dt)
    tq = torch.from_numpy(lq).to(dt)
    if not topk:
        return tp, tq
    keep = []
    for i in range(tp.shape[0]):
        ok = True
        for t in (tp, tq):
            vals = as64(t[i])
            with mpmath.workdps(60):
                s = mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in vals)
            ok &= bool(s <= 1)
        keep.append(ok)
    keep = torch.tensor(keep)
    return tp[keep], tq[keep]


BIN = {"binary_tv": trmath.binary_tv, "binary_kl": trmath.binary_kl}
TOPK = {"topk_tv": trmath.topk_tv, "topk_kl": trmath.topk_kl}


# ------------------------------------------------------------------------------------------------
# accuracy against the oracles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", DTYPES, ids=dtname)
@pytest.mark.parametrize("name", sorted(BIN))
@pytest.mark.parametrize("seed", [1, 3])
def test_binary_accuracy_families(name, dt, seed):
    rng = np.random.default_rng(seed)
    rtol, atol = target_tolerance(dtname(dt))
    for fam, (lp, lq) in binary_family(rng).items():
        tp, tq = _cast_valid(lp, lq, dt, topk=False)
        got = BIN[name](tp, tq)
        assert got.dtype == (F64 if dt == F64 else torch.float32)
        ref = mp_coarse_batch(name, as64(tp), as64(tq))
        assert_close_to_reference(got, ref, rtol=rtol, atol=atol, name=f"{name}/{fam}/{dtname(dt)}")
        assert bool((got >= 0).all())
        if name.endswith("tv"):
            assert bool((got <= 1).all())


@pytest.mark.parametrize("dt", DTYPES, ids=dtname)
@pytest.mark.parametrize("name", sorted(TOPK))
@pytest.mark.parametrize("seed", [2, 3])
def test_topk_accuracy_families(name, dt, seed):
    rng = np.random.default_rng(seed)
    rtol, atol = target_tolerance(dtname(dt))
    checked = 0
    for fam, (lp, lq) in topk_family(rng).items():
        tp, tq = _cast_valid(lp, lq, dt, topk=True)
        if tp.shape[0] == 0:
            continue
        got = TOPK[name](tp, tq)
        ref = mp_coarse_batch(name, as64(tp), as64(tq))
        assert_close_to_reference(got, ref, rtol=rtol, atol=atol, inputs=(as64(tp), as64(tq)),
                                  name=f"{name}/{fam}/{dtname(dt)}")
        assert bool((got >= 0).all())
        checked += tp.shape[0]
    # rounding to 16 bits may push a few tiny-tail rows above mass 1; most rows must remain
    assert checked >= 50


def test_equal_inputs_give_exact_zero():
    rng = np.random.default_rng(3)
    for dt in DTYPES:
        lp = torch.from_numpy(-rng.exponential(3, 20)).to(dt)
        assert bool((trmath.binary_kl(lp, lp) == 0).all()) and bool((trmath.binary_tv(lp, lp) == 0).all())
        rows = torch.from_numpy(softmax_rows(rng, 5, 9, 2.0)[:, :4]).to(dt)
        if dt != F64:  # drop rounded rows whose kept mass exceeds 1 (see _cast_valid)
            rows, _ = _cast_valid(as64(rows), as64(rows), F64, topk=True)
        assert bool((trmath.topk_kl(rows, rows) == 0).all()) and bool((trmath.topk_tv(rows, rows) == 0).all())


# near-equal pairs next to probability 1, the regime that defeats the textbook formula
logprob = st.one_of(
    st.floats(min_value=-1e4, max_value=0.0),
    st.floats(min_value=-1e-3, max_value=0.0),
    st.floats(min_value=-50.0, max_value=-1e-20),
)


@given(lp=logprob, r=st.one_of(st.floats(-1e-6, 1e-6), st.floats(-0.99, 5.0)), dt=st.sampled_from(DTYPES))
@example(lp=-1e-12, r=1e-9, dt=torch.float64)
@example(lp=-1e4, r=0.0, dt=torch.float32)
@example(lp=-5e-324, r=1.0, dt=torch.float64)
def test_binary_accuracy_hypothesis(lp, r, dt):
    lq = min(lp * (1 + r), 0.0)
    tp, tq = torch.tensor([lp], dtype=F64).to(dt), torch.tensor([lq], dtype=F64).to(dt)
    rtol, atol = target_tolerance(dtname(dt))
    a, b = float(tp.to(F64)), float(tq.to(F64))
    for name, ref in (("binary_kl", mp_binary_kl(a, b)), ("binary_tv", mp_binary_tv(a, b))):
        assert_close_to_reference(BIN[name](tp, tq), [ref], rtol=rtol, atol=atol, name=name)


@given(
    seed=st.integers(0, 2**32 - 1),
    V=st.integers(2, 12),
    scale=st.sampled_from([0.1, 1.0, 4.0, 20.0]),
    noise=st.sampled_from([1e-8, 1e-4, 0.1, 2.0]),
    dt=st.sampled_from([torch.float32, torch.float64]),
)
# found by the nightly profile: float64 log-probabilities summing to 1 - 8e-26 (the log kept
# mass's double-double logsumexp held the tail to 2e-8 relative only)
@example(seed=2229646, V=2, scale=20.0, noise=1e-8, dt=torch.float64)
def test_topk_accuracy_hypothesis(seed, V, scale, noise, dt):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, V + 1))
    z = softmax_rows(rng, 1, V, scale)
    w = z + rng.standard_normal((1, V)) * noise
    w = w - np.logaddexp.reduce(w, -1, keepdims=True)
    idx = rng.permutation(V)[:K]
    tp, tq = _cast_valid(z[:, idx], w[:, idx], dt, topk=True)
    if tp.shape[0] == 0:
        return
    rtol, atol = target_tolerance(dtname(dt))
    for name, oracle in (("topk_kl", mp_topk_kl), ("topk_tv", mp_topk_tv)):
        ref = [oracle(as64(tp[0]), as64(tq[0]))]
        assert_close_to_reference(TOPK[name](tp, tq), ref, rtol=rtol, atol=atol,
                                  inputs=(as64(tp), as64(tq)), name=name)


def test_numpy_in_numpy_out():
    lp, lq = np.array([-0.5, -2.0]), np.array([-0.7, -1.5])
    out = trmath.binary_kl(lp, lq)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    out = trmath.topk_tv(lp.astype(np.float32)[None], lq.astype(np.float32)[None])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1,)


# ------------------------------------------------------------------------------------------------
# properties: ordering, data processing, TV gap, ranges
# ------------------------------------------------------------------------------------------------
def _le(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-12, atol: float = 1e-300) -> bool:
    """``a <= b`` up to the float64 rounding of either side (both are accurate to ~1e-15)."""
    return bool((a <= b + rel * b.abs() + atol).all())


def _rounding_slack(fn, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """First-order effect on ``fn`` of the rounding of its float64 log-probability inputs.

    The builder's and ``token_logprobs``' log-probabilities are rounded (a few ulps of
    ``max(1, |l|)``); comparisons between divergences computed from *different* rounded inputs
    (or against the exact divergence of the full rows) allow ``sum |d fn / d l_i| * 4 ulp``.
    """
    a = lp.detach().clone().requires_grad_(True)
    b = lq.detach().clone().requires_grad_(True)
    ga, gb = torch.autograd.grad(fn(a, b).sum(), (a, b))
    u = 4 * 2.0**-52
    fin = lambda g, x: torch.where(torch.isfinite(x), g.abs() * x.abs().clamp_min(1.0), torch.zeros_like(g))
    return u * (fin(ga, a) + fin(gb, b)).nan_to_num(0.0, posinf=0.0).reshape(*lp.shape[:lp.dim() - (0 if fn in BIN.values() else 1)], -1).sum(-1)


@given(seed=st.integers(0, 2**32 - 1), V=st.integers(2, 40), k=st.integers(1, 40),
       scale=st.sampled_from([0.3, 2.0, 8.0]), noise=st.sampled_from([1e-6, 0.05, 1.0]),
       slots=st.sampled_from(["k_plus_1", "exactly_k"]))
@example(seed=0, V=2, k=1, scale=0.3, noise=1e-6, slots="k_plus_1")  # binary = exact: rounded inputs
@example(seed=0, V=2, k=1, scale=0.3, noise=0.05, slots="k_plus_1")  # k + 1 = V: rounding-level tail
def test_binary_le_topk_le_exact(seed, V, k, scale, noise, slots):
    rng = np.random.default_rng(seed)
    k = min(k, V)
    z = torch.from_numpy(rng.standard_normal((6, V)) * scale)
    w = z + torch.from_numpy(rng.standard_normal((6, V)) * noise)
    tok = torch.from_numpy(rng.integers(0, V, 6))
    ids, lp, lq = trmath.topk_logprobs(z, w, k, tok, slots=slots)
    assert bool((ids == tok[:, None]).any(-1).all())  # the sampled token is always kept
    la = trmath.token_logprobs(z, tok)
    lb = trmath.token_logprobs(w, tok)
    # Rows whose kept set leaves a tail at the rounding level of the log-probabilities (< 1e-9,
    # e.g. k = V) have tails that the rounded inputs do not determine (topk_kl may even be +inf:
    # exact for those inputs, see docs/theory/coarse.rst); the ordering is checked on the others.
    outside = torch.ones_like(z, dtype=torch.bool).scatter(-1, ids, False)
    ninf = torch.tensor(NEG_INF, dtype=F64)
    tail_p = torch.where(outside, z.log_softmax(-1), ninf).logsumexp(-1)
    tail_q = torch.where(outside, w.log_softmax(-1), ninf).logsumexp(-1)
    ok = torch.minimum(tail_p, tail_q) > math.log(1e-9)
    for b_fn, t_fn, e_fn in ((trmath.binary_kl, trmath.topk_kl, trmath.kl),
                             (trmath.binary_tv, trmath.topk_tv, trmath.tv)):
        b, t, e = b_fn(la, lb), t_fn(lp, lq), e_fn(z, w)
        sb, st_ = _rounding_slack(b_fn, la, lb), _rounding_slack(t_fn, lp, lq)
        assert _le(b, e, atol=sb)
        assert _le(b[ok], t[ok], atol=(sb + st_)[ok]) and _le(t[ok], e[ok], atol=st_[ok]), (b, t, e)
    # topk_tv misses at most (R_p + R_q)/2
    Rp = -torch.expm1(trmath.logsumexp(lp).clamp_max(0))
    Rq = -torch.expm1(trmath.logsumexp(lq).clamp_max(0))
    gap = trmath.tv(z, w) - trmath.topk_tv(lp, lq)
    assert bool((gap <= 0.5 * (Rp + Rq) + 1e-12).all())


@given(seed=st.integers(0, 2**32 - 1), V=st.integers(2, 30), blocks=st.integers(2, 8),
       noise=st.sampled_from([1e-7, 0.1, 1.5]))
@example(seed=246, V=2, blocks=2, noise=1e-7)  # empty tail block
def test_data_processing_any_partition(seed, V, blocks, noise):
    """Coarse-graining into any partition (blocks' masses as the kept set, the last block as
    the tail) gives at most the exact divergence, and merging two kept blocks lowers it again."""
    rng = np.random.default_rng(seed)
    z = torch.from_numpy(rng.standard_normal((4, V)) * 3)
    w = z + torch.from_numpy(rng.standard_normal((4, V)) * noise)
    lz, lw = z.log_softmax(-1), w.log_softmax(-1)
    labels = rng.integers(0, blocks, V)
    kept = [b for b in range(blocks - 1) if (labels == b).any()]
    if not kept:
        return
    # block log-masses via the exact logsumexp (the tail block 'blocks - 1' is left out)
    bp = torch.stack([trmath.logsumexp(lz[:, torch.from_numpy(labels == b)]) for b in kept], -1)
    bq = torch.stack([trmath.logsumexp(lw[:, torch.from_numpy(labels == b)]) for b in kept], -1)
    bp, bq = bp.clamp_max(0), bq.clamp_max(0)
    # rows whose tail block holds rounding-level mass are not determined by the rounded inputs
    # (an empty tail block: the kept blocks cover the row and their rounded masses decide R)
    outside = torch.from_numpy(labels == blocks - 1)
    if not bool(outside.any()):
        return
    tail = torch.minimum(trmath.logsumexp(torch.where(outside, lz, NEG_INF)),
                         trmath.logsumexp(torch.where(outside, lw, NEG_INF)))
    ok = tail > math.log(1e-9)
    for t_fn, e_fn in ((trmath.topk_kl, trmath.kl), (trmath.topk_tv, trmath.tv)):
        part = t_fn(bp, bq)
        s_part = _rounding_slack(t_fn, bp, bq)
        assert _le(part[ok], e_fn(z, w)[ok], atol=s_part[ok])
        if len(kept) >= 2:  # merge the first two kept blocks: coarser again
            mp_ = torch.cat([torch.logaddexp(bp[:, :1], bp[:, 1:2]), bp[:, 2:]], -1).clamp_max(0)
            mq_ = torch.cat([torch.logaddexp(bq[:, :1], bq[:, 1:2]), bq[:, 2:]], -1).clamp_max(0)
            sl = s_part + _rounding_slack(t_fn, mp_, mq_)
            assert _le(t_fn(mp_, mq_)[ok], part[ok], atol=sl[ok])
            # dropping a kept block into the tail is also a coarsening (same inputs: no slack)
            assert _le(t_fn(bp[:, 1:], bq[:, 1:])[ok], part[ok], atol=s_part[ok])


@given(lp=st.floats(-1e4, 0.0), lq=st.floats(-1e4, 0.0), dt=st.sampled_from(DTYPES))
def test_ranges(lp, lq, dt):
    tp, tq = torch.tensor([lp]).to(dt), torch.tensor([lq]).to(dt)
    assert float(trmath.binary_kl(tp, tq)) >= 0
    assert 0 <= float(trmath.binary_tv(tp, tq)) <= 1
    both = torch.stack([tp, tq], -1)
    assert 0 <= float(trmath.topk_tv(both[:, :1], both[:, 1:])) <= 1


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted({**BIN, **TOPK}))
def test_gradcheck(name):
    rng = np.random.default_rng(5)
    fn = {**BIN, **TOPK}[name]
    if name.startswith("binary"):
        lp = torch.tensor([-0.3, -1e-3, -4.0, -0.7], dtype=F64)
        lq = torch.tensor([-0.9, -2e-3, -3.0, -0.2], dtype=F64)
    else:
        rows = softmax_rows(rng, 3, 8, 1.0)
        lp = torch.from_numpy(rows[:, :4].copy())
        lq = torch.from_numpy((rows[:, :4] + rng.standard_normal((3, 4)) * 0.3).copy()).clamp_max(-0.05)
        lq = lq - torch.logsumexp(lq, -1, keepdim=True) + math.log(0.9)
    lp.requires_grad_(True)
    lq.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b), (lp, lq), eps=1e-7, atol=1e-8, rtol=1e-6)


def _mp_def(kind, lps, lqs):
    """The definition as an mpmath function of mpf log-probabilities (for mpmath.diff)."""
    p = [mpmath.exp(v) for v in lps]
    q = [mpmath.exp(v) for v in lqs]
    Rp, Rq = 1 - mpmath.fsum(p), 1 - mpmath.fsum(q)
    if kind.endswith("kl"):
        return mpmath.fsum(a * mpmath.log(a / b) for a, b in zip(p, q)) + Rp * mpmath.log(Rp / Rq)
    return (mpmath.fsum(abs(a - b) for a, b in zip(p, q)) + abs(Rp - Rq)) / 2


@pytest.mark.parametrize("kind", ["kl", "tv"])
def test_gradients_against_mpmath(kind):
    pts = [([-1e-9, -25.0], [-3e-9, -24.0]), ([-0.4, -1.6, -3.0], [-0.5, -1.2, -2.5]), ([-0.2], [-1e-6])]
    with mpmath.workdps(60):
        for lps, lqs in pts:
            tp = torch.tensor(lps, dtype=F64, requires_grad=True)
            tq = torch.tensor(lqs, dtype=F64, requires_grad=True)
            fn = trmath.topk_kl if kind == "kl" else trmath.topk_tv
            fn(tp[None], tq[None]).sum().backward()
            K = len(lps)
            xs = [mpmath.mpf(v) for v in lps + lqs]
            for j in range(2 * K):
                def f(t, j=j):
                    ys = list(xs)
                    ys[j] = t
                    return _mp_def(kind, ys[:K], ys[K:])
                ref = mpmath.diff(f, xs[j])
                got = float((tp.grad if j < K else tq.grad)[j % K])
                # atol: mpmath.diff's finite differences at 60 digits are exact to ~1e-50 of the
                # function's scale; a true 0 (TV is piecewise linear) comes back as ~1e-73 noise
                assert abs(got - ref) <= 1e-12 * abs(ref) + 1e-40, (lps, lqs, j, got, ref)


def test_gradients_binary_match_topk_k1():
    lp = torch.tensor([-0.3, -1e-10, -7.0], dtype=F64, requires_grad=True)
    lq = torch.tensor([-0.5, -3e-10, -6.0], dtype=F64, requires_grad=True)
    for b_fn, t_fn in ((trmath.binary_kl, trmath.topk_kl), (trmath.binary_tv, trmath.topk_tv)):
        gb = torch.autograd.grad(b_fn(lp, lq).sum(), (lp, lq))
        gt = torch.autograd.grad(t_fn(lp[:, None], lq[:, None]).sum(), (lp, lq))
        for a, b in zip(gb, gt):
            assert torch.allclose(a, b, rtol=1e-13, atol=0)


def test_builder_gradcheck():
    rng = np.random.default_rng(6)
    z = torch.from_numpy(rng.standard_normal((3, 7))).requires_grad_(True)
    w = torch.from_numpy(rng.standard_normal((3, 7))).requires_grad_(True)
    tok = torch.tensor([6, 0, 3])

    def f(z, w):
        ids, lp, lq = trmath.topk_logprobs(z, w, 2, tok, temperature=0.7)
        return trmath.topk_kl(lp, lq)

    assert torch.autograd.gradcheck(f, (z, w), eps=1e-6, atol=1e-7, rtol=1e-5)
    ids = torch.tensor([[0, 4], [6, 6], [1, 2]])
    assert torch.autograd.gradcheck(lambda z: trmath.gather_logprobs(z, ids, temperature=1.3), (z,))


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def test_builder_slots():
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]], dtype=F64)
    w = z.flip(-1)
    tok = torch.tensor([3, 1])
    ids, lp, lq = trmath.topk_logprobs(z, w, 2, tok)
    assert ids.tolist() == [[0, 1, 3], [0, 1, 1]]
    # the extra slot of row 1 is empty: -inf on both sides, so the tail is that of top-2
    assert lp[1, 2] == NEG_INF and lq[1, 2] == NEG_INF
    assert torch.equal(trmath.topk_kl(lp[1:], lq[1:]), trmath.topk_kl(lp[1:, :2], lq[1:, :2]))
    ids, lp, lq = trmath.topk_logprobs(z, w, 2, tok, slots="exactly_k")
    assert ids.tolist() == [[0, 3], [0, 1]]
    ref = torch.log_softmax(z, -1).gather(-1, ids)
    assert torch.allclose(lp, ref, rtol=1e-15, atol=0)
    ids, lp, lq = trmath.topk_logprobs(z, w, 3)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]


@pytest.mark.parametrize("dt", DTYPES, ids=dtname)
def test_builder_logprobs_accuracy(dt):
    """Builder log-probs against the 50-digit log-softmax (near-1 probabilities included)."""
    from trmath.testing import mp_log_softmax

    rng = np.random.default_rng(7)
    z = torch.from_numpy(np.concatenate([rng.standard_normal((3, 9)) * 3,
                                         np.array([[40.0] + [0.0] * 8])], 0)).to(dt)
    w = torch.from_numpy(rng.standard_normal((4, 9))).to(dt)
    ids, lp, lq = trmath.topk_logprobs(z, w, 3, torch.tensor([8, 0, 5, 4]), temperature=0.8)
    assert lp.dtype == (F64 if dt == F64 else torch.float32)
    # float32 results of 16/32-bit logits: log p(argmax) is a rounded float32 (6e-8 relative)
    rtol = 1e-13 if dt == F64 else 2e-7
    for x, l in ((z, lp), (w, lq)):
        for i in range(4):
            ref = np.array([float(v) for v in mp_log_softmax(as64(x[i]), temperature=0.8)])
            sel = l[i].to(F64).numpy()
            want = ref[ids[i].numpy()]
            want = np.where(np.arange(len(want)) == len(want) - 1, np.where(sel[-1] == NEG_INF, NEG_INF, want), want)
            assert_close_to_reference(sel, want, rtol=rtol, atol=1e-300, name=f"builder/{dtname(dt)}")


def test_builder_numpy_and_scalar_batches():
    z = np.array([[1.0, 0.5, -1.0, 0.0]])
    w = np.array([[0.5, 1.0, -1.0, 0.0]])
    ids, lp, lq = trmath.topk_logprobs(z, w, 2, np.array([2]))
    assert isinstance(ids, np.ndarray) and isinstance(lp, np.ndarray) and lp.dtype == np.float64
    assert ids.tolist() == [[0, 1, 2]]
    # one row without batch axes: [V] logits, 0-d token, [K] log-probs, 0-d results
    ids1, lp1, lq1 = trmath.topk_logprobs(torch.from_numpy(z[0]), torch.from_numpy(w[0]), 2, torch.tensor(2))
    assert ids1.tolist() == [0, 1, 2] and trmath.topk_kl(lp1, lq1).shape == ()
    assert float(trmath.topk_kl(lp1, lq1)) == float(trmath.topk_kl(torch.from_numpy(lp), torch.from_numpy(lq))[0])
    assert trmath.binary_kl(torch.tensor(-0.1), torch.tensor(-0.2)).shape == ()


def test_builder_shift_invariance():
    rng = np.random.default_rng(8)
    z = torch.from_numpy(np.round(rng.standard_normal((5, 11)) * 64) / 64)  # dyadic: shifts exact
    w = torch.from_numpy(np.round(rng.standard_normal((5, 11)) * 64) / 64)
    tok = torch.from_numpy(rng.integers(0, 11, 5))
    ids0, lp0, lq0 = trmath.topk_logprobs(z, w, 4, tok)
    ids1, lp1, lq1 = trmath.topk_logprobs(z + 37.5, w - 1024.0, 4, tok)
    assert torch.equal(ids0, ids1)
    # the shift cancels exactly in z_i - M; log p(argmax) agrees to a few ulps
    assert torch.allclose(lp0, lp1, rtol=4e-16, atol=0) and torch.allclose(lq0, lq1, rtol=4e-16, atol=0)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, F64], ids=dtname)
def test_builder_backend_parity(dt):
    """C++ kernels (CPU default) and the pure-torch backend give the same builder outputs."""
    rng = np.random.default_rng(9)
    z = torch.from_numpy(rng.standard_normal((6, 50)) * 4).to(dt)
    w = torch.from_numpy(rng.standard_normal((6, 50)) * 4).to(dt)
    tok = torch.from_numpy(rng.integers(0, 50, 6))
    a = trmath.topk_logprobs(z, w, 5, tok)
    _ops._FORCE_TORCH[0] = True
    try:
        b = trmath.topk_logprobs(z, w, 5, tok)
    finally:
        _ops._FORCE_TORCH[0] = False
    assert torch.equal(a[0], b[0])
    rtol = 1e-14 if dt == F64 else 2e-7  # both backends meet the lse target; results may differ by an ulp
    for x, y in zip(a[1:], b[1:]):
        assert torch.allclose(x.to(F64), y.to(F64), rtol=rtol, atol=0)


def test_bitwise_determinism():
    """Same bits on repeated calls and whatever the row's position / batch size."""
    rng = np.random.default_rng(10)
    z = torch.from_numpy(rng.standard_normal((64, 300)) * 3).float()
    w = z + torch.from_numpy(rng.standard_normal((64, 300)) * 0.1).float()
    tok = torch.from_numpy(rng.integers(0, 300, 64))
    ids, lp, lq = trmath.topk_logprobs(z, w, 8, tok)
    kl, tv = trmath.topk_kl(lp, lq), trmath.topk_tv(lp, lq)
    ids2, lp2, lq2 = trmath.topk_logprobs(z, w, 8, tok)
    assert torch.equal(lp, lp2) and torch.equal(lq, lq2) and torch.equal(kl, trmath.topk_kl(lp2, lq2))
    perm = torch.from_numpy(rng.permutation(64))
    idsp, lpp, lqp = trmath.topk_logprobs(z[perm], w[perm], 8, tok[perm])
    assert torch.equal(lpp, lp[perm]) and torch.equal(trmath.topk_kl(lpp, lqp), kl[perm])
    one = trmath.topk_logprobs(z[17:18], w[17:18], 8, tok[17:18])
    assert torch.equal(one[1], lp[17:18]) and torch.equal(trmath.topk_tv(one[1], one[2]), tv[17:18])
    la, lb = lp[:, -1], lq[:, -1]
    assert torch.equal(trmath.binary_kl(la, lb)[5:9], trmath.binary_kl(la[5:9], lb[5:9]))
    # and whatever the number of threads of the CPU kernels
    trmath.set_num_threads(1)
    ids1, lp1, lq1 = trmath.topk_logprobs(z, w, 8, tok)
    assert torch.equal(lp1, lp) and torch.equal(lq1, lq) and torch.equal(trmath.topk_kl(lp1, lq1), kl)


# ------------------------------------------------------------------------------------------------
# the textbook float32 formulas (docs/theory/coarse.rst quotes these numbers)
# ------------------------------------------------------------------------------------------------
def textbook_binary_kl_f32(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q) + (1-p) log((1-p+1e-8)/(1-q+1e-8))`` in float32, as commonly written."""
    p, q = lp.float().exp(), lq.float().exp()
    return p * (lp.float() - lq.float()) + (1 - p) * torch.log((1 - p + 1e-8) / (1 - q + 1e-8))


def textbook_topk_kl_no_tail_f32(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """``sum_S p_i (log p_i - log q_i)`` in float32, without the tail bucket."""
    return (lp.float().exp() * (lp.float() - lq.float())).sum(-1)


DEMO_BINARY = [(-1e-3, -2e-3), (-1e-5, -2e-5), (-1e-7, -2e-7), (-1e-9, -2e-9)]
DEMO_TOPK = ([math.log(0.3), math.log(0.2)], [math.log(0.45), math.log(0.25)])


def demo_rows():
    """The demonstration of docs/theory/coarse.rst: (textbook, ours, reference) per case."""
    out = []
    for a, b in DEMO_BINARY:
        tp, tq = torch.tensor([a]), torch.tensor([b])  # float32 inputs
        ref = mp_binary_kl(float(tp), float(tq))
        out.append(("binary", a, b, float(textbook_binary_kl_f32(tp, tq)), float(trmath.binary_kl(tp, tq)), ref))
    tp, tq = torch.tensor([DEMO_TOPK[0]]), torch.tensor([DEMO_TOPK[1]])
    ref = mp_topk_kl(as64(tp[0]), as64(tq[0]))
    out.append(("topk", DEMO_TOPK[0], DEMO_TOPK[1], float(textbook_topk_kl_no_tail_f32(tp, tq)),
                float(trmath.topk_kl(tp, tq)), ref))
    return out


def test_textbook_demo():
    for kind, a, b, naive, ours, ref in demo_rows():
        assert abs(ours - ref) <= 1e-5 * abs(ref)
        if kind == "binary":
            if a >= -1e-7:  # p(a) within 1e-7 of 1: the +1e-8 form is off by > 50 %
                assert abs(naive - ref) > 0.5 * abs(ref)
        else:
            assert naive < 0 < ref  # the truncated sum is negative; the true value is not


if __name__ == "__main__":  # print the table quoted in the docs
    for row in demo_rows():
        kind, a, b, naive, ours, ref = row
        print(f"{kind}: {a} {b} textbook={naive:.6e} ours={ours:.6e} ref={mpmath.nstr(ref, 8)}")


# ------------------------------------------------------------------------------------------------
# the double-double helpers behind the Top-K tails
# ------------------------------------------------------------------------------------------------
def test_double_double_helpers_against_mpmath():
    from trmath._coarse_impl import dd_exp, dd_expm1, dd_kept_difference, dd_tail_mass

    rng = np.random.default_rng(11)
    x = np.concatenate([-rng.exponential(3.0, 40), -(10.0 ** -rng.uniform(1, 300, 20)),
                        [-0.34, -0.35, -0.5 * math.log(2), -700.0, 0.0]])
    t = torch.from_numpy(x)
    with mpmath.workdps(80):
        for fn, ref_fn in ((dd_exp, mpmath.exp), (dd_expm1, mpmath.expm1)):
            h, lo = fn(t)
            for xi, hi_, lo_ in zip(x, h.tolist(), lo.tolist()):
                ref = ref_fn(mpmath.mpf(float(xi)))
                got = mpmath.mpf(hi_) + mpmath.mpf(lo_)
                # 2^-100 relative; below 1e-292 the low part is subnormal (absolute 1e-320)
                assert abs(got - ref) <= abs(ref) * mpmath.mpf(2) ** -100 + mpmath.mpf(10) ** -320, (fn, xi)
        lp = torch.from_numpy(np.log(np.array([[0.5, 0.5 - 1e-10, 1e-12], [0.9, 1e-3, 1e-5]])))
        lq = torch.from_numpy(np.log(np.array([[0.5 + 1e-10, 0.5 - 2e-10 - 1e-15, 1e-12], [0.8, 2e-3, 1e-5]])))
        c = dd_kept_difference(lp, lq)
        rh, rl, ok, err = dd_tail_mass(lp)
        for i in range(2):
            p = [mpmath.exp(mpmath.mpf(float(v))) for v in lp[i]]
            q = [mpmath.exp(mpmath.mpf(float(v))) for v in lq[i]]
            # 2^-99 of the kept mass from the double-double sum, plus the final rounding to float64
            assert abs(mpmath.mpf(float(c[i])) - mpmath.fsum(a - b for a, b in zip(p, q))) <= 2.0**-99 + 2.0**-53 * abs(float(c[i]))
            R = 1 - mpmath.fsum(p)
            assert bool(ok[i]) and abs(mpmath.mpf(float(rh[i])) + mpmath.mpf(float(rl[i])) - R) <= float(err[i])


def test_topk_tail_cancellation_point():
    """Kept tokens trade mass, the tail barely moves: the case that needs double-double."""
    p = [0.5, 0.5 - 1e-10]
    q = [0.5 + 1e-10, 0.5 - 2e-10 - 1e-15]
    lp = torch.tensor([[math.log(v) for v in p]], dtype=F64)
    lq = torch.tensor([[math.log(v) for v in q]], dtype=F64)
    ref = mp_topk_kl(lp[0], lq[0])
    assert_close_to_reference(trmath.topk_kl(lp, lq), [ref], rtol=1e-12, atol=1e-300, name="tail_cancel")


def _filled_tail_rows(dt: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 4]`` rows of ``dt`` log-probabilities whose kept mass is within ~1e-9 ... 1e-20 of 1
    although no kept probability is near 1: two or three shares of the mass rounded to ``dt``,
    then entries that fill the deficit left by that rounding, each rounded in turn (so the tail
    is what the last rounding leaves). ``lq`` moves the last entry by a few ulps. Rows whose
    kept mass exceeds 1 are dropped (they have no exact value)."""
    rng = np.random.default_rng(seed)
    rows_p, rows_q = [], []
    with mpmath.workdps(80):
        while len(rows_p) < n:
            shares = int(rng.integers(2, 4))
            base = [float(torch.tensor(math.log(1.0 / shares) - rng.uniform(0, 1e-6), dtype=torch.float64).to(dt))] * shares
            row = base[:3]
            while len(row) < 4:
                deficit = 1 - mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in row)
                if deficit <= 0:
                    break
                row.append(float(torch.tensor(float(mpmath.log(deficit * (1 - rng.uniform(0, 1e-3)))),
                                              dtype=torch.float64).to(dt)))
            if len(row) < 4:
                continue
            q = list(row)
            q[-1] = float(torch.tensor(q[-1], dtype=dt) * (1 + 3 * torch.finfo(dt).eps))
            ok = all(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in r) <= 1 for r in (row, q))
            if ok and max(row + q) <= 0:
                rows_p.append(row)
                rows_q.append(q)
    return torch.tensor(rows_p, dtype=torch.float64).to(dt), torch.tensor(rows_q, dtype=torch.float64).to(dt)


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16], ids=dtname)
@pytest.mark.parametrize("name", sorted(TOPK))
def test_topk_kept_mass_near_one_without_a_dominant_token(name, dt, on_both_paths):
    """Kept masses within 1e-9 ... 1e-20 of 1 while the largest kept log-prob is far below 0
    (log(1/2), log(1/3)): log M + log(k + R) cancels there, and the tail masses R_p, R_q -- all
    the KL's tail term and TV's |R_q - R_p| see -- must not inherit that cancellation. Kernel and
    torch path against mpmath at the target tolerance; gradients against the float64 path
    (double-double) within 1e-6 of the row's largest."""
    tp, tq = _filled_tail_rows(dt, 24, seed=hash(dtname(dt)) % 1000)
    rtol, atol = target_tolerance(dtname(dt))
    ref = mp_coarse_batch(name, as64(tp), as64(tq))

    def run():
        a, b = tp.clone().requires_grad_(), tq.clone().requires_grad_()
        v = TOPK[name](a, b)
        v.sum().backward()
        return v.detach(), a.grad, b.grad
    for path, (v, gp, gq) in zip(("kernel", "torch"), on_both_paths(run)):
        assert_close_to_reference(v, ref, rtol=rtol, atol=atol, inputs=(as64(tp), as64(tq)),
                                  name=f"{name}/filled_tail/{dtname(dt)}/{path}")
        a64, b64 = tp.double().requires_grad_(), tq.double().requires_grad_()
        TOPK[name](a64, b64).sum().backward()
        for g, g64 in ((gp, a64.grad), (gq, b64.grad)):
            # One ulp of the gradient's dtype plus 1e-6 of the row's largest: the allowance of
            # test_topk_kernel_matches_the_torch_path, for the same reason -- without the float64
            # inputs' refinements of c, the KL gradients p_j (d_R - d_j) carry ~1e-7 of the row's
            # largest (measured 9e-8 there), a hundredth of the 1e-5 target.
            scale = g64.abs().amax(-1, keepdim=True)
            assert bool(((g.double() - g64).abs() <= torch.finfo(dt).eps * g64.abs() + 1e-6 * scale).all()), path


def test_subnormal_log_probs_float64(on_both_paths):
    """float64 log-probabilities that are subnormal (p within 5e-324 of 1): the tail 1 - p is then
    subnormal and its ratio to the other tail leaves the float64 range (0.6 / 5e-324) or becomes
    subnormal itself; d_R = log(R_q / R_p) must come from the difference of the logs there (it
    once overflowed and dropped the tail term: 0.368 for an exact 1.0). Binary and Top-K (K = 1,
    and K = 2 with an empty slot), both paths, against mpmath to 1e-12."""
    tiny = [-5e-324, -1e-320, -1e-310, -2.2250738585072014e-308]
    other = [-1.0, -0.5, -1e-300, -30.0]
    lp = torch.tensor([a for a in tiny for _ in other] + [b for _ in tiny for b in other], dtype=F64)
    lq = torch.tensor([b for _ in tiny for b in other] + [a for a in tiny for _ in other], dtype=F64)
    for name in sorted(BIN):
        ref = mp_coarse_batch(name, as64(lp), as64(lq))
        for path, got in zip(("kernel", "torch"), on_both_paths(lambda: BIN[name](lp, lq))):
            assert_close_to_reference(got, ref, rtol=1e-12, atol=1e-300, name=f"{name}/{path}")
    ninf = torch.full_like(lp, -math.inf)
    for name in sorted(TOPK):
        for tp, tq in ((lp[:, None], lq[:, None]), (torch.stack([lp, ninf], -1), torch.stack([lq, ninf], -1))):
            ref = mp_coarse_batch(name, as64(tp), as64(tq))
            assert_close_to_reference(TOPK[name](tp, tq), ref, rtol=1e-12, atol=1e-300, name=name)


@pytest.mark.parametrize("dt", DTYPES, ids=dtname)
def test_topk_result_does_not_depend_on_layout(dt):
    """The same rows stored K-major (a transposed copy, transposed back) give bitwise the same
    values and gradients as contiguous rows."""
    g = torch.Generator().manual_seed(4)
    for shape in ((24, 5), (4, 6, 5), (64, 20)):
        n, K = int(np.prod(shape[:-1])), shape[-1]
        P = torch.log_softmax(torch.randn(n, K + 3, generator=g, dtype=F64), -1)[:, :K].reshape(shape).to(dt)
        Q = torch.log_softmax(torch.randn(n, K + 3, generator=g, dtype=F64), -1)[:, :K].reshape(shape).to(dt)
        perm = (len(shape) - 1,) + tuple(range(len(shape) - 1))
        inv = tuple(range(1, len(shape))) + (0,)
        for name, fn in sorted(TOPK.items()):
            outs = []
            for a, b in ((P, Q), (P.permute(*perm).contiguous().permute(*inv), Q.permute(*perm).contiguous().permute(*inv))):
                a, b = a.clone().requires_grad_() if a.is_contiguous() else a.detach().requires_grad_(), b.detach().requires_grad_()
                v = fn(a, b)
                ga, gb = torch.autograd.grad(v.sum(), (a, b))
                outs.append((v.detach(), ga, gb))
            for x, y in zip(*outs):
                assert torch.equal(x, y), (name, shape)


def test_topk_kept_mass_rounding_to_one():
    """A float32 row whose kept mass is 1 - 1e-17 with two tokens at log(1/2) (rounded): the log
    kept mass computed as M + log(k + R) rounds to 0 in float64, which once emptied both tails
    (TV off by half, KL by all of it)."""
    lp = torch.tensor([[-0.6931471824645996, -0.6931471824645996, -20.079490661621094, -27.630691528320312]])
    lq = torch.tensor([[-0.6931471824645996, -0.6931471824645996, -20.079490661621094, -27.63071060180664]])
    rtol, atol = target_tolerance("float32")
    for name in sorted(TOPK):
        ref = mp_coarse_batch(name, as64(lp), as64(lq))
        assert_close_to_reference(TOPK[name](lp, lq), ref, rtol=rtol, atol=atol, name=name)


# ------------------------------------------------------------------------------------------------
# the binary element kernel (CPU) against the float64 torch formulas that serve other devices
# ------------------------------------------------------------------------------------------------


def _binary_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 pairs over the binary families, tiled to n entries (several kernel chunks)."""
    fam = binary_family(np.random.default_rng(seed))
    lp = np.concatenate([a.reshape(-1) for a, _ in fam.values()])
    lq = np.concatenate([b.reshape(-1) for _, b in fam.values()])
    reps = -(-n // lp.size)
    return torch.from_numpy(np.tile(lp, reps)[:n]), torch.from_numpy(np.tile(lq, reps)[:n])


@pytest.mark.parametrize("dt", DTYPES, ids=dtname)
@pytest.mark.parametrize("name", sorted(BIN))
def test_binary_kernel_matches_the_torch_path(name, dt, on_both_paths):
    """Values and both gradients over the adversarial families (near 1, deep, -inf, equal, ...)
    plus rounding above 0 (clamped, zero gradient), across chunk boundaries: the kernel and the
    float64 torch formulas agree to the accuracy target of the dtype, in every entry."""
    n = 3 * 16384 + 11
    lp, lq = _binary_batch(n, 4)
    tol = 4 * torch.finfo(dt).eps
    lp[7], lq[9] = 0.5 * tol, 0.25 * tol  # rounding above 0: clamped to 0
    tp, tq = lp.to(dt), lq.to(dt)
    gout = torch.linspace(0.5, 1.5, n).to(F64 if dt == F64 else torch.float32)

    def run():
        a, b = tp.clone().requires_grad_(), tq.clone().requires_grad_()
        v = BIN[name](a, b)
        v.backward(gout)
        return v.detach(), a.grad, b.grad
    (v1, gp1, gq1), (v2, gp2, gq2) = on_both_paths(run)
    # Both paths evaluate the same formulas in float64, each within ~10 eps of the exact value
    # (docs/theory/coarse.rst): float64 results may differ by ~20 eps (32 allowed; measured 4),
    # and rounded to float32 or to a 16-bit gradient dtype by at most one ulp of that dtype.
    rtol = 32 * 2.0**-53 if dt == F64 else 2.0**-23
    assert v1.dtype == v2.dtype and torch.equal(torch.isinf(v1), torch.isinf(v2))
    fin = torch.isfinite(v2)
    assert torch.allclose(v1[fin], v2[fin], rtol=rtol, atol=0.0)
    # Gradients: the KL ones are differences (d_R - d, q expm1(-d_R) - delta), so the float64
    # deviation is relative to the larger of the terms they are made of (g e^max(lp, lq)).
    geps = 32 * 2.0**-53 if dt == F64 else torch.finfo(dt).eps
    for a, c in ((gp1, gp2), (gq1, gq2)):
        assert a.dtype == dt and torch.equal(torch.isnan(a), torch.isnan(c))
        ok = torch.isfinite(c)
        err = (a[ok].double() - c[ok].double()).abs()
        scale = torch.maximum(c[ok].double().abs(), gout.double()[ok] * torch.exp(torch.maximum(lp, lq))[ok])
        assert bool((err <= geps * scale).all())
    assert float(gp1[7]) == 0.0 and float(gq1[9]) == 0.0


@pytest.mark.parametrize("name", sorted(BIN))
def test_binary_kernel_unvalidated_nan_and_validation_messages(name, on_both_paths):
    """validate=False: NaN or a positive log-prob beyond rounding gives NaN (value and both
    gradients) at exactly those entries; validate=True names the first one as the torch path."""
    n = 2 * 16384 + 5
    lp, lq = _binary_batch(n, 5)
    lp, lq = lp.float(), lq.float()
    lp[20000], lq[5], lq[n - 1] = math.nan, 0.5, math.nan

    def run():
        a, b = lp.clone().requires_grad_(), lq.clone().requires_grad_()
        v = BIN[name](a, b, validate=False)
        v.backward(torch.ones_like(v))
        with pytest.raises(ValueError) as e:
            BIN[name](lp, lq)
        return v.detach(), a.grad, b.grad, str(e.value)
    r1, r2 = on_both_paths(run)
    bad = [5, 20000, n - 1]
    for x in r1[:3] + r2[:3]:
        assert torch.nonzero(torch.isnan(x)).flatten().tolist() == bad
    assert r1[3] == r2[3] and r1[3].startswith("p_logprob: contains NaN at index 20000")


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16], ids=dtname)
@pytest.mark.parametrize("name", sorted(TOPK))
def test_topk_kernel_matches_the_torch_path(name, dt, on_both_paths):
    """16/32-bit Top-K rows of every adversarial family (K = 1 ... 6, several kernel chunks and a
    partial lane group), plus an invalid row (NaN), a row whose kept mass exceeds 1 (K >= 2) and
    an entry rounded above 0 (clamped): values and both gradients of the kernel and of the
    float64 torch formulas agree to 1e-6 relative (gradients: of the row's largest), NaN at the
    same places."""
    fam = topk_family(np.random.default_rng(12))
    for fname, (lp, lq) in fam.items():
        K = lp.shape[-1]
        reps = -(-(2 * 16384 // K + 13) // lp.shape[0])
        tp = torch.from_numpy(np.tile(lp, (reps, 1))).to(dt)
        tq = torch.from_numpy(np.tile(lq, (reps, 1))).to(dt)
        tp[1, 0] = math.nan
        tq[2] = 0.0  # kept mass K > 1: a bad row (K >= 2; K = 1 is q = 1, a valid row)
        tp[3, 0] = 2 * torch.finfo(dt).eps  # rounding above 0: clamped
        gout = torch.linspace(0.5, 1.5, tp.shape[0])

        def run():
            a, b = tp.clone().requires_grad_(), tq.clone().requires_grad_()
            v = TOPK[name](a, b, validate=False)
            v.backward(gout)
            return v.detach(), a.grad, b.grad
        (v1, gp1, gq1), (v2, gp2, gq2) = on_both_paths(run)
        assert torch.equal(torch.isnan(v1), torch.isnan(v2)) and bool(torch.isnan(v1[1])), fname
        assert bool(torch.isnan(v1[2])) == (K > 1), fname
        # The same float64 formulas on both paths (~1e-13 apart at most, the kernel summing in
        # another order): a float32 value differs by at most one ulp (2^-23 relative).
        ok = torch.isfinite(v2)
        assert torch.equal(torch.isinf(v1), torch.isinf(v2)), fname
        assert torch.allclose(v1[ok], v2[ok], rtol=2.0**-23, atol=0.0), fname
        for a, c in ((gp1, gp2), (gq1, gq2)):
            assert a.dtype == dt and torch.equal(torch.isnan(a), torch.isnan(c)), fname
            fin = torch.isfinite(c)
            # One ulp of the gradient's dtype, plus 1e-6 of the row's largest gradient: without the
            # double-double refinements (float64 inputs only), c = R_q - R_p carries an absolute
            # error of ~4 eps sum|p_j - q_j|, which the tails of the tiny_tail family (down to
            # 1e-14) turn into ~1e-7 of d_R; the KL gradients p_j (d_R - d_j) then differ between
            # the two paths' summation orders by up to ~1e-7 of the row's largest (measured
            # 9e-8), a hundredth of the 1e-5 target. TV's gradients are only signs times p, q.
            scale = c.double().nan_to_num(0.0, 0.0, 0.0).abs().amax(-1, keepdim=True).expand_as(c)[fin]
            err = (a[fin].double() - c[fin].double()).abs()
            assert bool((err <= torch.finfo(dt).eps * c[fin].double().abs() + 1e-6 * scale).all()), fname
        assert float(gp1[3, 0]) == 0.0
