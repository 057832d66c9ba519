r"""trmath objectives as verl policy losses, selected by ``actor.policy_loss.loss_mode``.

verl (``verl.trainer.ppo.core_algos``) keeps a registry of policy losses, name -> function, and
its actor calls the one named by ``actor_rollout_ref.actor.policy_loss.loss_mode`` as

.. code-block:: python

    loss, metrics = fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=...,
                       loss_agg_mode=..., config=actor_config, rollout_is_weights=...)

with ``[B, T]`` tensors, ``loss`` a 0-d tensor (already aggregated, under verl's global-batch
normalisation) and ``metrics`` a dictionary of floats. :func:`register_verl_losses` adds the
trmath objectives to that registry under ``trmath_*`` names with exactly this signature, so a
verl run selects one by configuration alone. :func:`verl_policy_loss` is the adapter itself and
needs no verl: ``config`` may be verl's ``ActorConfig``, an ``omegaconf.DictConfig`` or a plain
dictionary.

How verl's arguments map onto :func:`trmath.policy_loss`:

==========================  ==================================================================
verl                        trmath
==========================  ==================================================================
``log_prob``                ``logprob`` (carries the gradient)
``old_log_prob``            ``rollout_logprob``: the anchor of every ratio (in verl's bypass
                            mode it *is* the rollout engine's log-prob; otherwise the actor's
                            recomputation of it). DPPO's mask and ratio use it too, as verl's
                            own DPPO losses do.
``advantages``              ``advantages`` (``[B, T]``)
``response_mask``           ``mask``
``loss_agg_mode``           ``aggregation`` (same names; ``token-sum`` is ``token-mean`` with
                            normaliser 1)
``global_batch_info``       ``normalizer=`` (``batch_num_tokens`` or ``global_batch_size``),
                            times ``dp_size``; ``loss_scale_factor`` -> ``max_length``
``rollout_is_weights``      multiplies the per-token loss before aggregation, as in verl
``clip_ratio``,             ``eps_low`` / ``eps_high`` (ppo, cispo, gspo) and DPPO's
``clip_ratio_low``,         ``delta_low`` / ``delta_high`` (the divergence thresholds, as in
``clip_ratio_high``         verl's ``dppo_tv`` / ``dppo_kl``); ``*_low`` / ``*_high`` default to
                            ``clip_ratio``
``clip_ratio_c``            ppo's dual-clip constant (verl's vanilla loss always dual-clips;
                            default 3) and DPPO's importance-weight cap ``cap`` (default 20 when
                            the key is absent, as verl)
``tau_pos``, ``tau_neg``    SAPO's gate temperatures
``trmath`` (a mapping)      any other keyword of the objective (e.g. ``{"cap": 5.0}``), for
                            configurations that can carry extra keys (dictionaries,
                            ``DictConfig``); verl's ``ActorConfig`` cannot, so pass such options
                            to :func:`register_verl_losses` or :func:`make_verl_policy_loss`.
==========================  ==================================================================

The divergences that need more than the sampled token's log-prob (``topk_*``, ``exact_*``)
cannot be fed through verl's loss signature and are not registered.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from .. import objectives as _objectives

__all__ = ["VERL_LOSSES", "make_verl_policy_loss", "register_verl_losses", "verl_policy_loss"]

#: The losses :func:`register_verl_losses` registers: suffix -> (trmath objective, fixed options).
VERL_LOSSES: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "ppo": ("ppo", {}),
    "cispo": ("cispo", {}),
    "gspo": ("gspo", {}),
    "sapo": ("sapo", {}),
    "dppo_binary_tv": ("dppo", {"divergence": "binary_tv"}),
    "dppo_binary_kl": ("dppo", {"divergence": "binary_kl"}),
}

#: verl's aggregation modes -> trmath's (``token-sum`` is handled separately).
_AGG = {m: m for m in _objectives.AGGREGATIONS}

#: Which trmath metric verl's ``actor/pg_clipfrac`` reports, per objective.
_CLIPFRAC = {"ppo": "clip_frac", "dual_clip": "clip_frac", "cispo": "clip_frac", "gspo": "clip_frac",
             "dppo": "masked_frac"}


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for verl's ActorConfig, a DictConfig, a mapping or ``None``."""
    if config is None:
        return default
    getter = getattr(config, "get", None)
    if callable(getter):
        value = getter(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"config.{name}: expected a number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"config.{name}: is NaN")
    return v


def _objective_options(objective: str, config: Any) -> dict[str, Any]:
    """trmath keyword arguments taken from verl's configuration keys."""
    clip = _get(config, "clip_ratio", 0.2)
    low = _number(_get(config, "clip_ratio_low", clip), "clip_ratio_low")
    high = _number(_get(config, "clip_ratio_high", clip), "clip_ratio_high")
    if objective in ("ppo", "dual_clip"):
        c = _number(_get(config, "clip_ratio_c", 3.0), "clip_ratio_c")
        if not c > 1.0:
            raise ValueError(f"config.clip_ratio_c: the dual-clip constant must be > 1, got {c!r}")
        return {"eps_low": low, "eps_high": high, "clip_ratio_c": c}
    if objective in ("cispo", "gspo"):
        return {"eps_low": low, "eps_high": high}
    if objective == "sapo":
        return {"tau_pos": _number(_get(config, "tau_pos", 1.0), "tau_pos"),
                "tau_neg": _number(_get(config, "tau_neg", 1.05), "tau_neg")}
    if objective == "dppo":
        return {"delta_low": low, "delta_high": high,
                "cap": _number(_get(config, "clip_ratio_c", 20.0), "clip_ratio_c")}
    raise ValueError(f"objective: {objective!r} has no verl mapping; valid: "
                     f"{', '.join(sorted({o for o, _ in VERL_LOSSES.values()}))}")


def _aggregation(loss_agg_mode: Any, config: Any, horizon: int) -> tuple[str, Any, int | None, float]:
    """(trmath aggregation, normaliser, max_length, multiplier) reproducing verl's ``agg_loss``."""
    info = _get(config, "global_batch_info", {}) or {}
    dp = info.get("dp_size", 1) or 1
    dp = int(dp.item()) if isinstance(dp, torch.Tensor) else int(dp)
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0, None, float(dp)
    if loss_agg_mode not in _AGG:
        raise ValueError(f"loss_agg_mode: unknown {loss_agg_mode!r}; valid: token-sum, "
                         f"{', '.join(_objectives.AGGREGATIONS)}")
    key = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
    normalizer = info.get(key)
    if normalizer is None and dp > 1:
        raise ValueError(f"config.global_batch_info: {key} is required when dp_size > 1")
    max_length = None
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = info.get("loss_scale_factor", _get(config, "loss_scale_factor"))
        if factor is None:
            max_length = horizon
        else:
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor != int(factor):
                raise ValueError(f"config.loss_scale_factor: expected an integer, got {factor!r}")
            max_length = int(factor)
    return _AGG[loss_agg_mode], normalizer, max_length, float(dp)


def verl_policy_loss(
    objective: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, float]]:
    r"""Compute a trmath objective from verl's policy-loss arguments, returning what verl expects.

    The per-token loss is :func:`trmath.policy_loss` (``aggregation=None``) with
    :math:`\mu` = ``old_log_prob`` and :math:`\pi` = ``log_prob``; it is multiplied by
    ``rollout_is_weights`` where given and reduced as verl's ``agg_loss`` does:

    .. math::

        L = d\,\frac{\sum_{b,t} M_{bt}\,w_{bt}\,\ell_{bt}}{N}

    (and the per-sequence variants of :func:`trmath.aggregate_loss`), with :math:`d` the
    data-parallel size and :math:`N` verl's global token or sequence count from
    ``config.global_batch_info`` (the local count when absent).

    Parameters
    ----------
    objective : str
        A trmath objective with a verl mapping: ``ppo``, ``dual_clip``, ``cispo``, ``gspo``,
        ``sapo``, ``dppo``.
    old_log_prob, log_prob, advantages, response_mask : torch.Tensor, shape ``[B, T]``
        As verl passes them; ``log_prob`` carries the gradient.
    loss_agg_mode : str
        ``token-mean``, ``token-sum``, ``seq-mean-token-sum``, ``seq-mean-token-mean`` or
        ``seq-mean-token-sum-norm``.
    config : ActorConfig, DictConfig, mapping or None
        Read for ``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``,
        ``tau_pos``, ``tau_neg``, ``loss_scale_factor``, ``global_batch_info`` and an optional
        ``trmath`` mapping of extra objective options (see the module documentation).
    rollout_is_weights : torch.Tensor, shape ``[B, T]``, optional
        Rollout-correction weights computed by verl; they multiply the per-token loss.
    **options
        Further keyword arguments of the objective (e.g. ``divergence="binary_kl"``,
        ``cap=5.0``); they override those derived from ``config``, and ``config["trmath"]``
        overrides both.

    Returns
    -------
    loss : torch.Tensor
        0-d.
    metrics : dict of str to float
        verl's ``actor/pg_clipfrac`` (clipped fraction, or DPPO's masked fraction; 0 for SAPO),
        ``actor/ppo_kl`` (mean of ``old_log_prob - log_prob``), ``actor/pg_clipfrac_lower``
        (dual-clip fraction, or DPPO's truncated fraction among kept tokens, else 0), and every
        trmath metric as ``actor/trmath/<name>``.

    Raises
    ------
    ValueError
        For an unknown objective or aggregation mode, a missing global count under data
        parallelism, NaN at a valid position (from :func:`trmath.policy_loss`).
    TypeError
        For a non-numeric configuration value or an option the objective does not take.

    Examples
    --------
    >>> import torch
    >>> from trmath.integrations.verl import verl_policy_loss
    >>> old = torch.tensor([[-1.0, -0.5, -2.0]])
    >>> lp = torch.tensor([[-0.9, -0.5, -2.5]], requires_grad=True)
    >>> adv = torch.tensor([[1.0, 1.0, -1.0]])
    >>> mask = torch.tensor([[1, 1, 1]])
    >>> config = {"clip_ratio": 0.2, "clip_ratio_c": 3.0}
    >>> loss, metrics = verl_policy_loss("ppo", old, lp, adv, mask, "token-mean", config)
    >>> loss.backward(); lp.grad                 # the third token's ratio e^-0.5 < 0.8 is clipped
    tensor([[-0.3684, -0.3333,  0.0000]])
    >>> round(metrics["actor/pg_clipfrac"], 4)
    0.3333
    """
    if not isinstance(objective, str):
        raise TypeError(f"objective: expected a str, got {type(objective).__name__}")
    _objectives.get_objective(objective)  # unknown names raise, listing the valid ones
    if not isinstance(log_prob, torch.Tensor):
        raise TypeError(f"log_prob: expected a torch.Tensor, got {type(log_prob).__name__}")
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob: expected shape [B, T], got {tuple(log_prob.shape)}")
    kwargs = _objective_options(objective, config)
    kwargs.update(options)
    extra = _get(config, "trmath", None)
    if extra is not None:
        if not isinstance(extra, Mapping) and not hasattr(extra, "items"):
            raise TypeError(f"config.trmath: expected a mapping, got {type(extra).__name__}")
        kwargs.update(dict(extra.items()))
    for reserved in ("aggregation", "normalizer", "max_length"):
        if reserved in kwargs:
            raise TypeError(f"{reserved}: set by verl's loss_agg_mode and global_batch_info, "
                            "not as an objective option")
    aggregation, normalizer, max_length, scale = _aggregation(loss_agg_mode, config, log_prob.shape[-1])
    mask = response_mask
    token_loss, tm = _objectives.policy_loss(objective, log_prob, old_log_prob, advantages, mask,
                                             aggregation=None, **kwargs)
    if rollout_is_weights is not None:
        w = torch.as_tensor(rollout_is_weights)
        if tuple(w.shape) != tuple(token_loss.shape):
            raise ValueError(f"rollout_is_weights: expected shape {tuple(token_loss.shape)}, "
                             f"got {tuple(w.shape)}")
        if not w.is_floating_point():
            raise TypeError(f"rollout_is_weights: expected a floating dtype, got {w.dtype}")
        valid_m = _objectives._as_mask(response_mask, tuple(log_prob.shape), log_prob.device, "response_mask")
        _objectives._check_finite_where(w.detach(), valid_m, "rollout_is_weights")
        # token_loss is exactly 0 at excluded positions; aggregate_loss selects the valid ones,
        # so a weight at padding (whatever it holds) never reaches the loss.
        token_loss = token_loss * w.detach().to(token_loss.dtype)
    loss = _objectives.aggregate_loss(token_loss, mask, aggregation, normalizer=normalizer,
                                      max_length=max_length)
    if scale != 1.0:
        loss = loss * scale
    valid = tm["n_tokens"]
    m = _objectives._as_mask(response_mask, tuple(log_prob.shape), log_prob.device, "response_mask")
    diff = torch.where(m, (old_log_prob.detach() - log_prob.detach()).to(torch.float64),
                       torch.zeros((), dtype=torch.float64, device=log_prob.device))
    ppo_kl = diff.sum() / valid.clamp_min(1)
    lower = tm.get("dual_clip_frac")
    if objective == "dppo":
        # verl's DPPO reports the fraction of kept tokens whose ratio exceeds the cap.
        C = kwargs.get("cap", math.inf)
        with torch.no_grad():
            keep = _objectives.dppo_mask(log_prob.detach(), old_log_prob, advantages, mask=mask,
                                         divergence=kwargs.get("divergence", "binary_tv"),
                                         delta=kwargs.get("delta"), delta_low=kwargs.get("delta_low"),
                                         delta_high=kwargs.get("delta_high"), validate=False)
            ratio = torch.exp(log_prob.detach().double() - old_log_prob.detach().double())
            lower = ((ratio > C) & keep & m).sum() / valid.clamp_min(1)
    metrics: dict[str, float] = {
        "actor/pg_clipfrac": float(tm[_CLIPFRAC[objective]]) if objective in _CLIPFRAC else 0.0,
        "actor/ppo_kl": float(ppo_kl),
        "actor/pg_clipfrac_lower": float(lower) if lower is not None else 0.0,
    }
    metrics.update({f"actor/trmath/{k}": float(v) for k, v in tm.items()})
    return loss, metrics


PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def make_verl_policy_loss(objective: str, **options: Any) -> PolicyLossFn:
    """A function with verl's policy-loss signature computing the trmath ``objective``.

    Parameters
    ----------
    objective : str
        As :func:`verl_policy_loss`.
    **options
        Fixed keyword arguments of the objective (e.g. ``divergence="binary_kl"``, ``cap=5.0``).

    Returns
    -------
    callable
        ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
        config=None, rollout_is_weights=None) -> (loss, metrics)``, ready for verl's
        ``register_policy_loss(name)``.

    Examples
    --------
    >>> import torch
    >>> from trmath.integrations.verl import make_verl_policy_loss
    >>> fn = make_verl_policy_loss("dppo", divergence="binary_kl", cap=5.0)
    >>> old = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> lp = torch.log(torch.tensor([[0.9, 0.52]])).requires_grad_()
    >>> loss, m = fn(old, lp, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2),
    ...              config={"clip_ratio": 0.05})
    >>> m["actor/pg_clipfrac"]      # the first token left the KL region upwards: masked
    0.5
    """
    _objectives.get_objective(objective)
    _objective_options(objective, None)  # objectives without a verl mapping raise here
    fixed = dict(options)

    def policy_loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return verl_policy_loss(objective, old_log_prob, log_prob, advantages, response_mask,
                                loss_agg_mode, config, rollout_is_weights, **fixed)

    policy_loss_fn.__name__ = policy_loss_fn.__qualname__ = f"trmath_verl_{objective}"
    policy_loss_fn.__doc__ = f"trmath objective {objective!r} with options {fixed!r}, verl signature."
    policy_loss_fn._trmath_objective = (objective, fixed)  # type: ignore[attr-defined]
    return policy_loss_fn


