"""Policy-loss objectives (SPEC.md section 4.1): gradients against their documented forms,
properties, aggregation, masking, metrics and the registry.

Gradients are checked by autograd through each objective's natural formula against the
hand-derived per-token coefficient computed independently here in float64 (numpy). With
``aggregation="seq-mean-token-sum", normalizer=1`` the loss is the plain sum of the per-token
losses, so ``d loss / d logprob[b, t]`` is that token's coefficient. float64 throughout: the two
sides evaluate the same elementary functions in a different order, so they agree to a few ulps
of the coefficient (the 1e-12 relative tolerance is ~4500 ulps, far above that and far below
any formula error).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import trmath
from trmath import objectives as obj

RTOL = 1e-12
SUM = dict(aggregation="seq-mean-token-sum", normalizer=1)

#: Objectives computed from per-token log-probs alone (the generic tests below). "troll" also needs
#: both policies' full logits; it is tested in tests/test_projections.py and tests/test_adapter.py.
LOGPROB_OBJECTIVES = sorted(n for n, o in obj.OBJECTIVES.items() if not o.needs)


def make_batch(B=5, T=9, seed=0, spread=0.4, dtype=torch.float64, empty_row=True):
    """Random rollout log-probs, a trainer policy ``spread`` away, advantages, a padded mask."""
    g = torch.Generator().manual_seed(seed)
    rollout = -3.0 * torch.rand(B, T, generator=g, dtype=torch.float64) - 1e-3
    # -softplus(-x) < 0: the trainer's log-probs stay valid log-probabilities
    lp = -torch.nn.functional.softplus(-(rollout + spread * torch.randn(B, T, generator=g, dtype=torch.float64)))
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row:
        lengths[1] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return lp.to(dtype), rollout.to(dtype), adv.to(dtype), mask


def grad_of(fn, lp, *args, **kw):
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(x, *args, **kw)
    loss.backward()
    return x.grad, loss, metrics


def np64(t):
    return t.detach().to(torch.float64).numpy()


def assert_grad(got, want, mask):
    got = np64(got)
    assert np.all(got[~mask.numpy()] == 0), "padding received a gradient"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-300)


def away_from(x, edges, tol=1e-6):
    """True where ``x`` is not within ``tol`` of any threshold (ties are measure-zero sets)."""
    ok = np.ones_like(x, dtype=bool)
    for e in edges:
        ok &= np.abs(x - e) > tol
    return ok


# ------------------------------------------------------------------------------------------------
# gradients against the documented forms
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
@pytest.mark.parametrize("seed", range(3))
def test_ppo_gradient(eps_low, eps_high, seed):
    lp, mu, A, M = make_batch(seed=seed)
    g, _, _ = grad_of(trmath.ppo_loss, lp, mu, A, M, eps_low=eps_low, eps_high=eps_high, **SUM)
    r, a, m = np.exp(np64(lp) - np64(mu)), np64(A), M.numpy()
    assert away_from(r[m], [1 - eps_low, 1 + eps_high]).all()
    clipped = ((a > 0) & (r > 1 + eps_high)) | ((a < 0) & (r < 1 - eps_low))
    want = np.where(m & ~clipped, -a * r, 0.0)
    assert clipped[m].any() and (~clipped[m]).any()  # both branches exercised
    assert_grad(g, want, M)


@pytest.mark.parametrize("seed", range(3))
def test_dual_clip_gradient(seed):
    lp, mu, A, M = make_batch(seed=seed, spread=1.5)
    c = 3.0
    g, _, met = grad_of(trmath.dual_clip_loss, lp, mu, A, M, clip_ratio_c=c, **SUM)
    r, a, m = np.exp(np64(lp) - np64(mu)), np64(A), M.numpy()
    zero = ((a > 0) & (r > 1.2)) | ((a < 0) & (r < 0.8)) | ((a < 0) & (r > c))
    assert ((a < 0) & (r > c) & m).any()
    assert_grad(g, np.where(m & ~zero, -a * r, 0.0), M)
    assert float(met["dual_clip_frac"]) == pytest.approx(((a < 0) & (r > c) & m).sum() / m.sum())


@pytest.mark.parametrize("eps_low", [None, 0.2])
@pytest.mark.parametrize("seed", range(3))
def test_cispo_gradient(eps_low, seed):
    lp, mu, A, M = make_batch(seed=seed)
    g, _, _ = grad_of(trmath.cispo_loss, lp, mu, A, M, eps_low=eps_low, eps_high=0.28, **SUM)
    r, a, m = np.exp(np64(lp) - np64(mu)), np64(A), M.numpy()
    lo = 0.0 if eps_low is None else 1 - eps_low
    w = np.clip(r, lo, 1.28)
    assert (r[m] > 1.28).any() and (r[m] < 1.28).any()
    assert_grad(g, np.where(m, -a * w, 0.0), M)  # sg(clip r) * A * grad log pi, every token


@pytest.mark.parametrize("seed", range(3))
def test_gspo_gradient_is_the_sequence_form(seed):
    """GSPO-token with per-sequence advantages, seq-mean-token-mean: d/dlp_bt = -A_b s_b / n_b
    unless the sequence is clipped; and autograd of the plain sequence-level formula agrees."""
    lp, mu, _, M = make_batch(seed=seed, spread=0.05)
    A = torch.randn(lp.shape[0], generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    el, eh = 0.02, 0.03
    g, _, met = grad_of(trmath.gspo_loss, lp, mu, A, M, eps_low=el, eps_high=eh,
                        aggregation="seq-mean-token-mean", normalizer=1)
    m = M.numpy()
    n = m.sum(1)
    lr = np.where(m, np64(lp) - np64(mu), 0.0)
    s = np.exp(lr.sum(1) / np.maximum(n, 1))
    a = np64(A)
    clipped = ((a > 0) & (s > 1 + eh)) | ((a < 0) & (s < 1 - el))
    assert away_from(s, [1 - el, 1 + eh]).all()
    coef = np.where(clipped, 0.0, -a * s / np.maximum(n, 1))
    assert_grad(g, np.where(m, coef[:, None], 0.0), M)
    # the sequence-level formula, differentiated by autograd
    x = lp.clone().requires_grad_(True)
    xs = torch.where(M, x - mu, torch.zeros((), dtype=x.dtype))
    sv = torch.exp(xs.sum(1) / M.sum(1).clamp_min(1))
    seq = -torch.minimum(sv * A, sv.clamp(1 - el, 1 + eh) * A)
    seq = torch.where(M.any(1), seq, torch.zeros((), dtype=x.dtype)).sum()
    seq.backward()
    np.testing.assert_allclose(np64(g), np64(x.grad), rtol=RTOL, atol=1e-300)
    frac_want = np.repeat(clipped, n).mean()
    assert float(met["clip_frac"]) == pytest.approx(frac_want, rel=1e-12)


@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (0.5, 2.0)])
@pytest.mark.parametrize("seed", range(3))
def test_sapo_gradient(tau_pos, tau_neg, seed):
    lp, mu, A, M = make_batch(seed=seed, spread=0.8)
    g, loss, _ = grad_of(trmath.sapo_loss, lp, mu, A, M, tau_pos=tau_pos, tau_neg=tau_neg, **SUM)
    r, a, m = np.exp(np64(lp) - np64(mu)), np64(A), M.numpy()
    tau = np.where(a > 0, tau_pos, tau_neg)
    want = -a * r / np.cosh(tau * (r - 1) / 2) ** 2
    assert_grad(g, np.where(m, want, 0.0), M)
    value = np.where(m, -a * (4 / tau) / (1 + np.exp(-tau * (r - 1))), 0.0).sum()
    assert float(loss.detach()) == pytest.approx(value, rel=1e-12)


def _dppo_reference(r, a, D, m, dl, dh, C):
    keep = m & ~(((a > 0) & (r > 1) & (D > dh)) | ((a < 0) & (r < 1) & (D > dl)))
    return keep, np.where(keep, -a * np.minimum(r, C), 0.0)


def _softmax64(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("C", [math.inf, 5.0, 1.5])
@pytest.mark.parametrize("divergence", ["exact_tv", "exact_kl"])
@pytest.mark.parametrize("seed", range(2))
def test_dppo_gradient_exact(C, divergence, seed):
    """loss_t = -A sg(min(r, C)) M log pi: gradient -A min(r, C) M, with M from the exact
    divergence between the rollout and trainer rows (D computed here in float64 from scratch)."""
    B, T, V = 4, 6, 11
    g0 = torch.Generator().manual_seed(seed)
    z_mu = 2 * torch.randn(B, T, V, generator=g0, dtype=torch.float64)
    z_pi = z_mu + 0.6 * torch.randn(B, T, V, generator=g0, dtype=torch.float64)
    tok = torch.randint(0, V, (B, T), generator=g0)
    lp = trmath.token_logprobs(z_pi, tok)
    mu = trmath.token_logprobs(z_mu, tok)
    A = torch.randn(B, T, generator=g0, dtype=torch.float64)
    M = torch.arange(T)[None] < torch.tensor([6, 0, 3, 5])[:, None]
    delta = 0.15 if divergence == "exact_tv" else 0.05
    g, _, met = grad_of(trmath.dppo_loss, lp, mu, A, M, divergence=divergence, delta=delta, cap=C,
                        logits=z_pi, rollout_logits=z_mu, **SUM)
    p, q = _softmax64(z_mu.numpy()), _softmax64(z_pi.numpy())
    D = 0.5 * np.abs(p - q).sum(-1) if divergence == "exact_tv" else (p * (np.log(p) - np.log(q))).sum(-1)
    r, a, m = np.exp(np64(lp) - np64(mu)), np64(A), M.numpy()
    assert away_from(D[m], [delta], 1e-9).all()
    keep, want = _dppo_reference(r, a, D, m, delta, delta, C)
    assert (m & ~keep).any() and keep.any()
    assert_grad(g, want, M)
    assert float(met["masked_frac"]) == pytest.approx((m & ~keep).sum() / m.sum(), rel=1e-12)
    np.testing.assert_allclose(float(met["divergence_mean"]), D[m].mean(), rtol=1e-10)
    assert float(met["truncated_frac"]) == pytest.approx(((r > C) & m).sum() / m.sum(), rel=1e-12)


def test_dppo_asymmetric_thresholds_and_direction():
    """delta_low applies to A < 0, delta_high to A > 0; only moves *further out* are masked."""
    # r > 1 and r < 1, A > 0 and A < 0, D = 0.1 everywhere
    lp = torch.log(torch.tensor([[0.6, 0.4, 0.6, 0.4]], dtype=torch.float64))
    mu = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64))
    A = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    D = torch.full((1, 4), 0.1, dtype=torch.float64)
    keep = trmath.dppo_mask(lp, mu, A, divergence=D, delta_low=0.05, delta_high=0.2)
    assert keep.tolist() == [[True, True, True, False]]  # A<0, r<1, D > delta_low
    keep = trmath.dppo_mask(lp, mu, A, divergence=D, delta_low=0.2, delta_high=0.05)
    assert keep.tolist() == [[False, True, True, True]]  # A>0, r>1, D > delta_high
    keep = trmath.dppo_mask(lp, mu, A, divergence=D, delta=0.05)
    assert keep.tolist() == [[False, True, True, False]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
def test_dppo_with_ratio_divergence_is_ppo(seed, eps):
    """D = |r - 1|: DPPO's mask is exactly the set where PPO's clip zeroes the gradient."""
    lp, mu, A, M = make_batch(seed=seed, spread=0.5)
    el, eh = eps
    r = torch.exp(lp - mu)
    keep = trmath.dppo_mask(lp, mu, A, divergence=(r - 1).abs(), delta_low=el, delta_high=eh, mask=M)
    g, _, _ = grad_of(trmath.ppo_loss, lp, mu, A, M, eps_low=el, eps_high=eh, **SUM)
    m = M.numpy()
    assert away_from(np64(r)[m], [1 - el, 1 + eh]).all()
    ppo_live = (np64(g) != 0)
    assert (ppo_live == keep.numpy()).all()
    assert (~keep.numpy() & m).any()


@pytest.mark.parametrize("correction", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("name", ["ppo", "cispo", "sapo", "gspo"])
def test_importance_correction_gradient(correction, level, name):
    """TIS multiplies each token's gradient by sg(min(w, C)), MIS zeroes it where w leaves
    [1/C, C]; w = pi_old / mu per token, per sequence (product) or geometric mean."""
    lp, mu, A, M = make_batch(seed=3, spread=0.3)
    old = mu + 0.4 * torch.randn(mu.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fn = trmath.get_objective(name).fn
    cap = 1.1 if level == "geometric" else 2.0  # a per-token mean of log-weights is closer to 0
    g0, _, _ = grad_of(fn, lp, mu, A, M, old_logprob=old, **SUM)
    g1, _, met = grad_of(fn, lp, mu, A, M, old_logprob=old, is_correction=correction,
                         is_level=level, is_cap=cap, **SUM)
    m = M.numpy()
    lw = np.where(m, np64(old) - np64(mu), 0.0)
    if level == "sequence":
        lw = np.repeat(lw.sum(1, keepdims=True), lw.shape[1], 1)
    elif level == "geometric":
        lw = np.repeat(lw.sum(1, keepdims=True) / np.maximum(m.sum(1, keepdims=True), 1), lw.shape[1], 1)
    w = np.exp(lw)
    assert away_from(w[m], [1 / cap, cap]).all()
    if correction == "tis":
        want = np64(g0) * np.minimum(w, cap)
        assert ((w > cap) & m).any()
        assert float(met["is_truncated_frac"]) == pytest.approx(((w > cap) & m).sum() / m.sum())
    else:
        out = (w > cap) | (w < 1 / cap)
        want = np.where(out, 0.0, np64(g0))
        assert (out & m).any()
        assert float(met["is_masked_frac"]) == pytest.approx((out & m).sum() / m.sum())
    assert_grad(g1, want, M)


def test_old_logprob_anchors_the_ratio():
    lp, mu, A, M = make_batch(seed=4)
    old = mu + 0.2
    g_old, _, _ = grad_of(trmath.ppo_loss, lp, mu, A, M, old_logprob=old, **SUM)
    g_ref, _, _ = grad_of(trmath.ppo_loss, lp, old, A, M, **SUM)
    assert torch.equal(g_old, g_ref)
    # DPPO stays anchored to the rollout: old_logprob changes only the diagnostics
    D = torch.zeros_like(lp)
    g1, _, m1 = grad_of(trmath.dppo_loss, lp, mu, A, M, divergence=D, delta=0.1, old_logprob=old, **SUM)
    g2, _, m2 = grad_of(trmath.dppo_loss, lp, mu, A, M, divergence=D, delta=0.1, **SUM)
    assert torch.equal(g1, g2)
    assert float(m1["mismatch_k1"]) != float(m2["mismatch_k1"])


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------
finite = st.floats(-3.0, 3.0, allow_nan=False)


@given(lr=st.lists(finite, min_size=1, max_size=8), adv=st.lists(st.floats(-5, 5, allow_nan=False), min_size=8,
       max_size=8), el=st.floats(0.0, 0.9), eh=st.floats(0.0, 2.0))
def test_ppo_objective_is_a_lower_bound(lr, adv, el, eh):
    """-loss = min(rA, clip(r)A) <= rA; with the dual clip it is max(that, cA) for A < 0."""
    n = len(lr)
    lpt = torch.tensor([lr], dtype=torch.float64)
    mu = torch.zeros(1, n, dtype=torch.float64) - 1.0
    A = torch.tensor([adv[:n]], dtype=torch.float64)
    lp = lpt - 1.0
    loss, _ = trmath.ppo_loss(lp, mu, A, eps_low=el, eps_high=eh, aggregation=None)
    r = torch.exp(lp - mu)  # the ratio as the objective forms it (same rounding)
    assert bool((-loss <= r * A).all())
    dual, _ = trmath.dual_clip_loss(lp, mu, A, eps_low=el, eps_high=eh, clip_ratio_c=3.0,
                                    aggregation=None)
    want = torch.where(A < 0, torch.maximum(-loss, 3.0 * A), -loss)
    assert torch.equal(-dual, want)


def test_on_policy_gradients_agree():
    """At r = 1 (pi = mu) every objective's gradient is the policy gradient -A grad log pi."""
    lp, _, A, M = make_batch(seed=5)
    want = np.where(M.numpy(), -np64(A), 0.0)
    for name in LOGPROB_OBJECTIVES:
        kw = dict(divergence=torch.zeros_like(lp), delta=0.1) if name == "dppo" else {}
        if name == "gspo":
            continue  # per-sequence: checked below with seq-mean-token-sum
        g, _, _ = grad_of(trmath.get_objective(name).fn, lp, lp.detach(), A, M, **kw, **SUM)
        np.testing.assert_allclose(np64(g), want, rtol=1e-15, err_msg=name)
    g, _, _ = grad_of(trmath.gspo_loss, lp, lp.detach(), A, M, **SUM)
    np.testing.assert_allclose(np64(g), want, rtol=1e-15)


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------
def _hand_aggregate(x, m, mode, L=None):
    rows = [(x[b][m[b]]) for b in range(x.shape[0])]
    nonempty = [r for r in rows if len(r)]
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(float(v) for r in rows for v in r) / max(n, 1)
    if mode == "seq-mean-token-sum":
        return sum(float(r.sum()) for r in nonempty) / max(len(nonempty), 1)
    if mode == "seq-mean-token-mean":
        return sum(float(r.mean()) for r in nonempty) / max(len(nonempty), 1)
    L = x.shape[1] if L is None else L
    return sum(float(r.sum()) for r in nonempty) / (max(len(nonempty), 1) * L)


