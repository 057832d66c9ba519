r"""A thin training adapter: from a causal LM's outputs to a trmath objective.

The adapter holds what a trainer keeps from its rollouts (:class:`Rollout`: the sampled response
tokens, their log-probs under the rollout policy, optionally the rollout engine's top-K ids and
log-probs or its full logits, advantages and the response mask) and turns the logits of the policy
being trained into a loss with :func:`compute_loss`, for any objective registered in
:mod:`trmath.objectives` (PPO-clip/GRPO, CISPO, GSPO, DPPO variants, ...) and for the TROLL KL
projection.

Scoring is temperature-consistent: log-probs are computed at the sampling temperature. The
token-level objectives and the Binary / Top-K divergences make no ``[B, T, V]`` copy of the
logits beyond what the model produced: the per-token log-probs come from
:func:`trmath.token_logprobs` (fused, reads bfloat16 logits in place), and the top-K log-probs
from a gather minus :func:`trmath.logsumexp`. Two paths hold more, by their nature: the exact
divergences read the rollout's and the policy's logits together, so keep the rollout logits in
the policy's dtype (a float32 copy of bfloat16 policy logits is made otherwise, for the common
dtype); and ``troll`` holds the projected distribution (``[B, T, V]``, float32 for 16/32-bit
logits) and, for 16-bit policy logits, a float32 copy of them for its KL term.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["Rollout", "group_advantages", "response_logprobs", "compute_loss", "compute_loss_from_hidden",
           "hidden_logprobs", "DemoAlgorithm",
           "DEMO_ALGORITHMS", "demo_algorithm"]


def group_advantages(rewards: Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6) -> Tensor:
    r"""Group-relative advantages (GRPO): each reward minus its group's mean, optionally over the
    group's standard deviation.

    .. math::

        A_{g,i} = \frac{R_{g,i} - \bar R_g}{s_g + \epsilon}, \qquad
        s_g = \sqrt{\tfrac{1}{G-1} \textstyle\sum_i (R_{g,i} - \bar R_g)^2}

    A group whose rewards are all equal has zero advantages (never ``0/0``).

    Parameters
    ----------
    rewards : torch.Tensor, shape ``[n_groups * group_size]``
        Consecutive ``group_size`` entries form one group (the responses to one prompt).
    group_size : int
        ``G >= 1``.
    normalize_std : bool, optional
        Divide by the group's standard deviation (default true).
    eps : float, optional
        Added to the standard deviation.

    Returns
    -------
    torch.Tensor, shape ``[n_groups * group_size]``, float32 (float64 for float64 rewards).

    Examples
    --------
    >>> import torch
    >>> group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards: expected a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape [n_groups * group_size], got {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: expected an integer >= 1, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"rewards: {rewards.numel()} entries are not a multiple of group_size={group_size}")
    if torch.isnan(rewards).any():
        raise ValueError(f"rewards: contains NaN at index {int(torch.isnan(rewards).nonzero()[0])}")
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    g = r.reshape(-1, group_size)
    centred = g - g.mean(-1, keepdim=True)
    if normalize_std and group_size > 1:
        std = centred.pow(2).sum(-1, keepdim=True).div(group_size - 1).sqrt()
        # A zero-variance group has centred == 0 exactly: 0 / (0 + eps) = 0.
        centred = centred / (std + eps)
    return centred.reshape(-1)