def register_verl_losses(
    prefix: str = "trmath_",
    *,
    losses: Any = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, PolicyLossFn]:
    """Register trmath objectives in verl's policy-loss registry.

    After ``register_verl_losses()``, setting
    ``actor_rollout_ref.actor.policy_loss.loss_mode=trmath_dppo_binary_tv`` (or another name
    below) makes verl's actor use that trmath objective. Call it in the process that builds the
    actor (e.g. at import of a module named in ``VERL_USE_EXTERNAL_MODULES``).

    Parameters
    ----------
    prefix : str
        Prepended to the suffixes of :data:`VERL_LOSSES` (``ppo``, ``cispo``, ``gspo``,
        ``sapo``, ``dppo_binary_tv``, ``dppo_binary_kl``).
    losses : iterable of str, optional
        The suffixes to register (default: all of :data:`VERL_LOSSES`).
    options : mapping, optional
        suffix -> extra objective options, e.g. ``{"dppo_binary_tv": {"cap": 5.0}}``.

    Returns
    -------
    dict of str to callable
        The registered names and functions.

    Raises
    ------
    ImportError
        If verl is not installed.
    ValueError
        For an unknown suffix, an empty prefix, or a name already taken by a loss that is
        not trmath's (re-registering trmath's own replaces it).

    Examples
    --------
    >>> from trmath.integrations.verl import register_verl_losses
    >>> from verl.trainer.ppo.core_algos import get_policy_loss_fn    # doctest: +SKIP
    >>> names = register_verl_losses()                                 # doctest: +SKIP
    >>> sorted(names)                                                  # doctest: +SKIP
    ['trmath_cispo', 'trmath_dppo_binary_kl', 'trmath_dppo_binary_tv', 'trmath_gspo', 'trmath_ppo', 'trmath_sapo']
    >>> fn = get_policy_loss_fn("trmath_dppo_binary_tv")             # doctest: +SKIP
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix: expected a non-empty str, got {prefix!r}")
    chosen = list(VERL_LOSSES) if losses is None else list(losses)
    options = dict(options or {})
    for s in (*chosen, *options):
        if s not in VERL_LOSSES:
            raise ValueError(f"losses: unknown {s!r}; valid: {', '.join(VERL_LOSSES)}")
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as err:  # pragma: no cover - exercised where verl is absent
        raise ImportError("register_verl_losses needs verl (pip install verl)") from err
    registry = core_algos.POLICY_LOSS_REGISTRY
    out: dict[str, PolicyLossFn] = {}
    for s in chosen:
        name = prefix + s
        old = registry.get(name)
        if old is not None and not hasattr(old, "_trmath_objective"):
            raise ValueError(f"prefix: {name!r} is already registered in verl by another loss")
        objective, fixed = VERL_LOSSES[s]
        fn = make_verl_policy_loss(objective, **{**fixed, **dict(options.get(s, {}))})
        core_algos.register_policy_loss(name)(fn)
        out[name] = fn
    return out
