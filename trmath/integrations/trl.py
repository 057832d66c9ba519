r"""TRL's GRPO trainer with a trmath objective as its loss.

:class:`TrmathGRPOTrainer` (built on first access, so that this module imports without TRL) is
TRL's ``GRPOTrainer`` whose loss is :func:`trmath.policy_loss` of the objective named by
``trmath_objective`` -- PPO-clip, CISPO, GSPO, SAPO, DPPO, ... -- instead of TRL's
``loss_type``. Everything else (generation, rewards, group advantages, logging, checkpointing)
is TRL's own.

.. code-block:: python

    from trl import GRPOConfig
    from trmath.integrations.trl import TrmathGRPOTrainer

    trainer = TrmathGRPOTrainer(
        model="Qwen/Qwen3-0.6B", reward_funcs=reward_fn, train_dataset=dataset,
        args=GRPOConfig(output_dir="out", beta=0.0),
        trmath_objective="dppo",
        trmath_config={"divergence": "binary_tv", "delta": 0.15, "cap": 5.0},
    )
    trainer.train()

Which log-probs anchor the ratio. TRL hands its loss up to three per-token log-probs of the
sampled completion: the policy being trained (recomputed with gradient), ``old_per_token_logps``
(the trainer's recomputation under the parameters that generated the batch; TRL omits it when
it equals the current policy's, i.e. one optimisation step per generation) and, with vLLM,
``sampling_per_token_logps`` (the inference engine's own). trmath uses the *rollout*
(sampling) log-probs as :math:`\mu` wherever TRL has them -- DPPO's trust region and every
mismatch diagnostic are anchored there -- and passes ``old_per_token_logps`` as trmath's
``old_logprob`` (the anchor of the PPO-family ratio and the numerator of TIS/MIS weights):

==================================  =================================  =====================
inputs available                    ``rollout_logprob``                ``old_logprob``
==================================  =================================  =====================
sampling and old                    ``sampling_per_token_logps``       ``old_per_token_logps``
old only                            ``old_per_token_logps``            --
neither (on-policy step)            the current log-probs, detached    --
==================================  =================================  =====================

Tokens the inference engine could not score (NaN in ``sampling_per_token_logps``, as TRL marks
them) take the trainer's log-prob instead -- ``old_per_token_logps``, or the current one
detached -- as TRL itself does.

Aggregation. ``trmath_config["aggregation"]`` (default ``"token-mean"``) selects one of
:data:`trmath.AGGREGATIONS`. ``token-mean`` divides by the number of completion tokens of the
whole generation batch (TRL's ``num_items_in_batch``, shared by all accumulation micro-batches
and processes: exact under gradient accumulation); the per-sequence modes normalise each
micro-batch and divide by the accumulation steps, as TRL's ``grpo`` loss does;
``seq-mean-token-sum-norm`` uses ``max_completion_length`` as its constant length.

Refused (``ValueError`` at construction, never silently ignored): ``beta != 0`` (a reference
KL term), ``off_policy_mask_threshold``, ``top_entropy_quantile < 1``, an entropy bonus, a MoE
auxiliary loss, and vLLM importance-sampling correction unless ``trmath_config`` chooses its
own ``is_correction`` (TRL's correction would otherwise be dropped).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .. import objectives as _objectives

__all__ = ["TrmathGRPOTrainer", "trl_policy_loss"]


def _anchors(per_token_logps: torch.Tensor, inputs: Mapping[str, Any]):
    old = inputs.get("old_per_token_logps")
    sampling = inputs.get("sampling_per_token_logps")
    if sampling is not None:
        # TRL marks tokens the inference engine could not score as NaN (at valid positions) and
        # uses the trainer's own log-prob there; so does trmath (a NaN anchor would be an error).
        fallback = old if old is not None else per_token_logps.detach()
        sampling = torch.where(torch.isnan(sampling), fallback.to(sampling.dtype), sampling)
        return sampling, old
    if old is not None:
        return old, None
    return per_token_logps.detach(), None


def trl_policy_loss(
    objective: str,
    per_token_logps: torch.Tensor,
    inputs: Mapping[str, Any],
    **config: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""The trmath loss of one TRL GRPO micro-batch.

    Reads TRL's inputs dictionary -- ``completion_mask`` (times ``tool_mask`` when present),
    ``advantages`` (``[B]`` or ``[B, T]``), ``old_per_token_logps`` and
    ``sampling_per_token_logps`` when present -- chooses the anchors as the module
    documentation describes and returns
    ``trmath.policy_loss(objective, per_token_logps, rollout, advantages, mask, **config)``.

    Parameters
    ----------
    objective : str
        A key of :data:`trmath.OBJECTIVES`.
    per_token_logps : torch.Tensor, shape ``[B, T]``
        Log-probs of the completion tokens under the policy being trained (with gradient).
    inputs : mapping
        TRL's batch dictionary (the argument of ``GRPOTrainer._compute_loss``).
    **config
        Options of the objective and the common options of :func:`trmath.policy_loss`
        (``aggregation=``, ``normalizer=``, ``is_correction=``, ...).

    Returns
    -------
    loss, metrics
        As :func:`trmath.policy_loss`.

    Raises
    ------
    KeyError
        If ``inputs`` lacks ``completion_mask`` or ``advantages``.
    ValueError, TypeError
        From :func:`trmath.policy_loss` (e.g. NaN log-probs at a valid position).

    Examples
    --------
    >>> import torch
    >>> from trmath.integrations.trl import trl_policy_loss
    >>> lp = torch.tensor([[-0.2, -1.0, -3.0]], requires_grad=True)
    >>> inputs = {"completion_mask": torch.tensor([[1, 1, 0]]),
    ...           "advantages": torch.tensor([1.0]),
    ...           "old_per_token_logps": torch.tensor([[-1.0, -1.0, -3.0]])}
    >>> loss, m = trl_policy_loss("dppo", lp, inputs, divergence="binary_tv", delta=0.15)
    >>> float(m["masked_frac"])     # e^-0.2 - e^-1 = 0.45 > 0.15 with A > 0: masked
    0.5
    >>> loss.backward(); lp.grad    # -A * r / n_tokens on the kept token
    tensor([[-0.0000, -0.5000,  0.0000]])
    """
    mask = inputs["completion_mask"]
    tool_mask = inputs.get("tool_mask")
    if tool_mask is not None:
        mask = mask * tool_mask
    advantages = inputs["advantages"]
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    rollout, old = _anchors(per_token_logps, inputs)
    if old is not None:
        config = {"old_logprob": old, **config}
    return _objectives.policy_loss(objective, per_token_logps, rollout, advantages, mask, **config)