def response_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Log-probs ``[B, T]`` of the response tokens under logits ``[B, T, V]`` at ``temperature``.

    Fused and differentiable (:func:`trmath.token_logprobs`); bfloat16 logits are read in place.

    Examples
    --------
    >>> import torch
    >>> logits = torch.zeros(1, 2, 4)
    >>> response_logprobs(logits, torch.tensor([[0, 3]]))
    tensor([[-1.3863, -1.3863]])
    """
    import trmath

    return trmath.token_logprobs(logits, tokens, temperature=temperature)


def _padding_tokens_zero(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """``tokens`` with 0 at the padding positions of ``mask`` (which may hold any label)."""
    if mask is None or not isinstance(tokens, Tensor) or not isinstance(mask, Tensor):
        return tokens
    if tuple(mask.shape) != tuple(tokens.shape) or mask.device != tokens.device:
        return tokens  # the objective reports the mismatch, naming mask
    return torch.where(mask.bool(), tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


@dataclass
class Rollout:
    """What a trainer keeps from a rollout batch, ``B`` responses of ``T`` tokens.

    Attributes
    ----------
    tokens : torch.Tensor ``[B, T]`` (int64)
        The sampled response tokens. At padding positions (``mask`` False) they may hold
        anything (e.g. the label ``-100``): the record keeps 0 there, so every gather stays in
        range, and the objectives select those positions out.
    logprobs : torch.Tensor ``[B, T]``
        Their log-probs under the rollout (behaviour) policy, at the sampling temperature.
    advantages : torch.Tensor ``[B, T]`` or ``[B]``
    mask : torch.Tensor ``[B, T]`` (bool)
        True for response tokens that count (False for padding).
    topk_ids, topk_logprobs : torch.Tensor ``[B, T, K]`` or None
        The rollout engine's top-K token ids (the sampled token included) and their rollout
        log-probs, for the top-K divergences.
    logits : torch.Tensor ``[B, T, V]`` or None
        The rollout policy's full logits (before temperature scaling), for the exact divergences
        and the projections.
    """

    tokens: Tensor
    logprobs: Tensor
    advantages: Tensor
    mask: Tensor
    topk_ids: Tensor | None = None
    topk_logprobs: Tensor | None = None
    logits: Tensor | None = None

    def __post_init__(self):
        self.tokens = _padding_tokens_zero(self.tokens, self.mask)

    @classmethod
    def from_logits(cls, logits: Tensor, tokens: Tensor, advantages: Tensor, mask: Tensor | None = None, *,
                    top_k: int = 0, keep_logits: bool = False, temperature: float = 1.0) -> "Rollout":
        """Build a rollout record from the rollout policy's logits ``[B, T, V]`` (no gradient)."""
        import trmath

        with torch.no_grad():
            logits = logits.detach()
            if mask is None:
                mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
            tokens = _padding_tokens_zero(tokens, mask)
            lp = trmath.token_logprobs(logits, tokens, temperature=temperature)
            ids = tlp = None
            if top_k:
                ids, tlp, _ = trmath.topk_logprobs(logits, logits, top_k, tokens, temperature=temperature)
        return cls(tokens, lp, advantages, mask.bool(), ids, tlp, logits if keep_logits else None)

    def select(self, idx: Tensor) -> "Rollout":
        """The rows ``idx`` of every field (a minibatch)."""
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(self, tokens=self.tokens[idx], logprobs=self.logprobs[idx], advantages=self.advantages[idx],
                       mask=self.mask[idx], topk_ids=pick(self.topk_ids), topk_logprobs=pick(self.topk_logprobs),
                       logits=pick(self.logits))


def compute_loss(objective: str, logits: Tensor, rollout: Rollout, *, temperature: float = 1.0,
                 **config: Any) -> tuple[Tensor, dict[str, Any]]:
    """The loss and metrics of ``objective`` for the trained policy's logits ``[B, T, V]``.

    Parameters
    ----------
    objective : str
        A name registered in :data:`trmath.OBJECTIVES` (``"ppo"``, ``"cispo"``, ``"gspo"``,
        ``"dppo"``, ``"troll"`` -- the KL projection, :func:`trmath.troll_loss` --, ...).
    logits : torch.Tensor ``[B, T, V]``
        The trained policy's logits for the response positions (any float dtype; bfloat16 is read
        in place), *before* temperature scaling.
    rollout : Rollout
        The rollout record (its log-probs were taken at the same ``temperature``).
    temperature : float, optional
        The sampling temperature.
    **config
        The objective's options (``eps_high=``, ``divergence=``, ``delta=``, ``aggregation=``, ...).

    Returns
    -------
    loss : torch.Tensor (scalar), metrics : dict

    Notes
    -----
    The extra inputs an objective needs (``ObjectiveInfo.required_inputs``) are derived here: for
    ``divergence="topk_*"`` the trained policy's log-probs of the rollout's top-K ids (a gather,
    no ``[B, T, V]`` copy; empty slots, whose rollout log-prob is ``-inf``, stay empty), for
    ``"exact_*"`` and ``"troll"`` both policies' full logits.

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> mu_logits = torch.randn(2, 3, 50)
    >>> tokens = torch.randint(0, 50, (2, 3))
    >>> ro = Rollout.from_logits(mu_logits, tokens, advantages=torch.tensor([1.0, -1.0]), top_k=4)
    >>> logits = (mu_logits + 0.3 * torch.randn(2, 3, 50)).requires_grad_()
    >>> loss, m = compute_loss("dppo", logits, ro, divergence="topk_kl", delta=0.05)
    >>> loss.backward()
    >>> logits.grad.shape
    torch.Size([2, 3, 50])
    """
    import trmath

    needs = trmath.get_objective(objective).required_inputs(**config)
    lp = trmath.token_logprobs(logits, rollout.tokens, temperature=temperature)
    kw = dict(config)
    if "topk_logprobs" in needs:
        if rollout.topk_ids is None:
            raise ValueError(f"rollout: {objective!r} with these options needs the rollout's top-K (top_k > 0)")
        cur = trmath.gather_logprobs(logits, rollout.topk_ids, temperature=temperature)
        empty = torch.isneginf(rollout.topk_logprobs)
        cur = torch.where(empty, torch.full_like(cur, -torch.inf), cur)
        kw.setdefault("topk_logprobs", cur)
        kw.setdefault("rollout_topk_logprobs", rollout.topk_logprobs)
    if "rollout_logits" in needs:
        if rollout.logits is None:
            raise ValueError(f"rollout: {objective!r} with these options needs the rollout's full logits "
                             "(keep_logits=True)")
        kw.setdefault("logits", logits)
        kw.setdefault("rollout_logits", rollout.logits)
        kw.setdefault("temperature", temperature)
    if "tokens" in needs:
        kw.setdefault("tokens", rollout.tokens)
    return trmath.policy_loss(objective, lp, rollout.logprobs, rollout.advantages, rollout.mask, **kw)


