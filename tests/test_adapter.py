"""The training adapter (trmath.adapter) and the end-to-end demo (trmath.demo)."""

from __future__ import annotations

import json

import pytest
import torch

import trmath
from trmath import adapter


# ---------------------------------------------------------------------------------------------
# group advantages
# ---------------------------------------------------------------------------------------------
def test_group_advantages_matches_definition():
    g = torch.Generator().manual_seed(1)
    r = torch.rand(24, generator=g, dtype=torch.float64)
    a = adapter.group_advantages(r, 4, eps=0.0)
    for k in range(6):
        grp = r[4 * k : 4 * k + 4]
        ref = (grp - grp.mean()) / grp.std(unbiased=True)
        torch.testing.assert_close(a[4 * k : 4 * k + 4], ref, rtol=1e-12, atol=0)
    # without std normalisation: centred only, and each group sums to zero
    c = adapter.group_advantages(r, 4, normalize_std=False)
    torch.testing.assert_close(c.reshape(6, 4).sum(-1), torch.zeros(6, dtype=torch.float64), atol=1e-15, rtol=0)


def test_group_advantages_zero_variance_group_is_zero_not_nan():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5])
    a = adapter.group_advantages(r, 3)
    assert torch.isfinite(a).all()
    assert torch.equal(a[:3], torch.zeros(3))
    assert a[3] < 0 < a[4]


@pytest.mark.parametrize(
    "bad, kw, match",
    [
        (torch.ones(5), {"group_size": 2}, "multiple of group_size"),
        (torch.ones(2, 2), {"group_size": 2}, "rewards: expected shape"),
        (torch.tensor([1.0, float("nan")]), {"group_size": 2}, "rewards: contains NaN"),
        (torch.ones(4), {"group_size": 0}, "group_size"),
    ],
)
def test_group_advantages_bad_input(bad, kw, match):
    with pytest.raises(ValueError, match=match):
        adapter.group_advantages(bad, **kw)