@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
def test_aggregation_by_hand(mode):
    x = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    M = torch.rand(6, 8, generator=torch.Generator().manual_seed(2)) < 0.6
    M[2] = False
    garbage = torch.where(M, x, torch.tensor(float("nan"), dtype=torch.float64))
    got = float(trmath.aggregate_loss(garbage, M, mode))
    assert got == pytest.approx(_hand_aggregate(x.numpy(), M.numpy(), mode), rel=1e-14)
    if mode == "seq-mean-token-sum-norm":
        got = float(trmath.aggregate_loss(x, M, mode, max_length=20))
        assert got == pytest.approx(_hand_aggregate(x.numpy(), M.numpy(), mode, 20), rel=1e-14)


@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
@pytest.mark.parametrize("name", LOGPROB_OBJECTIVES)
def test_gradient_accumulation(mode, name):
    """Two half-batches with the global normaliser == the whole batch: value and gradient."""
    lp, mu, A, M = make_batch(B=6, seed=11)
    kw = dict(divergence=(lp - mu).exp().sub(1).abs(), delta=0.2) if name == "dppo" else {}
    fn = trmath.get_objective(name).fn
    g_full, l_full, _ = grad_of(fn, lp, mu, A, M, aggregation=mode, **kw)
    N = trmath.loss_normalizer(M, mode)
    x = lp.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 3), slice(3, 6)):
        kws = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        loss, _ = fn(x[sl], mu[sl], A[sl], M[sl], aggregation=mode, normalizer=N, **kws)
        loss.backward()
        total += float(loss.detach())
    assert total == pytest.approx(float(l_full.detach()), rel=1e-13, abs=1e-300)
    np.testing.assert_allclose(np64(x.grad), np64(g_full), rtol=1e-13, atol=1e-300)
    assert int(trmath.loss_normalizer(M[:3], mode)) + int(trmath.loss_normalizer(M[3:], mode)) == int(N)


