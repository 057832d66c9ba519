"""trmath objectives inside verl: registered in verl's policy-loss registry, called through it.

Each ``trmath_*`` loss is fetched with verl's own ``get_policy_loss_fn`` and compared -- loss
value, gradient with respect to ``log_prob`` and verl's metrics -- with verl's built-in loss of
the same algorithm (``dppo_tv``, ``dppo_kl``, ``vanilla``, ``cispo``, ``gspo``, ``sapo``) on
identical inputs and an identical ``ActorConfig``, for every aggregation mode, with and without
rollout-correction weights and verl's data-parallel global normalisation. verl's own actor
loss function is run with ``policy_loss.loss_mode`` set to a trmath name.

Skips without verl; ``.ci/integrations.sh`` runs it with verl installed and
``TRMATH_REQUIRE_INTEGRATIONS=1`` (a missing verl is then an error, not a skip).

Tolerances (float64 inputs). Both sides evaluate the same formula with different operation
orders (trmath selects masked tokens out and divides once; verl multiplies by masks), so
values and gradients agree to a few float64 roundings: ``rtol=1e-12``. (verl's
``seq-mean-token-mean`` divides by ``n_b + 1e-8``; with the boolean response mask its actor
passes, ``n_b`` is an integer tensor and the sum is formed in float32, where ``n_b + 1e-8``
rounds to ``n_b`` exactly, so no difference arises.) verl forms its clip/mask fractions in
float32, so those metrics are compared at ``rel=2**-22``. One deliberate numerical difference
is accounted for, not tolerated away:

* DPPO's masks are decisions at a threshold: verl computes ``exp(log_prob) - exp(old)`` and a
  binary KL with a ``1e-8`` guard inside the logarithm, trmath computes both exactly; the
  guard moves verl's KL by at most ``1e-8 / min(1 - p) = 5e-7`` here (probabilities <= 0.98).
  The inputs are therefore checked to keep every token's divergence at least ``1e-5`` away from
  the threshold, where both must take the same decision (and both kinds occur).
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch

if os.environ.get("TRMATH_REQUIRE_INTEGRATIONS") == "1":
    import verl.trainer.ppo.core_algos as core_algos  # a missing verl fails the run
else:
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

import trmath  # noqa: E402
from trmath.integrations.verl import (  # noqa: E402
    VERL_LOSSES,
    make_verl_policy_loss,
    register_verl_losses,
    verl_policy_loss,
)

from verl.workers.config import ActorConfig  # noqa: E402

AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm")

#: trmath name -> (verl built-in, ActorConfig fields, aggregation modes the built-in honours).
PAIRS = {
    "trmath_dppo_binary_tv": ("dppo_tv", dict(clip_ratio=0.15, clip_ratio_low=0.15, clip_ratio_high=0.15,
                                              clip_ratio_c=2.0), AGG_MODES),
    "trmath_dppo_binary_kl": ("dppo_kl", dict(clip_ratio=0.05, clip_ratio_low=0.05, clip_ratio_high=0.05,
                                              clip_ratio_c=2.0), AGG_MODES),
    "trmath_ppo": ("vanilla", dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                                   clip_ratio_c=3.0), AGG_MODES),
    "trmath_cispo": ("cispo", dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28), AGG_MODES),
    "trmath_gspo": ("gspo", dict(clip_ratio=3e-4, clip_ratio_low=3e-4, clip_ratio_high=4e-4), AGG_MODES),
    # verl's SAPO always aggregates with seq-mean-token-mean whatever loss_agg_mode says.
    "trmath_sapo": ("sapo", dict(tau_pos=1.0, tau_neg=1.05), ("seq-mean-token-mean",)),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    return register_verl_losses()


def _config(**fields) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=4, **fields)


def _inputs(seed: int, B: int = 8, T: int = 12):
    """float64 inputs: probabilities in [0.02, 0.98], log-ratios up to +-1.6 (ratios 0.2--5),
    sequences of different lengths (one fully masked), per-sequence advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    p_old = 0.02 + 0.96 * torch.rand(B, T, generator=g, dtype=torch.float64)
    shift = 1.6 * (2 * torch.rand(B, T, generator=g, dtype=torch.float64) - 1)
    old = torch.log(p_old)
    # log_prob = old + shift, kept a probability <= 0.98
    lp = torch.minimum(old + shift, torch.full_like(old, math.log(0.98)))
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    sign = torch.where(torch.rand(B, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    adv = (sign * (0.1 + 1.9 * torch.rand(B, generator=g, dtype=torch.float64)))[:, None].expand(B, T)
    w = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    return old, lp, adv.contiguous(), mask, w


def _call(fn, old, lp, adv, mask, mode, config, w):
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                       loss_agg_mode=mode, config=config, rollout_is_weights=w)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _check_dppo_margin(name, old, lp, adv, mask, delta):
    """Every valid token's divergence is >= 1e-5 from the threshold, and both decisions occur."""
    div = "binary_tv" if name.endswith("tv") else "binary_kl"
    keep, D = trmath.dppo_mask(lp, old, adv, divergence=div, delta=delta, mask=mask, return_divergence=True)
    assert float((D - delta).abs()[mask].min()) > 1e-5
    assert bool((~keep & mask).any()) and bool((keep & mask).any())


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("weights", [False, True], ids=["no-is", "rollout-is"])
@pytest.mark.parametrize("dp", [1, 2], ids=["local", "dp2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_verl_builtin(name, weights, dp, dtype):
    builtin, fields, modes = PAIRS[name]
    ours = core_algos.get_policy_loss_fn(name)
    theirs = core_algos.get_policy_loss_fn(builtin)
    old, lp, adv, mask, w = _inputs(seed=10 * sorted(PAIRS).index(name) + dp)
    if name.startswith("trmath_dppo"):
        _check_dppo_margin(name, old, lp, adv, mask, fields["clip_ratio"])
    old, lp, adv, w = (t.to(dtype) for t in (old, lp, adv, w))
    w = w if weights else None
    if dtype == torch.float64:
        rtol_loss = rtol_grad = 1e-12
    else:
        # float32: the aggregated loss sums <= 96 terms in another order than verl (bound
        # n * 2**-24 = 6e-6); per-token gradients agree to a few roundings, except SAPO's, where
        # verl's torch.sigmoid backward y (1 - y) loses eps / (1 - y) (y <= 0.9 here: 10 eps).
        rtol_loss, rtol_grad = 6e-6, 2e-6
    for mode in modes:
        config = _config(loss_agg_mode=mode, **fields)
        if dp > 1:
            # verl's global normalisation: this micro-batch is one of dp ranks' worth of data.
            config.global_batch_info.update(
                dp_size=dp, batch_num_tokens=int(mask.sum()) * dp + 3,
                global_batch_size=int(mask.any(-1).sum()) * dp + 1, loss_scale_factor=None)
        l_ours, g_ours, m_ours = _call(ours, old, lp, adv, mask, mode, config, w)
        l_theirs, g_theirs, m_theirs = _call(theirs, old, lp, adv, mask, mode, config, w)
        msg = f"{name} vs {builtin}, {mode}"
        torch.testing.assert_close(l_ours, l_theirs, rtol=rtol_loss, atol=0, msg=msg)
        scale = float(g_theirs.abs().max())
        assert scale > 0, msg
        torch.testing.assert_close(g_ours, g_theirs, rtol=rtol_grad, atol=1e-15 * scale, msg=msg)
        assert float(g_ours[~mask].abs().max()) == 0.0
        for key in ("actor/ppo_kl", "actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
            if builtin in ("sapo", "gspo", "cispo") and key == "actor/pg_clipfrac_lower":
                continue  # verl reports a constant 0 there
            if builtin == "sapo" and key == "actor/pg_clipfrac":
                continue
            # verl forms its fractions in float32 (``mask.float()``): relative error <= 2**-23.
            # Its ppo_kl is a mean in the inputs' dtype (trmath's in float64): for float32 the
            # summation error bound n * 2**-24 * max|old - log_prob| (the terms cancel).
            rel = 1e-12 if key == "actor/ppo_kl" else 2.0**-22
            tol = 1e-15
            if key == "actor/ppo_kl" and dtype == torch.float32:
                rel, tol = 0.0, int(mask.sum()) * 2.0**-24 * float((old - lp).abs().max())
            assert m_ours[key] == pytest.approx(m_theirs[key], rel=rel, abs=tol), f"{msg}: {key}"


def test_clipping_is_exercised():
    """The parity inputs do clip / mask / truncate, so the comparisons above are not vacuous."""
    old, lp, adv, mask, _ = _inputs(seed=3)
    cfg = _config(**PAIRS["trmath_ppo"][1])
    _, _, m = _call(core_algos.get_policy_loss_fn("trmath_ppo"), old, lp, adv, mask, "token-mean", cfg, None)
    assert 0 < m["actor/pg_clipfrac"] < 1 and 0 < m["actor/pg_clipfrac_lower"] < 1
    cfg = _config(**PAIRS["trmath_dppo_binary_tv"][1])
    _, _, m = _call(core_algos.get_policy_loss_fn("trmath_dppo_binary_tv"), old, lp, adv, mask,
                    "token-mean", cfg, None)
    assert 0 < m["actor/pg_clipfrac"] < 1 and 0 < m["actor/pg_clipfrac_lower"] < 1


def test_registry_names_and_signature(registered):
    assert sorted(registered) == sorted("trmath_" + s for s in VERL_LOSSES)
    ref = inspect.signature(core_algos.get_policy_loss_fn("vanilla"))
    for name, fn in registered.items():
        assert core_algos.get_policy_loss_fn(name) is fn
        assert core_algos.POLICY_LOSS_REGISTRY[name] is fn
        sig = inspect.signature(fn)
        assert list(sig.parameters) == list(ref.parameters), name
        for p in ("loss_agg_mode", "config", "rollout_is_weights"):
            assert sig.parameters[p].default == ref.parameters[p].default, (name, p)


def test_selected_by_config():
    """The actor looks the loss up by ``config.policy_loss.loss_mode``: a trmath name resolves."""
    from verl.workers.config import PolicyLossConfig

    cfg = _config(policy_loss=PolicyLossConfig(loss_mode="trmath_dppo_binary_kl"), clip_ratio=0.05,
                  clip_ratio_low=0.05, clip_ratio_high=0.05)
    fn = core_algos.get_policy_loss_fn(cfg.policy_loss.get("loss_mode", "vanilla"))
    old, lp, adv, mask, _ = _inputs(seed=5)
    loss, _, m = _call(fn, old, lp, adv, mask, cfg.loss_agg_mode, cfg, None)
    expect, _ = trmath.policy_loss("dppo", lp, old, adv, mask, divergence="binary_kl", delta=0.05,
                                   cap=cfg.clip_ratio_c)
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=0)
    assert "actor/trmath/masked_frac" in m and "actor/trmath/mismatch_k3" in m


def test_reregister_and_options():
    again = register_verl_losses(losses=["dppo_binary_tv"], options={"dppo_binary_tv": {"cap": 1.5}})
    fn = core_algos.get_policy_loss_fn("trmath_dppo_binary_tv")
    assert fn is again["trmath_dppo_binary_tv"]
    old, lp, adv, mask, _ = _inputs(seed=9)
    cfg = _config(clip_ratio=0.15, clip_ratio_low=0.15, clip_ratio_high=0.15, clip_ratio_c=10.0)
    loss, _, _ = _call(fn, old, lp, adv, mask, "token-mean", cfg, None)
    expect, _ = trmath.policy_loss("dppo", lp, old, adv, mask, divergence="binary_tv", delta=0.15, cap=1.5)
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=0)
    register_verl_losses()  # restore the defaults for the other tests


def test_errors():
    core_algos.register_policy_loss("collide_ppo")(core_algos.get_policy_loss_fn("vanilla"))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_verl_losses(prefix="collide_", losses=["ppo"])
    finally:
        del core_algos.POLICY_LOSS_REGISTRY["collide_ppo"]
    with pytest.raises(ValueError, match="losses: unknown"):
        register_verl_losses(losses=["dppo_exact_tv"])
    with pytest.raises(ValueError, match="prefix"):
        register_verl_losses(prefix="")
    old, lp, adv, mask, _ = _inputs(seed=1)
    fn = core_algos.get_policy_loss_fn("trmath_ppo")
    with pytest.raises(ValueError, match="loss_agg_mode: unknown"):
        fn(old, lp, adv, mask, "token-median", _config())
    cfg = _config()
    cfg.global_batch_info.update(dp_size=2)
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        fn(old, lp, adv, mask, "token-mean", cfg)
    bad = lp.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"logprob: contains NaN at valid position \(0, 0\)"):
        fn(old, bad, adv, mask, "token-mean", _config())
    w = torch.ones_like(lp)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"rollout_is_weights: contains NaN at valid position \(0, 0\)"):
        fn(old, lp, adv, mask, "token-mean", _config(), w)
    w = torch.ones_like(lp)
    w[1, 0] = float("nan")  # row 1 is fully masked: padding may hold anything
    assert torch.isfinite(fn(old, lp, adv, mask, "token-mean", _config(), w)[0])
    with pytest.raises(ValueError, match="rollout_is_weights: expected shape"):
        fn(old, lp, adv, mask, "token-mean", _config(), torch.ones(3))
    with pytest.raises(TypeError, match="unexpected keyword"):
        make_verl_policy_loss("ppo", bogus=1)(old, lp, adv, mask, "token-mean", _config())
    with pytest.raises(ValueError, match="clip_ratio_c"):
        verl_policy_loss("ppo", old, lp, adv, mask, "token-mean", {"clip_ratio_c": 1.0})