def _chunk_scores(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor, ids: Tensor | None,
                  temperature: float, start: int = 0, lead: tuple = ()) -> tuple[Tensor, Tensor | None]:
    """Token log-probs (and top-K log-probs) of one chunk of positions, from its hidden states.
    ``start``: the chunk's first flat position in ``lead`` (the [..., T] shape), for errors."""
    import trmath

    logits = torch.nn.functional.linear(hidden, weight, bias)
    # The logits are checked here, so that an error names the position and the inputs it came
    # from (the kernels' own message would name a row of the chunk's logits).
    lp = trmath.token_logprobs(logits, tokens, temperature=temperature, validate=False)
    bad = torch.isnan(lp.detach())
    if bool(bad.any()):
        i = start + int(torch.nonzero(bad)[0])
        pos = []
        for d in reversed(lead or (i + 1,)):
            pos.append(i % d)
            i //= d
        pos = tuple(reversed(pos))
        raise ValueError(f"hidden, weight, bias: the logits at position {pos} contain NaN or +inf")
    tk = trmath.gather_logprobs(logits, ids, temperature=temperature) if ids is not None else None
    return lp, tk


def hidden_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Tensor | None = None,
                    topk_ids: Tensor | None = None, temperature: float = 1.0,
                    chunk_tokens: int = 1024) -> tuple[Tensor, Tensor | None]:
    r"""Token log-probs from hidden states and the LM head, never holding the full logits.

    .. math::

        \log \pi(a_t) = \bigl(z_{t,a_t} - \operatorname{lse}(z_t)\bigr)/T\ \text{(at temperature } T),
        \qquad z_t = W h_t + b

    The positions are processed in chunks of ``chunk_tokens``; each chunk's logits ``[chunk, V]``
    are recomputed in the backward pass (activation checkpointing), so the peak memory of the
    logits is one chunk, not ``[B, T, V]``. Gradients flow to ``hidden``, ``weight`` and ``bias``.

    Parameters
    ----------
    hidden : torch.Tensor ``[B, T, H]``
        The final hidden states of the response positions.
    weight : torch.Tensor ``[V, H]``
        The LM head (``model.lm_head.weight``); ``bias`` ``[V]`` optional.
    tokens : torch.Tensor ``[B, T]`` (int64)
    topk_ids : torch.Tensor ``[B, T, K]`` or None
        Token ids whose log-probs are also returned (e.g. the rollout's top-K).
    temperature : float, optional
    chunk_tokens : int, optional
        Positions per chunk (memory ``chunk_tokens * V`` logits at a time).

    Returns
    -------
    logprobs : torch.Tensor ``[B, T]``, topk_logprobs : torch.Tensor ``[B, T, K]`` or None

    Examples
    --------
    >>> import torch
    >>> h, W = torch.randn(2, 5, 8), torch.randn(100, 8)
    >>> tok = torch.randint(0, 100, (2, 5))
    >>> lp, _ = hidden_logprobs(h, W, tok, chunk_tokens=3)
    >>> ref = torch.log_softmax(h @ W.T, -1).gather(-1, tok[..., None])[..., 0]
    >>> bool(torch.allclose(lp, ref, atol=1e-5))
    True
    """
    from torch.utils.checkpoint import checkpoint

    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected shape [..., T, H], got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if tuple(tokens.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"tokens: expected shape {tuple(hidden.shape[:-1])}, got {tuple(tokens.shape)}")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected an integer >= 1, got {chunk_tokens!r}")
    lead = tuple(hidden.shape[:-1])
    h = hidden.reshape(-1, hidden.shape[-1])
    t = tokens.reshape(-1)
    ids = None
    if topk_ids is not None:
        if tuple(topk_ids.shape[:-1]) != lead:
            raise ValueError(f"topk_ids: expected shape [{', '.join(map(str, lead))}, K], got {tuple(topk_ids.shape)}")
        ids = topk_ids.reshape(-1, topk_ids.shape[-1])
    lps, tks = [], []
    for s in range(0, h.shape[0], chunk_tokens):
        sl = slice(s, s + chunk_tokens)
        ci = ids[sl] if ids is not None else None
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            lp, tk = checkpoint(_chunk_scores, h[sl], weight, bias, t[sl], ci, temperature, s, lead,
                                use_reentrant=False)
        else:
            lp, tk = _chunk_scores(h[sl], weight, bias, t[sl], ci, temperature, s, lead)
        lps.append(lp)
        tks.append(tk)
    lp = torch.cat(lps).reshape(lead)
    tk = torch.cat(tks).reshape(*lead, ids.shape[-1]) if ids is not None else None
    return lp, tk