@pytest.mark.parametrize("mode", obj.AGGREGATIONS)
@pytest.mark.parametrize("name", LOGPROB_OBJECTIVES)
def test_fully_masked_batch_is_zero_not_nan(mode, name):
    lp, mu, A, _ = make_batch(seed=2)
    M = torch.zeros(lp.shape, dtype=torch.bool)
    kw = dict(divergence=torch.full_like(lp, float("nan")), delta=0.1) if name == "dppo" else {}
    lp = torch.full_like(lp, float("nan"))
    g, loss, met = grad_of(trmath.get_objective(name).fn, lp, mu, A, M, aggregation=mode, **kw)
    assert float(loss.detach()) == 0.0 and bool((g == 0).all())
    assert all(bool(torch.isfinite(v).all()) for v in met.values()), met
    assert int(met["n_tokens"]) == 0


# ------------------------------------------------------------------------------------------------
# padding holding inf / NaN is selected out
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LOGPROB_OBJECTIVES)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_padding_cannot_leak(name, fill):
    lp, mu, A, M = make_batch(seed=6)
    kw = dict(divergence="exact_kl", delta=0.05) if name == "dppo" else {}
    V = 7
    z_mu = torch.randn(*lp.shape, V, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z_pi = z_mu + 0.5 * torch.randn(*lp.shape, V, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if name == "dppo":
        kw.update(logits=z_pi, rollout_logits=z_mu)
    fn = trmath.get_objective(name).fn
    opts = dict(old_logprob=mu + 0.1, is_correction="mis" if name == "dppo" else "tis")
    g_clean, l_clean, m_clean = grad_of(fn, lp, mu, A, M, **opts, **kw)
    pad = ~M

    def dirty(t, f=fill):
        return torch.where(pad, torch.tensor(f, dtype=t.dtype), t)

    if name == "dppo":
        kw.update(logits=torch.where(pad[..., None], torch.tensor(fill, dtype=torch.float64), z_pi),
                  rollout_logits=torch.where(pad[..., None], torch.tensor(float("nan"), dtype=torch.float64), z_mu))
    opts["old_logprob"] = dirty(opts["old_logprob"])
    g, loss, met = grad_of(fn, dirty(lp), dirty(mu, -fill if fill == fill else fill), dirty(A), M, **opts, **kw)
    assert torch.equal(loss, l_clean)
    assert torch.equal(g, g_clean) and bool(torch.isfinite(g).all())
    for k in m_clean:
        assert torch.equal(met[k], m_clean[k]), k


def test_overflowing_ratio_in_clipped_region_has_zero_gradient():
    """r = e^200 (float64) / e^100 (float32) where the clip or gate is active: gradient exactly 0."""
    for dt, big in ((torch.float32, 100.0), (torch.float64, 800.0)):
        lp = torch.tensor([[-1.0, -1.0]], dtype=dt)
        mu = torch.tensor([[-1.0 - big, -1.0]], dtype=dt)
        for name in ("ppo", "gspo", "sapo", "dual_clip"):
            A = torch.tensor([[1.0, 1.0]] if name != "dual_clip" else [[-1.0, 1.0]], dtype=dt)
            g, loss, _ = grad_of(trmath.get_objective(name).fn, lp, mu, A, **SUM)
            assert bool(torch.isfinite(g).all()), (name, dt, g)
            if name in ("ppo", "sapo", "dual_clip"):
                assert float(g[0, 0]) == 0.0, (name, dt)


# ------------------------------------------------------------------------------------------------
# metrics over valid tokens only
# ------------------------------------------------------------------------------------------------
def test_metrics_match_the_valid_tokens_alone():
    """Every metric of a padded batch equals the one computed from its valid tokens packed into
    dense rows (no padding at all) when the objective is per token."""
    lp, mu, A, M = make_batch(seed=8, B=4, T=6, empty_row=False)
    M = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]],
                     dtype=torch.bool)
    packed = lambda t: torch.cat([t[0, :3], t[2, :3], t[1], t[3]]).reshape(3, 6)  # noqa: E731
    for name in ("ppo", "cispo", "sapo", "dppo"):
        kw = dict(divergence=(lp - mu).exp().sub(1).abs(), delta=0.2) if name == "dppo" else {}
        kp = {k: packed(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        fn = trmath.get_objective(name).fn
        _, ma = fn(lp, mu, A, M, **kw)
        _, mb = fn(packed(lp), packed(mu), packed(A), **kp)
        for k in ma:
            if k == "n_seqs":
                assert int(ma[k]) == 4 and int(mb[k]) == 3
                continue
            np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-13, err_msg=f"{name}:{k}")


def test_clip_fraction_split_by_sign():
    lp = torch.log(torch.tensor([[0.9, 0.1, 0.5, 0.5, 0.9]], dtype=torch.float64))
    mu = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64))
    A = torch.tensor([[1.0, -1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    _, m = trmath.ppo_loss(lp, mu, A)
    # clipped: token 0 (A>0, r=1.8) and token 1 (A<0, r=0.2); token 4 (A<0, r=1.8) is not
    assert float(m["clip_frac"]) == pytest.approx(2 / 5)
    assert float(m["clip_frac_pos"]) == pytest.approx(1 / 2)
    assert float(m["clip_frac_neg"]) == pytest.approx(1 / 3)
    assert float(m["ratio_max"]) == pytest.approx(1.8) and float(m["ratio_min"]) == pytest.approx(0.2)


@pytest.mark.parametrize("value", (math.nan, math.inf, -math.inf), ids=("nan", "+inf", "-inf"))
@pytest.mark.parametrize("arg", ("logprob", "rollout_logprob", "old_logprob", "advantages"))
@pytest.mark.parametrize("loss", ("ppo", "dual_clip", "cispo", "gspo", "sapo", "ppo+mis", "ppo+tis"))
def test_unvalidated_bad_value_makes_its_token_loss_nan(loss, arg, value):
    """validate=False: a NaN or infinite value at a valid position gives a NaN token loss (an
    infinite rollout log-prob made the ratio 0 or inf, which a clip turned into a finite loss;
    a NaN importance weight was dropped by MIS's mask); the other sequences are unchanged."""
    g = torch.Generator().manual_seed(3)
    lp = -torch.rand(3, 4, dtype=torch.float64, generator=g) - 0.1
    mu = lp - 0.3 * torch.randn(3, 4, dtype=torch.float64, generator=g)
    old = lp - 0.1 * torch.randn(3, 4, dtype=torch.float64, generator=g)
    A = torch.randn(3, 4, dtype=torch.float64, generator=g)
    fn = {"ppo": trmath.ppo_loss, "dual_clip": trmath.ppo_loss, "cispo": trmath.cispo_loss,
          "gspo": trmath.gspo_loss, "sapo": trmath.sapo_loss, "ppo+mis": trmath.ppo_loss,
          "ppo+tis": trmath.ppo_loss}[loss]
    kw = {"clip_ratio_c": 3.0} if loss == "dual_clip" else {}
    if "+" in loss:
        kw.update(is_correction=loss.split("+")[1], is_cap=2.0)
    args = {"logprob": lp, "rollout_logprob": mu, "old_logprob": old, "advantages": A}
    ref, _ = fn(args["logprob"], args["rollout_logprob"], args["advantages"], old_logprob=old,
                aggregation=None, **kw)
    args[arg] = args[arg].clone()
    args[arg][1, 2] = value
    out, m = fn(args["logprob"], args["rollout_logprob"], args["advantages"],
                old_logprob=args["old_logprob"], aggregation=None, validate=False, **kw)
    if arg == "rollout_logprob" and "+" not in loss:
        # the ratio is anchored to old_logprob: the rollout's log-probs enter the diagnostics only
        assert torch.equal(out, ref) and math.isnan(float(m["mismatch_k1"]))
        # without old_logprob the ratio is against the rollout's log-probs
        out, _ = fn(args["logprob"], args["rollout_logprob"], args["advantages"], aggregation=None,
                    validate=False, **kw)
        assert torch.isnan(out[1, 2]) and not bool(torch.isnan(out[[0, 2]]).any())
    else:
        assert torch.isnan(out[1, 2])
        assert torch.equal(out[[0, 2]], ref[[0, 2]])
    with pytest.raises(ValueError, match=f"^{arg}: contains"):
        fn(args["logprob"], args["rollout_logprob"], args["advantages"], old_logprob=args["old_logprob"], **kw)


@pytest.mark.parametrize("shape", ((0, 4), (3, 0)))
def test_empty_batch_gives_zero_loss(shape):
    """An empty batch (no sequences, or sequences of length 0) is a loss of 0 with a zero
    gradient and finite metrics, as a fully masked one (the max/min metrics crashed on it)."""
    for fn, kw in ((trmath.ppo_loss, {}), (trmath.ppo_loss, {"clip_ratio_c": 3.0}),
                   (trmath.cispo_loss, {}), (trmath.gspo_loss, {}), (trmath.sapo_loss, {}),
                   (trmath.dppo_loss, {}), (trmath.ppo_loss, {"is_correction": "mis"})):
        lp = torch.zeros(shape, requires_grad=True)
        loss, m = fn(lp, torch.zeros(shape), torch.zeros(shape), **kw)
        loss.backward()
        assert float(loss.detach()) == 0.0 and lp.grad.shape == lp.shape
        assert all(math.isfinite(float(v)) for v in m.values()), fn.__name__


def test_weight_and_diagnostic_errors_name_their_own_arguments():
    """importance_weights' first argument is old_logprob and mismatch_metrics' second is
    trainer_logprob: errors name those (they named the internal 'logprob')."""
    o = torch.full((2, 3), -1.0)
    bad = o.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"^old_logprob: contains NaN at valid position \(1, 2\)"):
        trmath.importance_weights(bad, o)
    with pytest.raises(ValueError, match=r"^trainer_logprob: contains NaN at valid position \(1, 2\)"):
        trmath.mismatch_metrics(o, bad)
    with pytest.raises(ValueError, match=r"^old_logprob: expected shape \[B, T\]"):
        trmath.importance_weights(torch.zeros(3), o)
    with pytest.raises(ValueError, match=r"^rollout_logprob: expected shape \(2, 3\) \(as trainer_logprob\)"):
        trmath.mismatch_metrics(torch.zeros(2, 4), o)


def test_mismatch_diagnostics_against_mpmath():
    """k1/k3 means and the normalised ESS from the sampled tokens, against 60-digit references
    on the exact float64 inputs; tiny log-ratios (1e-9) where exp(lr) - 1 - lr would cancel."""
    import mpmath

    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.dps = 60
    mu = torch.tensor([[-1.0, -2.5, -0.3, -7.0]], dtype=torch.float64)
    for scale in (1e-9, 1e-3, 1.0):
        lp = mu + scale * torch.tensor([[0.3, -1.0, 0.7, 0.1]], dtype=torch.float64)
        m = trmath.mismatch_metrics(mu, lp)
        lr = [mp.mpf(float(a)) - mp.mpf(float(b)) for a, b in zip(lp[0].tolist(), mu[0].tolist())]
        k1 = sum(-x for x in lr) / len(lr)
        k3 = sum(mp.expm1(x) - x for x in lr) / len(lr)
        w = [mp.exp(x) for x in lr]
        ess = sum(w) ** 2 / (len(w) * sum(x * x for x in w))
        # k3 ~ lr^2/2: its float64 relative error is a few ulps of the terms (1e-15), not of lr
        assert abs(float(m["mismatch_k3"]) - float(k3)) <= 1e-14 * float(k3)
        # k1 is a mean of log-ratios of either sign: each lp - mu is exact (Sterbenz: they are
        # within a factor 2), and summing n terms errs by at most n eps sum|lr| (Higham), which
        # can exceed eps |k1| when the terms cancel -- hence a bound on mean |lr|, not on |k1|.
        bound = len(lr) * 2.0 ** -52 * float(sum(abs(x) for x in lr) / len(lr))
        assert abs(float(m["mismatch_k1"]) - float(k1)) <= bound
        assert abs(float(m["mismatch_ess"]) - float(ess)) <= 1e-14
        assert float(m["mismatch_k3"]) >= 0


def test_dppo_topk_empty_k_axis_and_on_policy_mismatch_sign():
    """An empty Top-K axis is named by the divergence's own check (a ValueError, not a reshape
    error); on-policy (rollout = trainer) the mismatch k1 is +0, not -0."""
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    e = torch.zeros(1, 3, 0)
    for div in ("topk_tv", "topk_kl"):
        with pytest.raises(ValueError, match="rollout_topk_logprobs: the kept-token axis"):
            trmath.dppo_loss(lp, lp - 0.1, torch.tensor([1.0]), divergence=div, topk_logprobs=e,
                             rollout_topk_logprobs=e)
    for m in (trmath.mismatch_metrics(lp, lp), trmath.ppo_loss(lp, lp, torch.tensor([1.0]))[1]):
        assert math.copysign(1.0, float(m["mismatch_k1"])) == 1.0


def _mismatch_sums_bound(n: int, abs_sum: float) -> float:
    """Rounding bound of a sum of n terms in either path's order: the compiled kernel sums 16384
    entries per chunk in double lanes (at most 2048 additions in a chain on 8 lanes, 4096 on 4),
    then the lanes (3) and the chunks (n / 16384) -- gamma_k sum|terms| with k below 4100 + n /
    16384 (Higham, 2002, 4.2); torch's pairwise sum has a shorter chain. Twice that: the two
    orders' errors add, and each term carries an ulp of its own (k3, exp)."""
    return 2 * (4100 + n / 16384 + 2) * 2.0 ** -53 * abs_sum


@pytest.mark.parametrize("dt", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 16384, 3 * 16384 + 5])
def test_mismatch_sums_kernel_matches_torch_path(on_both_paths, dt, n):
    """The mismatch diagnostics' one-pass sums (trmath::mismatch_sums; the compiled kernel on CPU)
    against the float64 torch path that serves other devices: maxima equal, sums within the
    rounding bound of their summation orders; over chunk boundaries, masks, every dtype."""
    from trmath._estimators_impl import mismatch_sums

    g = torch.Generator().manual_seed(n)
    mu = (-3 * torch.rand(n, generator=g, dtype=torch.float64)).to(dt)
    tr = (mu.double() + torch.randn(n, generator=g, dtype=torch.float64) * 0.7).clamp_max(0).to(dt)
    for valid in (torch.ones(n, dtype=torch.bool), torch.rand(n, generator=g) > 0.3):
        a, b = on_both_paths(lambda: mismatch_sums(mu, tr, valid))
        assert a.dtype == b.dtype == torch.float64 and a.shape == b.shape == (6,)
        lr = torch.where(valid, tr.double() - mu.double(), torch.zeros((), dtype=torch.float64))
        k3 = torch.expm1(lr) - lr
        assert torch.equal(a[2:4], b[2:4])  # max lr, max |lr|: no rounding
        if not bool(valid.any()):
            continue
        assert float(a[2]) == float(lr[valid].max()) and float(a[3]) == float(lr.abs().max())
        w = torch.where(valid, torch.exp(lr - float(a[2])), torch.zeros((), dtype=torch.float64))
        for j, terms in ((0, lr.abs()), (1, k3), (4, w), (5, w * w)):
            bound = _mismatch_sums_bound(n, float(terms.sum()))
            assert abs(float(a[j]) - float(b[j])) <= bound, (j, float(a[j]), float(b[j]), bound)


def test_mismatch_sums_edge_cases(on_both_paths):
    """No valid entry: max lr = -inf, everything else 0; a NaN at a valid entry makes every sum
    NaN, at padding changes nothing; the result does not depend on the thread count."""
    from trmath._estimators_impl import mismatch_sums

    n = 2 * 16384 + 3
    g = torch.Generator().manual_seed(5)
    mu = -torch.rand(n, generator=g)
    tr = mu + 0.1 * torch.randn(n, generator=g)
    none = torch.zeros(n, dtype=torch.bool)
    for got in on_both_paths(lambda: mismatch_sums(mu, tr, none)):
        assert got.tolist() == [0.0, 0.0, -math.inf, 0.0, 0.0, 0.0]
    empty = torch.zeros(0)
    for got in on_both_paths(lambda: mismatch_sums(empty, empty, torch.zeros(0, dtype=torch.bool))):
        assert got.tolist() == [0.0, 0.0, -math.inf, 0.0, 0.0, 0.0]
    valid = torch.rand(n, generator=g) > 0.5
    ref = mismatch_sums(mu, tr, valid)
    for pos in (int(torch.nonzero(~valid)[0]), int(torch.nonzero(~valid)[-1])):
        bad = tr.clone()
        bad[pos] = math.nan
        assert torch.equal(mismatch_sums(mu, bad, valid), ref)  # padding is free
    bad = tr.clone()
    bad[int(torch.nonzero(valid)[-1])] = math.nan
    for got in on_both_paths(lambda: mismatch_sums(mu, bad, valid)):
        assert bool(torch.isnan(got).all())
    before = trmath.num_threads()
    try:
        trmath.set_num_threads(1)
        one = mismatch_sums(mu, tr, valid)
    finally:
        trmath.set_num_threads(before)
    assert torch.equal(one, ref)


def test_mismatch_metrics_against_mpmath_many_tokens():
    """mismatch_metrics over more tokens than one kernel chunk (k3 and the ESS sums cross chunk
    boundaries), with a mask, against 40-digit references: k3's mean and the ESS within 1e-13
    relative, k1 within the summation bound of its signed terms, max |lr| exact."""
    import mpmath

    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.dps = 40
    g = torch.Generator().manual_seed(11)
    B, T = 5, 9000
    mu = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    lp = mu + 0.05 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    m = trmath.mismatch_metrics(mu, lp, mask)
    lr = [mp.mpf(a) - mp.mpf(b) for a, b in zip(lp[mask].tolist(), mu[mask].tolist())]
    n = len(lr)
    k3 = mp.fsum(mp.expm1(x) - x for x in lr) / n
    k1 = -mp.fsum(lr) / n
    w = [mp.exp(x) for x in lr]
    ess = mp.fsum(w) ** 2 / (n * mp.fsum(x * x for x in w))
    # k3 and the ESS sums have positive terms, each within an ulp or two: their rounding walks
    # like sqrt(chain) eps ~ 1e-14 (measured 2e-16 and 9e-16 here); 1e-13 is below the worst-case
    # bound (~9e-13, _mismatch_sums_bound) but far above what these seeded inputs give.
    assert abs(float(m["mismatch_k3"]) - float(k3)) <= 1e-13 * float(k3)
    assert abs(float(m["mismatch_k1"]) - float(k1)) <= _mismatch_sums_bound(n, float(mp.fsum(abs(x) for x in lr))) / n
    assert abs(float(m["mismatch_ess"]) - float(ess)) <= 1e-13 * float(ess)
    assert float(m["mismatch_max_abs_log_ratio"]) == max(abs(float(x)) for x in (lp - mu)[mask].tolist())


# ------------------------------------------------------------------------------------------------
# dtypes, exact divergence paths
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt,out", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                    (torch.float32, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("name", LOGPROB_OBJECTIVES)
def test_result_dtype(dt, out, name):
    lp, mu, A, M = make_batch(seed=1, dtype=dt)
    kw = dict(divergence=torch.zeros(lp.shape), delta=0.1) if name == "dppo" else {}
    g, loss, _ = grad_of(trmath.get_objective(name).fn, lp, mu, A, M, **kw)
    assert loss.dtype == out and g.dtype == dt and bool(torch.isfinite(g).all())


def test_dppo_mask_exact_matches_the_exact_kernels():
    B, T, V = 3, 4, 50
    g0 = torch.Generator().manual_seed(3)
    z_mu = torch.randn(B, T, V, generator=g0)
    z_pi = z_mu + 0.5 * torch.randn(B, T, V, generator=g0)
    tok = torch.randint(0, V, (B, T), generator=g0)
    lp, mu = trmath.token_logprobs(z_pi, tok, temperature=0.7), trmath.token_logprobs(z_mu, tok, temperature=0.7)
    A = torch.randn(B, T, generator=g0)
    for div, ref in (("exact_tv", trmath.tv(z_mu, z_pi, temperature=0.7)),
                     ("exact_kl", trmath.kl(z_mu, z_pi, temperature=0.7))):  # KL(mu || pi)
        keep, D = trmath.dppo_mask(lp, mu, A, divergence=div, logits=z_pi, rollout_logits=z_mu,
                                   temperature=0.7, return_divergence=True)
        assert torch.equal(D, ref)
        delta = obj.DPPO_DIVERGENCES[div]["default_delta"]
        r = torch.exp(lp - mu)
        assert torch.equal(keep, ~(((A > 0) & (r > 1) & (ref > delta)) | ((A < 0) & (r < 1) & (ref > delta))))
    # numpy in, numpy out
    keep_np = trmath.dppo_mask(lp.numpy(), mu.numpy(), A.numpy(), divergence=(r - 1).abs().numpy(), delta=0.2)
    assert isinstance(keep_np, np.ndarray) and keep_np.dtype == np.bool_


@pytest.mark.skipif(not hasattr(trmath, "binary_tv"), reason="coarse divergences not available")
@pytest.mark.parametrize("divergence", ["binary_tv", "binary_kl"])
def test_dppo_binary(divergence):
    lp, mu, A, M = make_batch(seed=12, spread=0.6)
    keep, D = trmath.dppo_mask(lp, mu, A, divergence=divergence, mask=M, return_divergence=True)
    p, q = np.exp(np64(mu)), np.exp(np64(lp))
    if divergence == "binary_tv":
        ref = np.abs(p - q)
    else:
        ref = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    m = M.numpy()
    np.testing.assert_allclose(np64(D)[m], ref[m], rtol=1e-9)
    assert bool((D[~M] == 0).all())
    delta = obj.DPPO_DIVERGENCES[divergence]["default_delta"]
    r = np.exp(np64(lp) - np64(mu))
    want, _ = _dppo_reference(r, np64(A), np64(D), m, delta, delta, math.inf)
    assert (keep.numpy() == want).all()
    g, _, _ = grad_of(trmath.dppo_loss, lp, mu, A, M, divergence=divergence, cap=5.0, **SUM)
    _, coef = _dppo_reference(r, np64(A), np64(D), m, delta, delta, 5.0)
    assert_grad(g, coef, M)


@pytest.mark.skipif(not hasattr(trmath, "topk_tv"), reason="coarse divergences not available")
@pytest.mark.parametrize("divergence", ["topk_tv", "topk_kl"])
def test_dppo_topk(divergence):
    B, T, V, K = 3, 5, 40, 6
    g0 = torch.Generator().manual_seed(5)
    z_mu = torch.randn(B, T, V, generator=g0, dtype=torch.float64)
    z_pi = z_mu + 0.7 * torch.randn(B, T, V, generator=g0, dtype=torch.float64)
    lmu, lpi = torch.log_softmax(z_mu, -1), torch.log_softmax(z_pi, -1)
    ids = lmu.topk(K, dim=-1).indices
    tok = ids[..., 0]
    lp, mu = lpi.gather(-1, tok[..., None])[..., 0], lmu.gather(-1, tok[..., None])[..., 0]
    A = torch.randn(B, T, generator=g0, dtype=torch.float64)
    M = torch.arange(T)[None] < torch.tensor([5, 2, 0])[:, None]
    keep, D = trmath.dppo_mask(lp, mu, A, divergence=divergence, mask=M, return_divergence=True,
                               topk_logprobs=lpi.gather(-1, ids), rollout_topk_logprobs=lmu.gather(-1, ids))
    p, q = np.exp(np64(lmu.gather(-1, ids))), np.exp(np64(lpi.gather(-1, ids)))
    Rp, Rq = 1 - p.sum(-1), 1 - q.sum(-1)
    if divergence == "topk_tv":
        ref = 0.5 * (np.abs(p - q).sum(-1) + np.abs(Rp - Rq))
    else:
        ref = (p * np.log(p / q)).sum(-1) + Rp * np.log(Rp / Rq)
    m = M.numpy()
    np.testing.assert_allclose(np64(D)[m], ref[m], rtol=1e-9)
    delta = obj.DPPO_DIVERGENCES[divergence]["default_delta"]
    want, _ = _dppo_reference(np.exp(np64(lp) - np64(mu)), np64(A), np64(D), m, delta, delta, math.inf)
    assert (keep.numpy() == want).all()


def _dppo_case(seed: int = 9):
    """A small DPPO batch with every divergence's inputs (logits, Top-K log-probs), padding."""
    B, T, V, K = 2, 6, 30, 5
    g = torch.Generator().manual_seed(seed)
    z_mu = torch.randn(B, T, V, generator=g)
    z_pi = z_mu + 0.5 * torch.randn(B, T, V, generator=g)
    lmu, lpi = torch.log_softmax(z_mu, -1), torch.log_softmax(z_pi, -1)
    ids = lmu.topk(K, dim=-1).indices
    tok = ids[..., 0]
    lp, mu = lpi.gather(-1, tok[..., None])[..., 0], lmu.gather(-1, tok[..., None])[..., 0]
    A = torch.randn(B, T, generator=g)
    M = torch.ones(B, T, dtype=torch.bool)
    M[1, 4:] = False
    extras = dict(topk_logprobs=lpi.gather(-1, ids), rollout_topk_logprobs=lmu.gather(-1, ids),
                  logits=z_pi, rollout_logits=z_mu)
    return lp, mu, A, M, extras


@pytest.mark.parametrize("divergence", ["binary_tv", "binary_kl", "topk_tv", "topk_kl", "exact_tv", "exact_kl"])
def test_dppo_unvalidated_propagates_nan_instead_of_raising(divergence):
    """validate=False: a bad divergence input at a valid token makes that token's loss and
    gradient NaN (never a finite loss, never an exception); at padding it changes nothing.
    validate=True still raises."""
    lp, mu, A, M, extras = _dppo_case()
    ref, _ = trmath.dppo_loss(lp, mu, A, M, divergence=divergence, aggregation=None, validate=False, **extras)
    key = "topk_logprobs" if divergence.startswith("topk") else "logits" if divergence.startswith("exact") else None
    for pos, valid in (((0, 2), True), ((1, 5), False)):
        ex = dict(extras)
        lpb = lp.clone()
        if key is None:
            lpb[pos] = math.nan
        else:
            x = ex[key].clone()
            x[pos][0] = math.nan
            ex[key] = x
        l = lpb.clone().requires_grad_()
        loss, m = trmath.dppo_loss(l, mu, A, M, divergence=divergence, aggregation=None, validate=False, **ex)
        if valid:
            (g,) = torch.autograd.grad(loss[pos], l, retain_graph=True)
            assert bool(torch.isnan(loss[pos])) and bool(torch.isnan(g[pos]))
            assert bool(torch.isnan(m["divergence_mean"]))
            with pytest.raises(ValueError):
                trmath.dppo_loss(lpb, mu, A, M, divergence=divergence, **ex)
        else:
            assert torch.equal(loss.detach(), ref)
        others = torch.ones_like(M)
        others[pos] = False
        assert torch.equal(loss.detach()[others & M], ref[others & M])


@pytest.mark.parametrize("divergence", ["binary_tv", "binary_kl", "topk_tv", "topk_kl", "exact_kl"])
def test_dppo_unvalidated_compiles_without_graph_breaks(divergence):
    """With validate=False DPPO has no data-dependent branch or shape: its training-step loss
    compiles with fullgraph=True, value and gradient equal to eager."""
    lp, mu, A, M, extras = _dppo_case(3)

    def step(lp, mu, A, M, extras):
        return trmath.dppo_loss(lp, mu, A, M, divergence=divergence, validate=False, **extras)[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    a, b = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    ref, got = step(a, mu, A, M, extras), compiled(b, mu, A, M, extras)
    assert torch.equal(ref, got)
    ref.backward()
    got.backward()
    assert torch.equal(a.grad, b.grad)

    def mask_step(lp, mu, A, M, extras):
        return trmath.dppo_mask(lp, mu, A, divergence=divergence, mask=M, return_divergence=True,
                                validate=False, **extras)

    keep_ref, D_ref = mask_step(lp, mu, A, M, extras)
    keep_got, D_got = torch.compile(mask_step, backend="aot_eager", fullgraph=True)(lp, mu, A, M, extras)
    assert torch.equal(keep_ref, keep_got) and torch.equal(D_ref, D_got)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
def test_registry():
    assert set(obj.OBJECTIVES) == {"ppo", "dual_clip", "cispo", "gspo", "sapo", "dppo", "troll"}
    for name, info in obj.OBJECTIVES.items():
        assert info.name == name and callable(info.fn) and info.fn.__doc__
        assert info.ratio in ("token", "sequence") and info.anchor in ("old", "rollout")
        assert info.level in ("token", "sequence") and info.gradient and info.limits
        assert trmath.get_objective(name) is info
    assert trmath.get_objective("dppo").anchor == "rollout"
    dppo = trmath.get_objective("dppo")
    assert dppo.required_inputs() == () and dppo.required_inputs(divergence="binary_kl") == ()
    assert dppo.required_inputs(divergence="topk_tv") == ("topk_logprobs", "rollout_topk_logprobs")
    assert dppo.required_inputs(divergence="exact_tv") == ("logits", "rollout_logits")
    with pytest.raises(ValueError, match="divergence: unknown 'l2'"):
        dppo.required_inputs(divergence="l2")
    # the declared inputs are the ones a call really requires
    lp, mu, A, M = make_batch(seed=0)
    for d, info in obj.DPPO_DIVERGENCES.items():
        for name in info["needs"]:
            with pytest.raises(ValueError, match=f"{name}: required for divergence='{d}'"):
                trmath.dppo_mask(lp, mu, A, divergence=d, **{n: torch.zeros(5, 9, 4) for n in info["needs"]
                                                              if n != name})
    assert trmath.get_objective("gspo").level == "sequence"
    with pytest.raises(ValueError, match="unknown name 'grpo'.*cispo, dppo, dual_clip, gspo, ppo, sapo, troll"):
        trmath.get_objective("grpo")
    with pytest.raises(ValueError, match="valid names"):
        trmath.policy_loss("nope", torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1))


@pytest.mark.parametrize("name", LOGPROB_OBJECTIVES)
def test_policy_loss_dispatches(name):
    lp, mu, A, M = make_batch(seed=13)
    kw = dict(divergence=torch.zeros_like(lp), delta=0.1) if name == "dppo" else {}
    l1, m1 = trmath.policy_loss(name, lp, mu, A, M, aggregation="seq-mean-token-mean", **kw)
    l2, m2 = trmath.get_objective(name).fn(lp, mu, A, M, aggregation="seq-mean-token-mean", **kw)
    assert torch.equal(l1, l2) and m1.keys() == m2.keys()
    with pytest.raises(TypeError, match="unexpected keyword"):
        trmath.policy_loss(name, lp, mu, A, M, not_an_option=1)
    tok, _ = trmath.policy_loss(name, lp, mu, A, M, aggregation=None, **kw)
    assert tok.shape == lp.shape and bool((tok[~M] == 0).all())
    assert float(trmath.aggregate_loss(tok, M, "seq-mean-token-mean")) == pytest.approx(float(l1), rel=1e-14)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_bad_inputs():
    lp, mu, A, M = make_batch(seed=0)
    with pytest.raises(ValueError, match=r"rollout_logprob: expected shape \(5, 9\)"):
        trmath.ppo_loss(lp, mu[:, :3], A, M)
    with pytest.raises(ValueError, match=r"advantages: expected shape \(5, 9\) or \(5,\)"):
        trmath.ppo_loss(lp, mu, A[:, :2], M)
    with pytest.raises(ValueError, match=r"logprob: expected shape \[B, T\]"):
        trmath.ppo_loss(lp[0], mu[0], A[0])
    with pytest.raises(TypeError, match="logprob: expected a floating dtype"):
        trmath.ppo_loss(lp.long(), mu, A, M)
    with pytest.raises(TypeError, match="advantages: expected a torch.Tensor or numpy.ndarray"):
        trmath.ppo_loss(lp, mu, [1.0] * 5, M)
    with pytest.raises(ValueError, match="mask: entries must be 0 or 1"):
        trmath.ppo_loss(lp, mu, A, M.double() * 0.5)
    with pytest.raises(ValueError, match=r"mask: expected shape \(5, 9\)"):
        trmath.ppo_loss(lp, mu, A, M[:2])
    bad = lp.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"logprob: contains NaN at valid position \(0, 0\)"):
        trmath.ppo_loss(bad, mu, A, M)
    bad = A.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match=r"advantages: contains \+inf at valid position \(2, 0\)"):
        trmath.cispo_loss(lp, mu, bad, M)
    nan_mu = mu.clone()
    nan_mu[0, 0] = float("nan")
    loss, _ = trmath.ppo_loss(lp, nan_mu, A, M, validate=False)
    assert math.isnan(float(loss))  # NaN never becomes a number silently
    with pytest.raises(ValueError, match="aggregation: unknown mode 'mean'.*token-mean"):
        trmath.ppo_loss(lp, mu, A, M, aggregation="mean")
    with pytest.raises(ValueError, match="eps_low: must be >= 0"):
        trmath.ppo_loss(lp, mu, A, M, eps_low=-0.1)
    with pytest.raises(ValueError, match="clip_ratio_c: must be finite and > 1"):
        trmath.ppo_loss(lp, mu, A, M, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="tau_neg: must be finite and > 0"):
        trmath.sapo_loss(lp, mu, A, M, tau_neg=0.0)
    with pytest.raises(ValueError, match="normalizer: must be finite and > 0"):
        trmath.ppo_loss(lp, mu, A, M, normalizer=0)
    with pytest.raises(ValueError, match="max_length: expected an integer >= 1"):
        trmath.ppo_loss(lp, mu, A, M, aggregation="seq-mean-token-sum-norm", max_length=0)
    with pytest.raises(ValueError, match="is_correction: unknown 'is'"):
        trmath.ppo_loss(lp, mu, A, M, is_correction="is")
    with pytest.raises(ValueError, match="is_level: unknown"):
        trmath.ppo_loss(lp, mu, A, M, is_correction="tis", is_level="batch")
    with pytest.raises(ValueError, match="is_cap: must be >= 1.0"):
        trmath.ppo_loss(lp, mu, A, M, is_correction="tis", is_cap=0.5)


