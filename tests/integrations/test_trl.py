"""trmath inside TRL: two real GRPO optimisation steps of ``TrmathGRPOTrainer`` on CPU.

A tiny Llama and a word-level tokenizer are built in-process (no download); the trainer
generates its own completions, scores them with a reward function and takes two optimiser
steps (plain SGD). The test proves that trmath's loss is the one used:

* a spy on :func:`trmath.policy_loss` records every call -- one per optimisation step -- and the
  loss the trainer back-propagated is exactly the spy's return value;
* the parameter update of each step equals ``-lr`` times the gradient of trmath's loss,
  recomputed from scratch (TRL's log-prob function on a copy of the model with the pre-step
  parameters, the unpatched :func:`trmath.policy_loss` on the recorded inputs);
* the logged ``trmath/loss`` equals the recorded loss, and the second step uses the first
  step's (rollout) log-probs as its anchor, so the ratio is not identically 1.

Skips without TRL; ``.ci/integrations.sh`` runs it with TRL installed and
``TRMATH_REQUIRE_INTEGRATIONS=1`` (a missing TRL is then an error, not a skip).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

if os.environ.get("TRMATH_REQUIRE_INTEGRATIONS") == "1":
    import trl  # noqa: F401  (a missing TRL fails the run)
else:
    pytest.importorskip("trl")

import trmath  # noqa: E402
import trmath.objectives as objectives  # noqa: E402
from trmath.integrations.trl import trl_policy_loss  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def _model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _reward(completions, **kwargs):
    return [float(c.split().count("a")) - 0.5 * float(c.split().count("b")) for c in completions]


def _grad_of_trmath_loss(trainer, params_before, call):
    """Gradient of the unpatched trmath loss of ``call`` at ``params_before``."""
    model = copy.deepcopy(trainer.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params_before[n])
    model.train()
    inputs = call["inputs"]
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, att, inputs["completion_ids"].size(1))
    loss, _ = call["original"](call["name"], logps, *call["args"], **call["kwargs"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names], allow_unused=True)
    return loss.detach(), {n: (torch.zeros_like(params_before[n]) if g is None else g) for n, g in zip(names, grads)}


@pytest.mark.parametrize("objective,config", [
    ("dppo", {"divergence": "binary_tv", "delta": 0.05, "cap": 5.0}),
    ("ppo", {"eps_low": 0.2, "eps_high": 0.28, "aggregation": "seq-mean-token-mean"}),
])
def test_two_grpo_steps_use_trmath_loss(tmp_path, monkeypatch, objective, config):
    from datasets import Dataset
    from trl import GRPOConfig

    from trmath.integrations.trl import TrmathGRPOTrainer

    tok = _tokenizer()
    model = _model(len(tok))
    data = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h", "a c", "b d", "e g", "f h"]})
    lr = 0.5
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, max_steps=2, num_iterations=2, learning_rate=lr, optim="sgd",
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, beta=0.0,
        use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=1, save_strategy="no",
        seed=0, temperature=1.0, dataloader_num_workers=0,
    )
    trainer = TrmathGRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=data,
                                processing_class=tok, trmath_objective=objective, trmath_config=config)

    calls: list[dict] = []
    original = objectives.policy_loss

    def spy(name, logprob, rollout_logprob, advantages, mask=None, **kw):
        loss, metrics = original(name, logprob, rollout_logprob, advantages, mask, **kw)
        calls[-1].update(name=name, loss=loss.detach().clone(), original=original,
                         logprob=logprob.detach().clone(),
                         args=(rollout_logprob.detach().clone(), advantages.detach().clone(), mask.clone()),
                         kwargs={k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        return loss, metrics

    monkeypatch.setattr(objectives, "policy_loss", spy)
    inner = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):
        calls.append({"params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                      "inputs": {n: v.detach().clone() for n, v in inputs.items() if isinstance(v, torch.Tensor)}})
        out = inner(model, inputs, *a, **k)
        calls[-1]["returned"] = out.detach().clone()
        return out

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)
    trainer.train()
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    # One trmath loss per optimisation step (no gradient accumulation), each the one returned.
    assert len(calls) == 2 and all("loss" in c for c in calls)
    assert all(c["name"] == objective for c in calls)
    for c in calls:
        # No gradient accumulation: the per-micro-batch modes divide by 1.
        assert torch.equal(c["returned"], c["loss"])
        assert torch.isfinite(c["loss"])

    # The second step reuses the first step's generation: its anchor is the rollout log-probs,
    # and the policy has moved since, so the importance ratios are not all 1.
    rollout2 = calls[1]["args"][0]
    mask2 = calls[1]["args"][2].bool()
    assert torch.equal(rollout2, calls[1]["inputs"]["old_per_token_logps"])
    assert float((calls[1]["logprob"] - rollout2).abs()[mask2].max()) > 1e-4

    # Each update is -lr times the gradient of trmath's loss, recomputed from scratch.
    afters = [calls[1]["params"], final]
    moved = 0.0
    for c, after in zip(calls, afters):
        loss_re, grads = _grad_of_trmath_loss(trainer, c["params"], c)
        torch.testing.assert_close(loss_re, c["loss"], rtol=1e-6, atol=1e-7)
        for n, g in grads.items():
            delta = (c["params"][n] - after[n]) / lr
            # (before - after) is a difference of float32 parameters: the update's rounding and
            # the subtraction's are each at most half an ulp of the parameter (<= 2**-24 |p|),
            # divided by lr. rtol: the recomputed gradient itself may differ from the trainer's
            # by float32 roundings if the kernels take another path (a 1-layer net: << 1e-5).
            bound = 2.0 * 2.0**-24 * float(c["params"][n].abs().max()) / lr + 1e-12
            torch.testing.assert_close(delta, g, rtol=1e-5, atol=bound, msg=n)
            moved = max(moved, float(g.abs().max()))
    assert moved > 1e-4  # the steps did move the parameters

    # trmath's metrics were logged, and the logged loss is the recorded one.
    logged = [h["trmath/loss"] for h in trainer.state.log_history if "trmath/loss" in h]
    assert len(logged) == 2
    for value, c in zip(logged, calls):
        assert value == pytest.approx(float(c["loss"]), rel=1e-6)
    keys = {k for h in trainer.state.log_history for k in h}
    expected = "trmath/masked_frac" if objective == "dppo" else "trmath/clip_frac"
    assert expected in keys and "trmath/mismatch_k3" in keys


def test_trl_policy_loss_anchors():
    """sampling log-probs anchor the ratio where present; old_per_token_logps is then old_logprob."""
    g = torch.Generator().manual_seed(0)
    lp = torch.log(torch.rand(3, 5, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    old = (lp + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)).clamp(max=-0.01)
    samp = (old + 0.05 * torch.randn(3, 5, generator=g, dtype=torch.float64)).clamp(max=-0.01)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[2, 3:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    inputs = {"completion_mask": mask, "advantages": adv, "old_per_token_logps": old,
              "sampling_per_token_logps": samp}
    loss, _ = trl_policy_loss("ppo", lp, inputs, eps_low=0.1)
    expect, _ = trmath.policy_loss("ppo", lp, samp, adv, mask, old_logprob=old, eps_low=0.1)
    assert torch.equal(loss, expect)
    del inputs["sampling_per_token_logps"]
    loss, _ = trl_policy_loss("dppo", lp, inputs, divergence="binary_kl")
    expect, _ = trmath.policy_loss("dppo", lp, old, adv, mask, divergence="binary_kl")
    assert torch.equal(loss, expect)
    inputs["tool_mask"] = torch.ones_like(mask)
    inputs["tool_mask"][0, 1] = 0
    loss, _ = trl_policy_loss("cispo", lp, inputs)
    expect, _ = trmath.policy_loss("cispo", lp, old, adv, mask * inputs["tool_mask"])
    assert torch.equal(loss, expect)


def test_unscored_sampling_logprobs_take_the_trainers_own():
    """TRL marks tokens vLLM could not score as NaN in sampling_per_token_logps (at valid
    positions) and anchors them at the trainer's log-prob; so does trmath (it raised)."""
    lp = torch.tensor([[-0.3, -1.0, -2.0]], dtype=torch.float64)
    old = lp - 0.05
    samp = torch.tensor([[-0.4, float("nan"), -2.1]], dtype=torch.float64)
    inputs = {"completion_mask": torch.ones(1, 3, dtype=torch.long), "advantages": torch.tensor([1.0]),
              "old_per_token_logps": old, "sampling_per_token_logps": samp}
    loss, _ = trl_policy_loss("ppo", lp, inputs)
    fixed = torch.where(torch.isnan(samp), old, samp)
    assert torch.equal(loss, trmath.policy_loss("ppo", lp, fixed, inputs["advantages"],
                                                inputs["completion_mask"], old_logprob=old)[0])
    del inputs["old_per_token_logps"]
    loss, _ = trl_policy_loss("dppo", lp, inputs)
    fixed = torch.where(torch.isnan(samp), lp, samp)
    assert torch.equal(loss, trmath.policy_loss("dppo", lp, fixed, inputs["advantages"],
                                                inputs["completion_mask"])[0])