def _check_config(objective: Any, config: Any) -> dict[str, Any]:
    if not isinstance(objective, str):
        raise TypeError(f"trmath_objective: expected a str, got {type(objective).__name__}")
    _objectives.get_objective(objective)
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise TypeError(f"trmath_config: expected a mapping, got {type(config).__name__}")
    config = dict(config)
    for key in ("normalizer", "old_logprob"):
        if key in config:
            raise ValueError(f"trmath_config: {key!r} is set by the trainer, not by the configuration")
    if objective == "dppo" and config.get("is_correction") == "tis":
        # Refused by dppo_loss at the first loss call; said here, at construction.
        raise ValueError("trmath_config: is_correction 'tis' does not compose with dppo, whose ratio is "
                         "already pi/mu truncated at cap; use 'cap', or is_correction 'mis'")
    agg = config.get("aggregation", "token-mean")
    if agg not in _objectives.AGGREGATIONS:
        raise ValueError(f"trmath_config: aggregation {agg!r} unknown; valid: "
                         f"{', '.join(_objectives.AGGREGATIONS)}")
    return config


def _refuse(obj: Any, config: Mapping[str, Any]) -> None:
    """Raise for trainer settings whose loss terms a trmath objective would silently drop.

    ``obj`` is a ``GRPOConfig`` or the trainer (which copies most of them as attributes)."""
    refused = []
    if (getattr(obj, "beta", 0.0) or 0.0) != 0.0:
        refused.append("beta != 0 (set beta=0.0)")
    if getattr(obj, "off_policy_mask_threshold", None) is not None:
        refused.append("off_policy_mask_threshold")
    if (getattr(obj, "top_entropy_quantile", 1.0) or 1.0) < 1.0:
        refused.append("top_entropy_quantile < 1")
    if getattr(obj, "_entropy_bonus_enabled", False) or (getattr(obj, "entropy_coef", 0.0) or 0.0) != 0.0 \
            or getattr(obj, "use_adaptive_entropy", False):
        refused.append("an entropy bonus (entropy_coef / use_adaptive_entropy)")
    if getattr(obj, "aux_loss_enabled", False):
        refused.append("a MoE auxiliary loss (router_aux_loss_coef)")
    if (getattr(obj, "use_vllm", False) and getattr(obj, "vllm_importance_sampling_correction", False)
            and "is_correction" not in config):
        refused.append("vllm_importance_sampling_correction without trmath_config['is_correction'] "
                       "(choose 'tis' or 'mis' there, or turn the correction off)")
    if refused:
        raise ValueError("TrmathGRPOTrainer: not supported with a trmath objective: " + "; ".join(refused))