def test_bad_dppo_inputs():
    lp, mu, A, M = make_batch(seed=0)
    with pytest.raises(ValueError, match="divergence: unknown 'js'; valid: binary_tv, binary_kl, topk_tv"):
        trmath.dppo_mask(lp, mu, A, divergence="js")
    with pytest.raises(ValueError, match="topk_logprobs: required for divergence='topk_kl'"):
        trmath.dppo_loss(lp, mu, A, M, divergence="topk_kl")
    with pytest.raises(ValueError, match="rollout_logits: required for divergence='exact_tv'"):
        trmath.dppo_loss(lp, mu, A, M, divergence="exact_tv", logits=torch.zeros(5, 9, 3))
    with pytest.raises(ValueError, match=r"logits: expected shape \[5, 9, K or V\]"):
        trmath.dppo_mask(lp, mu, A, divergence="exact_kl", logits=torch.zeros(5, 3),
                         rollout_logits=torch.zeros(5, 9, 3))
    with pytest.raises(ValueError, match="delta: required when divergence is a tensor"):
        trmath.dppo_mask(lp, mu, A, divergence=torch.zeros_like(lp))
    with pytest.raises(ValueError, match="delta_low: must be >= 0"):
        trmath.dppo_mask(lp, mu, A, divergence="exact_tv", delta=-1.0)
    with pytest.raises(ValueError, match="cap: must be >= 1.0"):
        trmath.dppo_loss(lp, mu, A, M, divergence=torch.zeros_like(lp), delta=0.1, cap=0.5)
    with pytest.raises(ValueError, match="'tis' does not compose with dppo"):
        trmath.dppo_loss(lp, mu, A, M, divergence=torch.zeros_like(lp), delta=0.1, is_correction="tis")
    z = torch.zeros(5, 9, 3, dtype=torch.float64)
    zb = z.clone()
    zb[3, 0, 1] = float("nan")  # a valid position (row 3 has length >= 1)
    assert bool(M[3, 0])
    with pytest.raises(ValueError, match=r"rollout_logits, logits: the row at valid position \(3, 0\)"):
        trmath.dppo_mask(lp, mu, A, divergence="exact_tv", logits=z, rollout_logits=zb, mask=M)
    d = torch.zeros_like(lp)
    d[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"divergence: contains NaN at valid position \(0, 0\)"):
        trmath.dppo_mask(lp, mu, A, divergence=d, delta=0.1, mask=M)