def test_refused_settings(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from trmath.integrations.trl import TrmathGRPOTrainer

    tok = _tokenizer()
    data = Dataset.from_dict({"prompt": ["a b", "c d"]})

    def make(**kw):
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=2, max_steps=1, use_cpu=True, bf16=False,
                          report_to="none", save_strategy="no", **kw)
        return args

    with pytest.raises(ValueError, match="beta"):
        TrmathGRPOTrainer(model=_model(len(tok)), reward_funcs=_reward, args=make(beta=0.1),
                          train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="entropy bonus"):
        TrmathGRPOTrainer(model=_model(len(tok)), reward_funcs=_reward, args=make(beta=0.0, entropy_coef=0.01),
                          train_dataset=data, processing_class=tok)
    with pytest.raises(ValueError, match="objective: unknown"):
        TrmathGRPOTrainer(model=_model(len(tok)), reward_funcs=_reward, args=make(beta=0.0),
                          train_dataset=data, processing_class=tok, trmath_objective="grpo")
    with pytest.raises(ValueError, match="normalizer"):
        TrmathGRPOTrainer(model=_model(len(tok)), reward_funcs=_reward, args=make(beta=0.0),
                          train_dataset=data, processing_class=tok, trmath_config={"normalizer": 3})
    with pytest.raises(ValueError, match="aggregation"):
        TrmathGRPOTrainer(model=_model(len(tok)), reward_funcs=_reward, args=make(beta=0.0),
                          train_dataset=data, processing_class=tok, trmath_config={"aggregation": "sum"})