def _build_trainer_class():
    from trl import GRPOTrainer

    class TrmathGRPOTrainer(GRPOTrainer):
        """TRL's ``GRPOTrainer`` whose loss is a trmath objective.

        Parameters
        ----------
        *args, **kwargs
            Those of ``trl.GRPOTrainer``.
        trmath_objective : str
            A key of :data:`trmath.OBJECTIVES` (default ``"dppo"``).
        trmath_config : mapping, optional
            Keyword arguments of :func:`trmath.policy_loss` for that objective (e.g.
            ``{"divergence": "binary_kl", "delta": 0.05, "cap": 5.0}`` or
            ``{"eps_high": 0.28}``), plus ``aggregation``.

        Every trmath metric is logged as ``trmath/<name>``, with the policy loss as
        ``trmath/loss``.
        """

        def __init__(self, *args: Any, trmath_objective: str = "dppo",
                     trmath_config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
            config = _check_config(trmath_objective, trmath_config)
            # Checked before TRL's constructor, which would already load a reference model for
            # beta != 0.
            grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
            if grpo_args is not None:
                _refuse(grpo_args, config)
            super().__init__(*args, **kwargs)
            _refuse(self, config)
            self.trmath_objective = trmath_objective
            self.trmath_config = config

        def _compute_loss(self, model, inputs):
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            extra = {k: inputs.get(k) for k in (
                "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids",
                "image_position_ids") if inputs.get(k) is not None}
            per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), **extra)

            mode = "train" if self.model.training else "eval"
            config = dict(self.trmath_config)
            agg = config.get("aggregation", "token-mean")
            accum = self.current_gradient_accumulation_steps if mode == "train" else 1
            divide = 1.0
            if agg == "token-mean" and inputs.get("num_items_in_batch") is not None:
                # The completion tokens of the generation batch, rescaled to one accumulation
                # window of this process: the summed micro-batch losses are the window's mean.
                n = inputs["num_items_in_batch"]
                n = n.clamp(min=1.0) if isinstance(n, torch.Tensor) else max(float(n), 1.0)
                n = n / self.accelerator.num_processes
                if mode == "train":
                    n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
                config["normalizer"] = n
            else:
                divide = float(accum)
            if agg == "seq-mean-token-sum-norm":
                config.setdefault("max_length", int(self.max_completion_length))

            loss, metrics = trl_policy_loss(self.trmath_objective, per_token_logps, inputs, **config)
            loss = loss / divide
            for name, value in {"loss": loss.detach() * divide, **metrics}.items():
                v = value.detach().reshape(1).to(torch.float64)
                self._metrics[mode][f"trmath/{name}"].append(self.accelerator.gather(v).nanmean().item())
            return loss

    TrmathGRPOTrainer.__module__ = __name__
    return TrmathGRPOTrainer


def __getattr__(name: str) -> Any:
    if name == "TrmathGRPOTrainer":
        try:
            cls = _build_trainer_class()
        except ImportError as err:
            raise ImportError("TrmathGRPOTrainer needs TRL (pip install trl)") from err
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