@pytest.mark.skipif(not hasattr(trmath, "binary_tv"), reason="coarse divergences not available")
def test_coarse_errors_name_our_arguments():
    lp, mu, A, M = make_batch(seed=0)
    bad = lp.clone()
    bad[2, 0] = 0.5  # a log-probability above 0 at a valid position
    with pytest.raises(ValueError, match=r"divergence='binary_tv'.*logprob: .*\(2, 0\)"):
        trmath.dppo_mask(bad, mu, A, divergence="binary_tv", mask=M)
    bad[2, 0] = lp[2, 0]
    bad[1, 0] = 0.5  # the same at a padding position (row 1 is empty): ignored
    assert torch.equal(trmath.dppo_mask(bad, mu, A, divergence="binary_tv", mask=M),
                       trmath.dppo_mask(lp, mu, A, divergence="binary_tv", mask=M))


def test_sequence_weight_cannot_overflow():
    """A sequence log-weight of 1000 (w = e^1000, not a float64) truncates to C exactly; MIS
    drops the sequence; the losses stay finite."""
    old = torch.full((2, 100), -1.0, dtype=torch.float64)
    mu = old.clone()
    mu[0] -= 10.0  # sum over 100 tokens: log w = 1000 for sequence 0
    w, keep = trmath.importance_weights(old, mu, level="sequence", cap=3.0)
    assert torch.equal(w[0], torch.full((100,), 3.0, dtype=torch.float64)) and bool((w[1] == 1).all())
    _, keep = trmath.importance_weights(old, mu, correction="mis", level="sequence", cap=3.0)
    assert not bool(keep[0].any()) and bool(keep[1].all())
    A = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for corr in ("tis", "mis"):
        loss, m = trmath.ppo_loss(old, mu, A, old_logprob=old, is_correction=corr, is_level="sequence",
                                  is_cap=3.0)
        assert math.isfinite(float(loss)) and math.isfinite(float(m["mismatch_ess"]))
    with pytest.raises(ValueError, match="correction: expected 'tis' or 'mis', got None"):
        trmath.importance_weights(old, mu, correction=None)


