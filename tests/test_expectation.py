"""Every claim of the estimator registry, proved by exact enumeration (trmath.testing.expectation),
including the negative ones; truncated-sampler bias; the Rao-Blackwellized sequence KL; the
harness itself (float64 against mpmath) and the runnable example of docs/guides/verify_kl.rst.

Tolerances: the float64 enumerations sum at most a few dozen O(1) terms, so means and gradients
agree with the exact identities to ~1e-15 absolute; 1e-11 leaves room for the exp/log_softmax
roundings without hiding any bias (the biases tested are >= 1e-3).
"""

from __future__ import annotations

import doctest
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch

import trmath
from trmath.testing import (
    exact_expectation,
    exact_sequence_expectation,
    mp_estimator,
    mp_expectation,
    mp_kl,
    mp_softmax,
)

TOL = 1e-11
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _pairs():
    """(pi, o, mu) logit rows, clearly different from each other (so that the forward and the
    reverse KL gradients differ by O(0.1) and every bias is visible)."""
    rng = np.random.default_rng(11)
    return [tuple(rng.normal(scale=1.0, size=5) for _ in range(3)) for _ in range(3)]


PAIRS = _pairs()
TOKEN_ESTIMATORS = [n for n, e in trmath.ESTIMATORS.items() if e.level == "token"]


def _close(a, b):
    return np.allclose(a, b, rtol=0, atol=TOL)


def _run(info, pi, o, mu):
    if info.sampling == "off-policy":
        return exact_expectation(info.fn, pi, o, behaviour_logits=mu)
    return exact_expectation(info.fn, pi, o)


@pytest.mark.parametrize("name", TOKEN_ESTIMATORS)
def test_registry_claims_by_enumeration(name):
    info = trmath.get_estimator(name)
    for pi, o, mu in PAIRS:
        e = _run(info, pi, o, mu)
        # the two candidate gradients really differ here, so each claim below can fail
        assert np.abs(e.reverse_kl_gradient - e.forward_kl_gradient).max() > 1e-2
        # value
        if info.value_unbiased:
            assert abs(e.mean - e.reverse_kl) <= TOL, (name, e.mean, e.reverse_kl)
        else:
            assert abs(e.mean - e.reverse_kl) > 1e-3, (name, e.mean, e.reverse_kl)
        # loss placement: E[grad est]
        targets = {"0": np.zeros_like(e.loss_gradient), "grad KL(pi||o)": e.reverse_kl_gradient,
                   "grad KL(o||pi)": e.forward_kl_gradient}
        if info.loss_gradient is None:
            for t in targets.values():
                assert not _close(e.loss_gradient, t), name
        else:
            assert _close(e.loss_gradient, targets[info.loss_gradient]), (name, e.loss_gradient)
        # reward placement (on-policy): E[sg(est) grad log pi]
        if info.sampling == "on-policy":
            if info.reward_gradient == "grad KL(pi||o)":
                assert _close(e.reward_gradient, e.reverse_kl_gradient), name
            else:
                assert info.reward_gradient is None
                assert not _close(e.reward_gradient, e.reverse_kl_gradient), name
        # sign
        args = [torch.log_softmax(torch.tensor(x), -1) for x in ((pi, o, mu) if info.sampling == "off-policy" else (pi, o))]
        vals = info.fn(*args)
        if info.nonnegative:
            assert (vals >= 0).all()
    if not info.nonnegative:  # k1-type: some sample is negative for some pair
        assert any((info.fn(*[torch.log_softmax(torch.tensor(x), -1) for x in
                               ((pi, o, mu) if info.sampling == "off-policy" else (pi, o))]) < 0).any()
                   for pi, o, mu in PAIRS)


def test_k1_loss_gradient_is_zero_but_total_gradient_is_reverse_kl():
    pi, o, _ = PAIRS[0]
    e = exact_expectation(trmath.k1, pi, o)
    assert np.abs(e.loss_gradient).max() <= TOL
    assert _close(e.total_gradient, e.reverse_kl_gradient)
    assert np.abs(e.reverse_kl_gradient).max() > 1e-2