def test_verl_actor_loss_selects_trmath_by_config():
    """verl's own actor loss (``verl.workers.utils.losses.ppo_loss``) with
    ``policy_loss.loss_mode="trmath_dppo_binary_tv"``: it looks the name up, passes its
    arguments and global batch info, and back-propagates trmath's loss."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import PolicyLossConfig
    from verl.workers.utils import losses

    B, P, R = 4, 2, 5
    old, lp, adv, _, _ = _inputs(seed=21, B=B, T=R)
    # verl's model output: one log-prob per token of the whole (prompt + response) sequences,
    # flattened; the response token t's log-prob sits at position P + t - 1 of its sequence.
    flat = torch.zeros(B, P + R, dtype=torch.float64)
    flat[:, P - 1:P + R - 1] = lp
    flat = flat.reshape(-1).clone().requires_grad_(True)
    data = TensorDict({
        "prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, R, dtype=torch.long),
        "attention_mask": torch.ones(B, P + R, dtype=torch.long),
        "response_mask": torch.ones(B, R, dtype=torch.long), "old_log_probs": old, "advantages": adv,
    }, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    cfg = _config(clip_ratio=0.15, clip_ratio_low=0.15, clip_ratio_high=0.15, clip_ratio_c=2.0,
                  policy_loss=PolicyLossConfig(loss_mode="trmath_dppo_binary_tv"),
                  entropy_coeff=0.0, use_kl_loss=False)
    loss, metrics = losses.ppo_loss(cfg, {"log_probs": flat}, data)
    loss.backward()
    x = lp.clone().requires_grad_(True)
    expect, m = trmath.policy_loss("dppo", x, old, adv, divergence="binary_tv", delta=0.15, cap=2.0)
    expect.backward()
    torch.testing.assert_close(loss.detach(), expect.detach(), rtol=1e-12, atol=0)
    got = flat.grad.reshape(B, P + R)[:, P - 1:P + R - 1]
    torch.testing.assert_close(got, x.grad, rtol=1e-12, atol=1e-15)
    assert "actor/trmath/masked_frac" in metrics and 0 < float(m["masked_frac"]) < 1