# ---------------------------------------------------------------------------------------------
# compute_loss: the adapter only derives inputs; the loss must be the objective's own
# ---------------------------------------------------------------------------------------------
def _rollout_and_logits(B=3, T=4, V=64, top_k=5, keep=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    tokens = torch.multinomial(torch.softmax(mu.double(), -1).reshape(-1, V), 1, generator=g).reshape(B, T)
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(torch.float32)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    ro = adapter.Rollout.from_logits(mu, tokens, adv, mask, top_k=top_k, keep_logits=keep)
    logits = (mu + 0.4 * torch.randn(B, T, V, generator=g, dtype=dtype)).requires_grad_()
    return ro, logits


@pytest.mark.parametrize("config", [
    {"objective": "ppo", "eps_high": 0.28},
    {"objective": "dppo", "divergence": "binary_tv", "delta": 0.15},
    {"objective": "dppo", "divergence": "exact_kl", "delta": 0.05},
    {"objective": "cispo"},
])
def test_compute_loss_equals_the_registered_objective(config):
    cfg = dict(config)
    name = cfg.pop("objective")
    ro, logits = _rollout_and_logits()
    loss, m = adapter.compute_loss(name, logits, ro, **cfg)
    (g1,) = torch.autograd.grad(loss, logits)

    logits2 = logits.detach().clone().requires_grad_()
    lp = trmath.token_logprobs(logits2, ro.tokens)
    extra = {}
    if cfg.get("divergence", "").startswith("exact_"):
        extra = {"logits": logits2, "rollout_logits": ro.logits}
    loss2, m2 = trmath.policy_loss(name, lp, ro.logprobs, ro.advantages, ro.mask, **cfg, **extra)
    (g2,) = torch.autograd.grad(loss2, logits2)
    assert float(loss.detach()) == float(loss2.detach())
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_compute_loss_troll_is_the_projection_loss():
    ro, logits = _rollout_and_logits()
    loss, m = adapter.compute_loss("troll", logits, ro, epsilon=0.05, alpha=0.5)
    (g1,) = torch.autograd.grad(loss, logits)
    logits2 = logits.detach().clone().requires_grad_()
    lp = trmath.token_logprobs(logits2, ro.tokens)
    loss2, _ = trmath.troll_loss(lp, ro.logprobs, ro.advantages, ro.mask, logits=logits2,
                                 rollout_logits=ro.logits, tokens=ro.tokens, epsilon=0.05, alpha=0.5)
    (g2,) = torch.autograd.grad(loss2, logits2)
    assert float(loss.detach()) == float(loss2.detach())
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    assert torch.isfinite(g1).all() and g1.abs().sum() > 0


def test_compute_loss_topk_uses_the_rollout_slots_and_keeps_empty_slots_empty():
    ro, logits = _rollout_and_logits(top_k=3)
    assert ro.topk_ids.shape[-1] == 4  # K + 1 slots: top-3 of mu plus the sampled token
    empty = torch.isneginf(ro.topk_logprobs)
    # The sampled token is always among the kept ids.
    assert (ro.topk_ids == ro.tokens[..., None]).any(-1).all()
    loss, m = adapter.compute_loss("dppo", logits, ro, divergence="topk_kl", delta=0.05)
    # Reference: the top-K KL from the trained policy's log-probs at the same ids, empty slots -inf.
    cur = trmath.gather_logprobs(logits.detach(), ro.topk_ids)
    cur = torch.where(empty, torch.full_like(cur, -torch.inf), cur)
    D = trmath.topk_kl(ro.topk_logprobs, cur)
    ref_mean = D[ro.mask].double().mean()
    torch.testing.assert_close(m["divergence_mean"].double(), ref_mean, rtol=1e-6, atol=0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_compute_loss_needs_what_the_objective_needs():
    ro, logits = _rollout_and_logits(top_k=0, keep=False)
    with pytest.raises(ValueError, match="top-K"):
        adapter.compute_loss("dppo", logits, ro, divergence="topk_tv", delta=0.1)
    with pytest.raises(ValueError, match="full logits"):
        adapter.compute_loss("dppo", logits, ro, divergence="exact_tv", delta=0.1)
    with pytest.raises(ValueError, match="unknown"):
        adapter.demo_algorithm("nope")


def test_rollout_select_and_temperature_consistency():
    ro, logits = _rollout_and_logits()
    sub = ro.select(torch.tensor([2, 0]))
    assert torch.equal(sub.tokens, ro.tokens[[2, 0]])
    assert torch.equal(sub.topk_ids, ro.topk_ids[[2, 0]])
    # Log-probs at temperature T are those of softmax(z / T).
    T = 0.7
    ro_t = adapter.Rollout.from_logits(ro.logits, ro.tokens, ro.advantages, temperature=T)
    ref = torch.log_softmax(ro.logits.double() / T, -1).gather(-1, ro.tokens[..., None])[..., 0]
    torch.testing.assert_close(ro_t.logprobs.double(), ref, rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the demo (a smoke run on a smaller model; the full run is `trmath demo`)
# ---------------------------------------------------------------------------------------------
def test_demo_smoke_run_writes_results(tmp_path):
    pytest.importorskip("transformers")
    from trmath import demo

    cfg = demo.DemoConfig(steps=2, algorithms=("grpo", "dppo_topk_kl"), out=str(tmp_path), sft_steps=2,
                          prompts_per_step=4, group_size=2, minibatches=2, epochs=1, vocab=4096, quiet=True)
    results = demo.run(cfg)
    assert [r.algorithm for r in results] == ["grpo", "dppo_topk_kl"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["steps"]) == 4
    for s in data["summary"]:
        assert 0.0 <= s["final_reward"] <= 1.0
        assert s["mean_kl"] >= 0.0 and 0.0 <= s["mean_tv"] <= 1.0
    assert (tmp_path / "results.csv").read_text().count("\n") == 5
    table = demo.format_table(results)
    assert "dppo_topk_kl" in table


def test_demo_rejects_unknown_algorithm(tmp_path):
    from trmath import demo

    with pytest.raises(ValueError, match="algorithms: unknown"):
        demo.run(demo.DemoConfig(algorithms=("nope",), out=str(tmp_path)))


def test_demo_cli_reports_bad_arguments_as_usage_errors(capsys):
    """--steps 0 and an unknown algorithm: argparse's usage error (exit status 2), no traceback."""
    from trmath.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--steps", "0", "--algorithms", "grpo,nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--steps: expected an integer >= 1, got 0" in err and "--algorithms: unknown 'nope'" in err


def test_demo_scores_only_the_last_positions_whatever_the_forward_takes():
    """last_logits passes logits_to_keep / num_logits_to_keep only to a forward that names it,
    and otherwise slices the full logits: the same [B, n, V] either way (a forward that swallowed
    an unknown keyword in **kwargs returned every position, misaligned with the responses)."""
    from trmath import demo

    g = torch.Generator().manual_seed(3)
    table = torch.randn(20, 7, generator=g)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    def full(seq):
        return table[seq]  # [B, L, V]: a position's logits depend on its token only

    class New:
        def forward(self, seq, logits_to_keep=0):
            return Out(full(seq)[:, -logits_to_keep:] if logits_to_keep else full(seq))

        __call__ = forward

    class Old:
        def forward(self, seq, num_logits_to_keep=0, **kwargs):
            return Out(full(seq)[:, -num_logits_to_keep:] if num_logits_to_keep else full(seq))

        __call__ = forward

    class Plain:
        def forward(self, seq, **kwargs):
            return Out(full(seq))

        __call__ = forward

    seq = torch.randint(0, 20, (3, 6), generator=g)
    ref = full(seq)[:, -4:]
    for m in (New(), Old(), Plain()):
        assert torch.equal(demo.last_logits(m, seq, 4), ref)
    prompts, responses = seq[:, :3], seq[:, 3:]
    assert torch.equal(demo.response_logits(Plain(), prompts, responses), full(seq)[:, 2:5])


def test_rollout_padding_tokens_may_hold_any_label():
    """Padding positions of the tokens may hold anything (Hugging Face's -100): the rollout keeps
    0 there and the loss equals that of the same batch with valid ids at the padding."""
    g = torch.Generator().manual_seed(5)
    mu = torch.randn(2, 4, 30, generator=g)
    tokens = torch.randint(0, 30, (2, 4), generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    A = torch.tensor([1.0, -0.5])
    logits = mu + 0.2 * torch.randn(2, 4, 30, generator=g)
    ref_ro = adapter.Rollout.from_logits(mu, tokens, A, mask, top_k=3)
    ref, _ = adapter.compute_loss("dppo", logits, ref_ro, divergence="topk_kl", delta=0.05)
    padded = torch.where(mask, tokens, torch.full_like(tokens, -100))
    ro = adapter.Rollout.from_logits(mu, padded, A, mask, top_k=3)
    assert bool((ro.tokens[~mask] == 0).all()) and torch.equal(ro.tokens[mask], tokens[mask])
    got, _ = adapter.compute_loss("dppo", logits, ro, divergence="topk_kl", delta=0.05)
    assert torch.equal(got, ref)
    direct = adapter.Rollout(padded, ref_ro.logprobs, A, mask)  # built by hand: the same
    assert bool((direct.tokens[~mask] == 0).all())
    assert torch.equal(adapter.compute_loss("ppo", logits, direct)[0],
                       adapter.compute_loss("ppo", logits, ref_ro)[0])


# ---------------------------------------------------------------------------------------------
# from hidden states and the LM head: the same loss, without holding [B, T, V] logits
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    {"objective": "ppo"},
    {"objective": "dppo", "divergence": "topk_kl", "delta": 0.05},
    {"objective": "dppo", "divergence": "binary_kl", "delta": 0.05, "cap": 5.0},
])
def test_hidden_path_equals_logits_path(config):
    cfg = dict(config)
    name = cfg.pop("objective")
    g = torch.Generator().manual_seed(4)
    B, T, H, V = 3, 5, 8, 300
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    W = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    mu_logits = (h @ W.T + b) + 0.2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.multinomial(torch.softmax(mu_logits, -1).reshape(-1, V), 1, generator=g).reshape(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3:] = False
    ro = adapter.Rollout.from_logits(mu_logits, tokens, torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64), mask,
                                     top_k=6, temperature=0.9)
    Wa, ha, ba = (x.clone().requires_grad_() for x in (W, h, b))
    la, ma = adapter.compute_loss(name, torch.nn.functional.linear(ha, Wa, ba), ro, temperature=0.9, **cfg)
    la.backward()
    Wb, hb, bb = (x.clone().requires_grad_() for x in (W, h, b))
    lb, mb = adapter.compute_loss_from_hidden(name, hb, Wb, ro, bias=bb, temperature=0.9, chunk_tokens=4, **cfg)
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=0)
    for x, y in ((Wb, Wa), (hb, ha), (bb, ba)):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-14)