def test_k3_in_the_loss_regularises_the_forward_kl():
    """SPEC §6: k3 placed in the loss while claiming to regularise the reverse KL."""
    pi, o, _ = PAIRS[1]
    e = exact_expectation(trmath.k3, pi, o)
    assert _close(e.loss_gradient, e.forward_kl_gradient)
    assert not _close(e.loss_gradient, e.reverse_kl_gradient)
    assert _close(e.total_gradient, e.reverse_kl_gradient)  # value unbiased: full gradient is right


def test_gradient_wrt_the_other_policy():
    """E[grad_o k3] = grad_o KL(pi||o) (pathwise; the draws do not depend on o)."""
    pi, o, _ = PAIRS[2]
    e = exact_expectation(trmath.k3, pi, o, wrt="other")
    assert _close(e.loss_gradient, e.reverse_kl_gradient)
    assert np.abs(e.reward_gradient).max() == 0


def test_k2_bias_is_third_order():
    """E[k2] - KL = O(delta^3): halving the perturbation divides the bias by ~8 (mpmath)."""
    rng = np.random.default_rng(2)
    pi, d = rng.normal(size=6), rng.normal(size=6)
    bias = []
    for eps in (1e-2, 5e-3, 2.5e-3):
        o = pi + eps * d
        mean, _ = mp_expectation("k2", pi, o)
        bias.append(mean - mp_kl(pi, o))
    r1, r2 = float(bias[0] / bias[1]), float(bias[1] / bias[2])
    assert abs(r1 - 8) < 0.3 and abs(r2 - 8) < 0.15 and abs(r2 - 8) < abs(r1 - 8)


@pytest.mark.parametrize("name", ["k1", "k2", "k3", "k1_is", "k2_is", "k3_is"])
def test_float64_harness_matches_mpmath(name):
    info = trmath.get_estimator(name)
    pi, o, mu = PAIRS[0]
    e = _run(info, pi, o, mu)
    mean, var = mp_expectation(name, pi, o, behaviour_logits=mu if name.endswith("_is") else None)
    assert abs(e.mean - float(mean)) <= 1e-13 * max(1.0, abs(float(mean)))
    assert abs(e.variance - float(var)) <= 1e-13 * max(1.0, float(var))
    if info.value_unbiased:
        assert abs(mean - mp_kl(pi, o)) < mpmath.mpf(10) ** -45


def test_mp_expectation_with_a_user_callable():
    pi, o, _ = PAIRS[1]
    mean, var = mp_expectation(lambda s, t: mpmath.expm1(t - s) - (t - s), pi, o)
    m3, v3 = mp_expectation("k3", pi, o)
    assert abs(mean - m3) < mpmath.mpf(10) ** -45 and abs(var - v3) < mpmath.mpf(10) ** -45


def test_variance_ordering_near_identical():
    """Near s = o, k3 has lower variance than k1 (its control variate cancels the first order)."""
    rng = np.random.default_rng(8)
    pi = rng.normal(size=6)
    o = pi + 0.05 * rng.normal(size=6)
    v1 = exact_expectation(trmath.k1, pi, o).variance
    v3 = exact_expectation(trmath.k3, pi, o).variance
    assert v3 < 0.01 * v1


# ------------------------------------------------------------------------------- truncation


def _truncate_topk(z, k):
    keep = np.argsort(-z)[:k]
    out = np.full_like(z, -np.inf)
    out[keep] = z[keep]
    return out


def _truncate_topp(z, top_p):
    p = mp_softmax(z)
    order = np.argsort(-p)
    n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
    out = np.full_like(z, -np.inf)
    out[order[:n]] = z[order[:n]]
    return out


@pytest.mark.parametrize("truncate", [lambda z: _truncate_topk(z, 3), lambda z: _truncate_topp(z, 0.8)],
                         ids=["top-k", "top-p"])