def test_token_mean_is_exact_under_gradient_accumulation(tmp_path, monkeypatch):
    """Two accumulation micro-batches: each is normalised by the token count of the whole
    generation batch, so their losses sum to the token mean of the concatenated batch."""
    from datasets import Dataset
    from trl import GRPOConfig

    from trmath.integrations.trl import TrmathGRPOTrainer

    tok = _tokenizer()
    data = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"]})
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        num_generations=2, max_completion_length=4, max_steps=1, learning_rate=0.1, beta=0.0,
        use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no", seed=0,
    )
    trainer = TrmathGRPOTrainer(model=_model(len(tok)), reward_funcs=_reward, args=args, train_dataset=data,
                                processing_class=tok, trmath_objective="cispo", trmath_config={"eps_high": 0.28})
    calls = []
    original = objectives.policy_loss

    def spy(name, logprob, rollout_logprob, advantages, mask=None, **kw):
        out = original(name, logprob, rollout_logprob, advantages, mask, **kw)
        calls.append((logprob.detach().clone(), rollout_logprob.detach().clone(), advantages.detach().clone(),
                      mask.clone(), dict(kw), out[0].detach().clone()))
        return out

    monkeypatch.setattr(objectives, "policy_loss", spy)
    trainer.train()
    assert len(calls) == 2
    (lp1, r1, a1, m1, kw1, l1), (lp2, r2, a2, m2, kw2, l2) = calls
    n_total = int(m1.sum() + m2.sum())
    assert float(kw1["normalizer"]) == float(kw2["normalizer"]) == n_total
    whole, _ = original("cispo", torch.cat([lp1, lp2]), torch.cat([r1, r2]), torch.cat([a1, a2]),
                        torch.cat([m1, m2]), eps_high=0.28)
    # float32 sums of at most 16 terms in two different orders: a few ulps.
    torch.testing.assert_close(l1 + l2, whole, rtol=1e-6, atol=1e-7)