@pytest.mark.parametrize("loss", ("ppo", "dual_clip", "cispo", "gspo", "sapo", "ppo+mis", "ppo+tis"))
def test_unvalidated_objectives_compile_without_graph_breaks(loss):
    """With validate=False the objectives have no data-dependent branch: a training step's loss
    compiles with fullgraph=True, value and gradient equal to eager (NaN where a bad value is)."""
    g = torch.Generator().manual_seed(8)
    lp0 = -torch.rand(3, 5, generator=g) - 0.05
    mu = lp0 - 0.2 * torch.randn(3, 5, generator=g)
    A = torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    fn = {"cispo": trmath.cispo_loss, "gspo": trmath.gspo_loss, "sapo": trmath.sapo_loss}.get(loss, trmath.ppo_loss)
    kw = {"clip_ratio_c": 3.0} if loss == "dual_clip" else {}
    if "+" in loss:
        kw.update(is_correction=loss.split("+")[1], old_logprob=lp0.detach() + 0.01)

    def step(lp, mu, A, mask):
        return fn(lp, mu, A, mask, validate=False, aggregation=None, **kw)[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for bad in (None, math.inf):
        m = mu.clone()
        if bad is not None:
            m[1, 1] = bad
        a, b = lp0.clone().requires_grad_(), lp0.clone().requires_grad_()
        ref, got = step(a, m, A, mask), compiled(b, m, A, mask)
        assert torch.equal(ref.isnan(), got.isnan()) and torch.equal(ref.nan_to_num(), got.nan_to_num())
        ref.nan_to_num().sum().backward()
        got.nan_to_num().sum().backward()
        assert torch.equal(a.grad.isnan(), b.grad.isnan())
        assert torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num())