def test_truncated_sampler_bias(truncate):
    rng = np.random.default_rng(21)
    pi, o = rng.normal(size=7), rng.normal(size=7)
    zt = truncate(pi)
    kept = np.isfinite(zt)
    assert 0 < kept.sum() < 7
    with mpmath.workdps(60):
        pz = [mpmath.exp(mpmath.mpf(x)) for x in pi]
        S = mpmath.fsum(pz[i] for i in range(7) if kept[i]) / mpmath.fsum(pz)  # kept mass of pi
        oz = [mpmath.exp(mpmath.mpf(x)) for x in o]
        o_out = mpmath.fsum(oz[i] for i in range(7) if not kept[i]) / mpmath.fsum(oz)
    with mpmath.workdps(60):  # the identities below are checked at 50 digits
        kl_t = mp_kl(zt, o)  # KL(truncated sampler || o)
        # (a) log-ratio against the truncated sampler's own log-probs: k1 unbiased, k3 low by o(out)
        m1, _ = mp_expectation(lambda s, t, b: -(t - b), pi, o, behaviour_logits=zt)
        m3, _ = mp_expectation(lambda s, t, b: mpmath.expm1(t - b) - (t - b), pi, o, behaviour_logits=zt)
        assert abs(m1 - kl_t) < 1e-40
        assert abs(m3 - (kl_t - o_out)) < 1e-40
        assert o_out > 1e-3  # the bias is real
        # (b) the common case: log-probs of the untruncated pi (the trainer's), draws from the
        # truncated sampler: the log-ratio picks up log S
        m1u, _ = mp_expectation(lambda s, t, b: -(t - s), pi, o, behaviour_logits=zt)
        m3u, _ = mp_expectation(lambda s, t, b: mpmath.expm1(t - s) - (t - s), pi, o, behaviour_logits=zt)
        assert abs(m1u - (kl_t + mpmath.log(S))) < 1e-40
        assert abs(m3u - (kl_t + mpmath.log(S) + (1 - o_out) / S - 1)) < 1e-40
    # the float64 path through trmath.k3 agrees
    e = exact_expectation(lambda s, t, b: trmath.k3(b, t), pi, o, behaviour_logits=zt)
    assert abs(e.mean - float(kl_t - o_out)) <= TOL
    e = exact_expectation(lambda s, t, b: trmath.k3(s, t), pi, o, behaviour_logits=zt)
    assert abs(e.mean - float(m3u)) <= TOL


# ------------------------------------------------------------------------------- sequences


def _tree(rng, V, T, scale=1.0):
    return [rng.normal(scale=scale, size=(V**n, V)) for n in range(T)]


def _sampled_k1(pz, qz, tok):
    """The plain sampled sequence KL sum_n (log p(y_n) - log q(y_n)) (value only)."""
    lp = torch.log_softmax(pz, -1).gather(-1, tok[..., None])[..., 0]
    lq = torch.log_softmax(qz, -1).gather(-1, tok[..., None])[..., 0]
    k = lp - lq
    return k.sum(-1), k.sum(-1), k


@pytest.mark.parametrize("V,T,seed", [(2, 4, 0), (3, 3, 1), (4, 2, 2)])
def test_rb_unbiased_value_and_gradient(V, T, seed):
    rng = np.random.default_rng(seed)
    p, q = _tree(rng, V, T), _tree(rng, V, T)
    e = exact_sequence_expectation(trmath.rb_kl, p, q)
    assert abs(e.mean - e.kl) <= TOL * max(1, e.kl)
    for g, t in zip(e.loss_gradient, e.kl_gradient):
        assert _close(g, t)
    # without the score-function term the gradient is biased (so the test above can fail)
    no_score = exact_sequence_expectation(lambda a, b, c: trmath.rb_kl(a, b, c).kl, p, q)
    assert not all(_close(g, t) for g, t in zip(no_score.loss_gradient, e.kl_gradient))
    # per position: Var[KL_n] <= Var[k1_n] (law of total variance)
    s = exact_sequence_expectation(_sampled_k1, p, q)
    assert abs(s.mean - e.kl) <= TOL * max(1, e.kl)
    assert (e.per_position_variance <= s.per_position_variance + TOL).all()
    assert (e.per_position_variance < s.per_position_variance).any()


#: A tree (V = 2, T = 2) on which the Rao-Blackwellized sequence estimator has a LARGER
#: variance than the plain sampled sum (docs/theory/estimators.rst): the sampled terms of the two
#: positions are negatively correlated and cancel, the exact KLs cannot.
RB_COUNTEREXAMPLE_P = [np.array([[0.0, -1.0]]), np.array([[0.0, 1.0], [0.0, -3.0]])]
RB_COUNTEREXAMPLE_Q = [np.array([[0.0, 1.0]]), np.array([[0.0, 0.0], [0.0, 3.0]])]