def compute_loss_from_hidden(objective: str, hidden: Tensor, weight: Tensor, rollout: Rollout, *,
                             bias: Tensor | None = None, temperature: float = 1.0, chunk_tokens: int = 1024,
                             **config: Any) -> tuple[Tensor, dict[str, Any]]:
    """As :func:`compute_loss`, from the final hidden states and the LM head instead of the logits.

    The full logits ``[B, T, V]`` are never held (see :func:`hidden_logprobs`): only objectives
    that need per-token and top-K log-probs can be computed this way (every registered one except
    ``exact_*`` divergences and ``"troll"``, which need both policies' full logits).

    Examples
    --------
    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> h, W = torch.randn(2, 3, 8), torch.randn(50, 8)
    >>> tokens = torch.randint(0, 50, (2, 3))
    >>> ro = Rollout.from_logits(h @ W.T, tokens, advantages=torch.tensor([1.0, -1.0]), top_k=4)
    >>> W = W.requires_grad_()
    >>> loss, m = compute_loss_from_hidden("dppo", h, W, ro, divergence="topk_kl", delta=0.05, chunk_tokens=2)
    >>> loss.backward()
    >>> W.grad.shape
    torch.Size([50, 8])
    """
    import trmath

    needs = trmath.get_objective(objective).required_inputs(**config)
    if "rollout_logits" in needs:
        raise ValueError(f"objective: {objective!r} with these options needs full logits; use compute_loss")
    want_topk = "topk_logprobs" in needs
    if want_topk and rollout.topk_ids is None:
        raise ValueError(f"rollout: {objective!r} with these options needs the rollout's top-K (top_k > 0)")
    lp, cur = hidden_logprobs(hidden, weight, rollout.tokens, bias=bias, temperature=temperature,
                              topk_ids=rollout.topk_ids if want_topk else None, chunk_tokens=chunk_tokens)
    kw = dict(config)
    if want_topk:
        empty = torch.isneginf(rollout.topk_logprobs)
        cur = torch.where(empty, torch.full_like(cur, -torch.inf), cur)
        kw.setdefault("topk_logprobs", cur)
        kw.setdefault("rollout_topk_logprobs", rollout.topk_logprobs)
    return trmath.policy_loss(objective, lp, rollout.logprobs, rollout.advantages, rollout.mask, **kw)


@dataclass(frozen=True)
class DemoAlgorithm:
    """An algorithm of the demo: an objective with its settings."""

    name: str
    objective: str
    config: dict
    needs_topk: bool = False
    needs_full_logits: bool = False

    def loss(self, logits: Tensor, rollout: Rollout, temperature: float = 1.0) -> tuple[Tensor, dict[str, Any]]:
        return compute_loss(self.objective, logits, rollout, temperature=temperature, **self.config)


#: The demo's algorithms (settings from the papers: clip 0.2; DPPO delta_TV = 0.15, delta_KL = 0.05,
#: K = 20; the KL projection's radius 0.05).
DEMO_ALGORITHMS = {
    "grpo": DemoAlgorithm("grpo", "ppo", {"eps_low": 0.2, "eps_high": 0.2}),
    "dppo_binary_tv": DemoAlgorithm("dppo_binary_tv", "dppo", {"divergence": "binary_tv", "delta": 0.15}),
    "dppo_topk_kl": DemoAlgorithm("dppo_topk_kl", "dppo", {"divergence": "topk_kl", "delta": 0.05},
                                  needs_topk=True),
    "dppo_exact_kl": DemoAlgorithm("dppo_exact_kl", "dppo", {"divergence": "exact_kl", "delta": 0.05},
                                   needs_full_logits=True),
    "troll": DemoAlgorithm("troll", "troll", {"epsilon": 0.05}, needs_full_logits=True),
}


def demo_algorithm(name: str) -> DemoAlgorithm:
    """The demo algorithm ``name`` (a key of :data:`DEMO_ALGORITHMS`)."""
    try:
        return DEMO_ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm: unknown {name!r}; valid: {', '.join(DEMO_ALGORITHMS)}") from None