@pytest.mark.parametrize("loss", ("ppo", "cispo", "gspo", "sapo", "dppo"))
def test_global_normalizer_tensor_compiles_unvalidated(loss):
    """The gradient-accumulation recipe -- normalizer=loss_normalizer(mask) over the step's
    micro-batches, a 0-d tensor -- compiles with fullgraph=True beside validate=False (its check
    read the value on the host: a graph break, and a synchronisation on a GPU), equal to eager;
    with validate=True a bad normaliser is still an error."""
    g = torch.Generator().manual_seed(9)
    lp0 = -torch.rand(3, 5, generator=g) - 0.05
    mu = lp0 - 0.2 * torch.randn(3, 5, generator=g)
    A = torch.randn(3, generator=g)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    fn = {"cispo": trmath.cispo_loss, "gspo": trmath.gspo_loss, "sapo": trmath.sapo_loss,
          "dppo": trmath.dppo_loss}.get(loss, trmath.ppo_loss)
    kw = {"divergence": "binary_tv"} if loss == "dppo" else {}
    agg = "seq-mean-token-mean" if loss == "gspo" else "token-mean"
    N = trmath.loss_normalizer(mask, agg) * 2  # as if a second micro-batch of the same size

    def step(lp, mu, A, mask, N):
        return fn(lp, mu, A, mask, validate=False, aggregation=agg, normalizer=N, **kw)[0]

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    a, b = lp0.clone().requires_grad_(), lp0.clone().requires_grad_()
    ref, got = step(a, mu, A, mask, N), compiled(b, mu, A, mask, N)
    assert torch.equal(got, ref)
    ref.backward()
    got.backward()
    assert torch.equal(b.grad, a.grad)
    whole = fn(lp0, mu, A, mask, aggregation=agg, **kw)[0]
    # half the global normaliser: the same sum divided by 2N instead of N, a power-of-2 scaling
    assert torch.equal(ref * 2, whole)
    for bad in (0.0, -2.0, math.nan):
        with pytest.raises(ValueError, match="normalizer: must be finite and > 0"):
            fn(lp0, mu, A, mask, aggregation=agg, normalizer=torch.tensor(bad), **kw)
    with pytest.raises(TypeError, match="normalizer: expected a real number"):
        trmath.aggregate_loss(lp0, mask, normalizer=torch.tensor(True))