def test_rb_variance_not_always_lower_per_sequence():
    e = exact_sequence_expectation(trmath.rb_kl, RB_COUNTEREXAMPLE_P, RB_COUNTEREXAMPLE_Q)
    s = exact_sequence_expectation(_sampled_k1, RB_COUNTEREXAMPLE_P, RB_COUNTEREXAMPLE_Q)
    assert (e.per_position_variance <= s.per_position_variance).all()  # per position: lower
    assert e.variance > 1.5 * s.variance                                # per sequence: higher
    assert abs(e.mean - s.mean) <= TOL and abs(e.mean - e.kl) <= TOL     # both unbiased


# ------------------------------------------------------------------------------- the harness


def test_harness_validation():
    with pytest.raises(ValueError, match="wrt"):
        exact_expectation(trmath.k3, [0.0, 1.0], [0.0, 0.0], wrt="q")
    with pytest.raises(ValueError, match="shapes differ"):
        exact_expectation(trmath.k3, [0.0, 1.0], [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="sampler_logits: contains NaN"):
        exact_expectation(trmath.k3, [0.0, np.nan], [0.0, 0.0])
    with pytest.raises(ValueError, match="estimator: expected a result of shape"):
        exact_expectation(lambda s, o: (s - o).sum(), [0.0, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"p_tree\[1\]: expected shape \(2, 2\)"):
        exact_sequence_expectation(trmath.rb_kl, [np.zeros((1, 2)), np.zeros((1, 2))],
                                   [np.zeros((1, 2)), np.zeros((2, 2))])
    with pytest.raises(ValueError, match="unknown"):
        mp_estimator("k9", 0.0, -1.0)


def test_harness_catches_a_broken_kl_term():
    """A user's float32 textbook k3 on near-identical policies: the harness shows the bias."""
    rng = np.random.default_rng(4)
    pi = rng.normal(size=5)
    o = pi + 1e-3 * rng.normal(size=5)

    def textbook(s, t):
        lr = (t - s).float()
        return (torch.exp(lr) - 1 - lr).double()

    good = exact_expectation(trmath.k3, pi, o)
    bad = exact_expectation(textbook, pi, o)
    assert abs(good.mean - good.reverse_kl) <= 1e-6 * good.reverse_kl
    assert abs(bad.mean - bad.reverse_kl) > 0.1 * bad.reverse_kl


def test_verify_kl_guide_examples_run():
    path = DOCS / "guides" / "verify_kl.rst"
    test = doctest.DocTestParser().get_doctest(path.read_text(), {}, "verify_kl", str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    out: list[str] = []
    runner.run(test, out=out.append)
    res = runner.summarize(verbose=False)
    assert res.attempted > 0
    assert res.failed == 0, "".join(out)


def test_theory_page_numbers_match():
    """The demonstration numbers quoted in docs/theory/estimators.rst are reproduced here."""
    text = (DOCS / "theory" / "estimators.rst").read_text()
    lr = torch.tensor(-1e-5)
    naive = float(torch.exp(lr) - 1 - lr)
    ours = float(trmath.k3(torch.tensor(0.0), lr))
    assert f"{naive:.4e}" in text and f"{ours:.4e}" in text
    e = exact_sequence_expectation(trmath.rb_kl, RB_COUNTEREXAMPLE_P, RB_COUNTEREXAMPLE_Q)
    s = exact_sequence_expectation(_sampled_k1, RB_COUNTEREXAMPLE_P, RB_COUNTEREXAMPLE_Q)
    assert f"{e.variance:.3f}" in text and f"{s.variance:.3f}" in text
    assert f"{e.mean:.4f}" in text
    pv = ", ".join(f"{v:.3f}" for v in s.per_position_variance)
    assert f"({pv})" in text
    # the clamp demonstration
    k = trmath.k3(torch.tensor([-1.0, -1.0, -13.0, -1.0]), torch.tensor([-1.5, -0.9, -0.5, -40.0]))
    assert "tensor([" + ", ".join(f"{float(v):.4e}" for v in k) + "])" in text