def test_hidden_path_never_saves_full_logits():
    """Every tensor autograd saves is at most one chunk of logits, not [B, T, V]."""
    g = torch.Generator().manual_seed(6)
    B, T, H, V, chunk = 4, 16, 8, 2000, 8
    h = torch.randn(B, T, H, generator=g, requires_grad=True)
    W = torch.randn(V, H, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = adapter.hidden_logprobs(h, W, tokens, chunk_tokens=chunk)
    assert max(sizes) < B * T * V // 4
    assert max(sizes) <= max(chunk * V, W.numel())
    lp.sum().backward()
    ref = torch.log_softmax(h.detach() @ W.detach().T, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(lp.detach(), ref, rtol=1e-5, atol=1e-5)


def test_hidden_path_refuses_full_logit_objectives():
    h, W = torch.randn(1, 2, 4), torch.randn(10, 4)
    ro = adapter.Rollout.from_logits(h @ W.T, torch.tensor([[1, 2]]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="needs full logits"):
        adapter.compute_loss_from_hidden("dppo", h, W, ro, divergence="exact_tv", delta=0.1)
    with pytest.raises(ValueError, match="weight: expected shape"):
        adapter.hidden_logprobs(h, torch.randn(10, 5), torch.tensor([[1, 2]]))


def test_hidden_logprobs_names_the_position_of_bad_logits():
    """NaN in the hidden states (or +inf through the head): the error names the inputs and the
    [B, T] position, whatever the chunking and with or without a graph (it named a row of the
    chunk's logits)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 5, 8, generator=g)
    W = torch.randn(100, 8, generator=g)
    tok = torch.randint(0, 100, (2, 5), generator=g)
    h[1, 3, 2] = float("nan")
    for chunk in (1, 3, 1024):
        for grad in (False, True):
            with pytest.raises(ValueError, match=r"^hidden, weight, bias: the logits at position \(1, 3\)"):
                adapter.hidden_logprobs(h.clone().requires_grad_(grad), W, tok, chunk_tokens=chunk)
    b = torch.zeros(100)
    b[7] = float("inf")
    with pytest.raises(ValueError, match=r"position \(0, 0\) contain NaN or \+inf"):
        adapter.hidden_logprobs(h[:, :2], W, tok[:, :2], bias=b)