def test_numpy_scalars_are_numbers():
    """numpy's scalars (np.int64 from a count, np.float32) are numbers wherever a number is
    taken (they are neither int nor float): normalizer, max_length, clip ranges, caps."""
    lp = torch.tensor([[-0.5, -1.0, -2.0]])
    mu = lp - 0.1
    A = torch.tensor([1.0])
    ref = trmath.ppo_loss(lp, mu, A, normalizer=2, aggregation="seq-mean-token-sum-norm", max_length=4)[0]
    for n, L in ((np.int64(2), np.int64(4)), (np.float32(2), np.int32(4))):
        got = trmath.ppo_loss(lp, mu, A, normalizer=n, aggregation="seq-mean-token-sum-norm", max_length=L)[0]
        assert torch.equal(got, ref)
    assert torch.equal(trmath.ppo_loss(lp, mu, A, eps_low=np.float32(0.25))[0],
                       trmath.ppo_loss(lp, mu, A, eps_low=float(np.float32(0.25)))[0])
    with pytest.raises(TypeError, match="normalizer: expected a number, got bool"):
        trmath.ppo_loss(lp, mu, A, normalizer=np.bool_(True))
    with pytest.raises(ValueError, match="max_length: expected an integer >= 1"):
        trmath.ppo_loss(lp, mu, A, aggregation="seq-mean-token-sum-norm", max_length=np.float64(4.0))


def test_sapo_gradient_where_the_ratio_is_large_and_tau_small():
    """SAPO's gradient -A r sech^2(tau (r - 1) / 2) at large log-ratios: exact (mpmath) for small
    tau (the graph used to be cut above lr = 30, giving 0 for -1.6e6), an exact 0 and never NaN
    where e^lr overflows (lr = 100 in float32, 800 in float64), and the on-policy value -A."""
    import mpmath

    for dt in (torch.float64, torch.float32):
        for tau, lr in ((1e-12, 30.5), (1e-13, 33.0), (1.0, 2.0), (1.0, 5.0), (1.0, 100.0), (1.0, 800.0),
                        (1.05, -3.0), (0.5, 0.0)):
            lp = torch.tensor([[lr]], dtype=dt, requires_grad=True)
            mu = torch.zeros(1, 1, dtype=dt)
            A = torch.tensor([2.0], dtype=dt)
            loss, _ = trmath.sapo_loss(lp, mu, A, tau_pos=tau, tau_neg=tau)
            loss.backward()
            lrv = float(torch.tensor(lr, dtype=dt))
            with mpmath.workdps(40):  # (a local precision: other tests' references keep theirs)
                r = mpmath.exp(mpmath.mpf(lrv))
                x = tau * (r - 1)
                ref = float(-2 * r * mpmath.sech(x / 2) ** 2)
            got = float(lp.grad)
            assert math.isfinite(got) and math.isfinite(float(loss.detach())), (dt, tau, lr, got)
            # plus the dtype's smallest subnormal: below it the correctly rounded gradient is 0
            # (float32, lr = 5: the exact 1.1e-61)
            fi = torch.finfo(dt)
            tol = (1e-12 if dt == torch.float64 else 2e-5) * abs(ref) + fi.smallest_normal * fi.eps
            assert abs(got - ref) <= tol, (dt, tau, lr, got, ref)


def test_dppo_rejects_negative_precomputed_divergences():
    """A divergence is >= 0: a negative or -inf precomputed value (an upstream bug) is an error
    naming its position, not a silently kept token; NaN too; padding may hold anything."""
    lp = torch.tensor([[-0.1, -0.2, -0.3]])
    mu = lp - 0.05
    A = torch.tensor([1.0])
    mask = torch.tensor([[True, True, False]])
    for bad in (-5.0, -math.inf, -1e-30):
        d = torch.tensor([[0.01, bad, 0.0]])
        with pytest.raises(ValueError, match=r"divergence: .* < 0 at valid position \(0, 1\)"):
            trmath.dppo_mask(lp, mu, A, divergence=d, delta=0.1)
        with pytest.raises(ValueError, match=r"< 0 at valid position"):
            trmath.dppo_loss(lp, mu, A, mask, divergence=d, delta=0.1)
    d = torch.tensor([[0.01, 0.5, -7.0]])  # the negative value at padding: free
    loss, m = trmath.dppo_loss(lp, mu, A, mask, divergence=d, delta=0.1)
    assert math.isfinite(float(loss)) and float(m["masked_frac"]) == 0.5


def test_values_that_overflow_the_computation_dtype_are_errors():
    """float64 advantages (or old log-probs) beside float32 log-probs are converted to float32:
    a finite value beyond its range is an error naming it, never an infinite loss."""
    lp = torch.tensor([[-0.5, -1.0]])
    mu = lp - 0.1
    with pytest.raises(ValueError, match=r"advantages: 1e\+39 at valid position \(0, 0\) overflows float32"):
        trmath.ppo_loss(lp, mu, torch.tensor([1e39], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"old_logprob: -1e\+40 at valid position \(0, 1\) overflows float32"):
        trmath.ppo_loss(lp, mu, torch.tensor([1.0]), old_logprob=torch.tensor([[-0.5, -1e40]], dtype=torch.float64))
    # at padding, or with float64 log-probs, nothing overflows
    loss, _ = trmath.ppo_loss(lp, mu, torch.tensor([[1.0, 1e39]], dtype=torch.float64),
                              torch.tensor([[True, False]]))
    assert math.isfinite(float(loss))
    loss, _ = trmath.ppo_loss(lp.double(), mu.double(), torch.tensor([1e39], dtype=torch.float64))
    assert math.isfinite(float(loss))


def test_dppo_exact_divergence_errors_name_the_callers_arguments():
    """The exact divergences' argument errors name rollout_logits / logits, not the internal
    p_logits / q_logits of trmath.kl."""
    lp = torch.tensor([[-0.1, -0.2]])
    mu = lp - 0.05
    z, w = torch.randn(1, 2, 4), torch.randn(1, 2, 3)
    for div in ("exact_kl", "exact_tv"):
        with pytest.raises(ValueError, match=r"rollout_logits and logits: vocabulary sizes differ") as e:
            trmath.dppo_loss(lp, mu, torch.tensor([1.0]), divergence=div, logits=w, rollout_logits=z)
        assert "p_logits" not in str(e.value) and "q_logits" not in str(e.value)
