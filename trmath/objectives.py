r"""Policy-loss objectives: the PPO family and DPPO, with honest metrics.

Every objective takes plain tensors -- the per-token log-probabilities of the policy being
trained ``logprob`` ``[B, T]`` (with gradient), of the rollout (behaviour) policy
``rollout_logprob`` ``[B, T]``, the advantages ``[B, T]`` or ``[B]`` and a response mask
``[B, T]`` -- and returns ``(loss, metrics)``: the aggregated scalar loss (or, with
``aggregation=None``, the per-token loss matrix) and a dictionary of detached 0-d tensors
computed over valid tokens only.

Notation (see :doc:`/theory/objectives`): :math:`\mu` the rollout policy, :math:`\pi_{\rm old}`
the trainer's recomputation of it (``old_logprob``; defaults to the rollout log-probs),
:math:`\pi` the policy being trained, :math:`A_t` the advantage, :math:`M_t` a keep-mask and
:math:`\operatorname{sg}` stop-gradient.

=============  ============================================================================
objective      per-token loss (gradient form)
=============  ============================================================================
``ppo``        :math:`-\min(r_t A_t,\ \operatorname{clip}(r_t, 1-\epsilon_{\rm low}, 1+\epsilon_{\rm high}) A_t)`
``dual_clip``  ``ppo`` and, for :math:`A_t < 0`, at most :math:`-c A_t`
``cispo``      :math:`-\operatorname{sg}(\operatorname{clip}(r_t))\, A_t \log\pi(a_t)`
``gspo``       ``ppo`` on the sequence ratio :math:`s = \exp(\operatorname{mean}_t \log r_t)`
``sapo``       :math:`-A_t \tfrac{4}{\tau} \sigma(\tau (r_t - 1))`, gradient weight :math:`r_t \operatorname{sech}^2(\tau(r_t-1)/2)`
``dppo``       :math:`-A_t\, \operatorname{sg}(\min(r_t, C))\, M_t \log\pi(a_t)`, :math:`r_t = \pi/\mu`
=============  ============================================================================

Truncated or masked importance weights for rollout--trainer mismatch (TIS / MIS,
``is_correction=``) compose with every objective; four aggregation modes
(:func:`~trmath.aggregate_loss`) are exact under gradient accumulation with a global normaliser.
Masked positions are *selected out* (``torch.where``), never multiplied by zero, so padding
that holds ``inf`` or NaN never reaches the loss or the gradient.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ._validation import from_numpy

__all__ = [
    "AGGREGATIONS",
    "DPPO_DIVERGENCES",
    "OBJECTIVES",
    "ObjectiveInfo",
    "aggregate_loss",
    "cispo_loss",
    "dppo_loss",
    "dppo_mask",
    "dual_clip_loss",
    "get_objective",
    "gspo_loss",
    "importance_weights",
    "loss_normalizer",
    "mismatch_metrics",
    "policy_loss",
    "ppo_loss",
    "sapo_loss",
]

#: The aggregation modes of :func:`aggregate_loss`.
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

#: DPPO's divergences: name -> (what it needs, default threshold from the DPPO paper).
DPPO_DIVERGENCES: Mapping[str, Mapping[str, Any]] = {
    "binary_tv": {"needs": (), "default_delta": 0.15,
                  "doc": "|mu(a) - pi(a)| from the sampled token's log-probs (trmath.binary_tv)"},
    "binary_kl": {"needs": (), "default_delta": 0.05,
                  "doc": "KL(Bern(mu(a)) || Bern(pi(a))) (trmath.binary_kl)"},
    "topk_tv": {"needs": ("topk_logprobs", "rollout_topk_logprobs"), "default_delta": 0.15,
                "doc": "TV on the top-K tokens plus a tail bucket (trmath.topk_tv)"},
    "topk_kl": {"needs": ("topk_logprobs", "rollout_topk_logprobs"), "default_delta": 0.05,
                "doc": "KL(mu || pi) on the top-K tokens plus a tail bucket (trmath.topk_kl)"},
    "exact_tv": {"needs": ("logits", "rollout_logits"), "default_delta": 0.15,
                 "doc": "TV(mu, pi) over the full vocabulary (trmath.tv)"},
    "exact_kl": {"needs": ("logits", "rollout_logits"), "default_delta": 0.05,
                 "doc": "KL(mu || pi) over the full vocabulary (trmath.kl)"},
}

_IS_CORRECTIONS = (None, "tis", "mis")
_IS_LEVELS = ("token", "sequence", "geometric")


# ------------------------------------------------------------------------------------------------
# input checking
# ------------------------------------------------------------------------------------------------
def _tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return from_numpy(x, name)
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _float_tensor(x: Any, name: str) -> torch.Tensor:
    t = _tensor(x, name)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    return t


def _pos(flat: int, shape: tuple[int, ...]) -> str:
    return str(tuple(int(i) for i in np.unravel_index(flat, shape)))


def _check_converted(xs: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, name: str) -> None:
    """Raise where a finite entry of ``x`` became infinite in its conversion to ``xs.dtype``."""
    bad = valid & ~torch.isfinite(xs)
    if bool(bad.any()):
        flat = int(torch.nonzero(bad.reshape(-1))[0])
        v = float(x.reshape(-1)[flat])
        raise ValueError(f"{name}: {v!r} at valid position {_pos(flat, tuple(x.shape))} overflows "
                         f"{str(xs.dtype).replace('torch.', '')}, the dtype of the computation "
                         "(that of the log-probs)")


def _check_finite_where(x: torch.Tensor, valid: torch.Tensor, name: str) -> None:
    """Raise for the first non-finite entry of ``x`` at a valid position (padding is free)."""
    # Fast path: the float64 sum of the valid entries is finite exactly when they all are (it
    # cannot overflow for 16/32-bit values; a float64 overflow only sends it to the full check).
    # One selection and one sum, where the elementwise test costs several passes.
    total = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dtype=torch.float64)
    if bool(torch.isfinite(total)):
        return
    bad = valid & ~torch.isfinite(x)
    if bool(bad.any()):
        flat = int(torch.nonzero(bad.reshape(-1))[0])
        v = float(x.reshape(-1)[flat])
        what = "NaN" if math.isnan(v) else ("+inf" if v > 0 else "-inf")
        raise ValueError(f"{name}: contains {what} at valid position {_pos(flat, tuple(x.shape))}")


def _check_number(value: Any, name: str, *, lo: float = 0.0, allow_inf: bool = False,
                  strict: bool = False) -> float:
    # numbers.Real admits numpy's scalars (np.int64, np.float32), which are not int or float.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf) or v < lo or (strict and v == lo):
        rel = ">" if strict else ">="
        fin = "" if allow_inf else "finite and "
        raise ValueError(f"{name}: must be {fin}{rel} {lo}, got {value!r}")
    return v


def _as_mask(mask: Any, shape: tuple[int, ...], device: torch.device, name: str = "mask",
             check: bool = True) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = _tensor(mask, name)
    if tuple(m.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"{name}: on {m.device}, logprob on {device}")
    if m.dtype == torch.bool:
        return m
    if m.is_complex():
        raise TypeError(f"{name}: expected a bool, integer or floating tensor, got {m.dtype}")
    if check and not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name}: entries must be 0 or 1 (or bool); got other values")
    return m != 0


@dataclass
class _Batch:
    lp: torch.Tensor            # trainer log-probs, selected to 0 outside `valid`, with gradient
    rollout: torch.Tensor       # rollout log-probs, detached, 0 outside `valid`
    old: torch.Tensor           # anchor of old-anchored ratios, detached, 0 outside `valid`
    adv: torch.Tensor           # advantages [B, T], 0 outside `valid`
    valid: torch.Tensor         # bool [B, T]
    has_old: bool
    dtype: torch.dtype
    validate: bool = True       # False: NaN propagates (no check raises, nothing is host-synchronised)
    _cache: dict = field(default_factory=dict, repr=False)

    # Counts shared by the metrics (each a pass over [B, T], computed once per call).
    def _get(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def pos(self) -> torch.Tensor:
        """Valid tokens with A > 0 (advantages are 0 at padding)."""
        return self._get("pos", lambda: self.adv > 0)

    @property
    def neg(self) -> torch.Tensor:
        return self._get("neg", lambda: self.adv < 0)

    def count(self, key: str) -> torch.Tensor:
        """Number of valid tokens (``"valid"``), of those with A > 0 / A < 0 (``"pos"`` / ``"neg"``)."""
        return self._get("n_" + key, lambda: torch.count_nonzero(getattr(self, key)))


def _prepare(logprob, rollout_logprob, advantages, mask, old_logprob, validate, lp_name="logprob") -> _Batch:
    """The shared argument checks; ``lp_name``: how errors name ``logprob`` (the public name)."""
    lp = _float_tensor(logprob, lp_name)
    rl = _float_tensor(rollout_logprob, "rollout_logprob")
    if lp.dim() != 2:
        raise ValueError(f"{lp_name}: expected shape [B, T], got {tuple(lp.shape)}")
    shape = tuple(lp.shape)
    for t, name in ((rl, "rollout_logprob"),):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (as {lp_name}), got {tuple(t.shape)}")
        if t.device != lp.device:
            raise ValueError(f"{name}: on {t.device}, {lp_name} on {lp.device}")
    old = None
    if old_logprob is not None:
        old = _float_tensor(old_logprob, "old_logprob")
        if tuple(old.shape) != shape:
            raise ValueError(f"old_logprob: expected shape {shape} (as {lp_name}), got {tuple(old.shape)}")
        if old.device != lp.device:
            raise ValueError(f"old_logprob: on {old.device}, {lp_name} on {lp.device}")
    adv = _float_tensor(advantages, "advantages")
    if adv.device != lp.device:
        raise ValueError(f"advantages: on {adv.device}, {lp_name} on {lp.device}")
    if adv.dim() == 1 and adv.shape[0] == shape[0]:
        adv = adv[:, None].expand(shape)
    elif tuple(adv.shape) != shape:
        raise ValueError(f"advantages: expected shape {shape} or ({shape[0]},), got {tuple(adv.shape)}")
    valid = _as_mask(mask, shape, lp.device, check=validate)
    dt = torch.float64 if torch.float64 in (lp.dtype, rl.dtype) else torch.float32
    if not validate:
        # Unvalidated: NaN propagates, and an infinite value (invalid as well) becomes NaN, so
        # that no clip, cap or zero ratio turns it into a finite loss. lp keeps its graph
        # (inf + NaN is NaN; the gradient passes unchanged).
        # x + (x - x): x where finite (a -0 becomes +0), NaN where x is +-inf or NaN.
        lpd = lp.detach()
        lp = lp + (lpd - lpd)
        rl, adv = (x + (x - x) for x in (rl.detach(), adv.detach()))
        if old is not None:
            old = old.detach()
            old = old + (old - old)
    zero = torch.zeros((), dtype=dt, device=lp.device)
    # Select, never multiply: whatever padding holds (inf, NaN) is replaced before any arithmetic,
    # and the gradient of torch.where is exactly 0 at the positions it does not select.
    lp_s = torch.where(valid, lp.to(dt), zero)
    rl_s = torch.where(valid, rl.detach().to(dt), zero)
    old_s = rl_s if old is None else torch.where(valid, old.detach().to(dt), zero)
    adv_s = torch.where(valid, adv.detach().to(dt), zero)
    if validate:
        # One pass over the selected values first: their float64 sum is finite when every valid
        # entry of every argument is (a float32 overflow of the element-wise sum only sends it to
        # the checks below, which then find nothing). Otherwise the arguments are checked in
        # order, so the error names the first one holding a bad value, and that value's
        # position; then the conversions to the computation's dtype.
        parts = [lp_s.detach(), rl_s, adv_s] + ([old_s] if old is not None else [])
        total = parts[0] + parts[1]
        for t in parts[2:]:
            total = total + t
        if not bool(torch.isfinite(total.sum(dtype=torch.float64))):
            _check_finite_where(lp.detach(), valid, lp_name)
            _check_finite_where(rl, valid, "rollout_logprob")
            if old is not None:
                _check_finite_where(old, valid, "old_logprob")
            _check_finite_where(adv, valid, "advantages")
            # Finite arguments whose conversion to the computation's dtype overflowed (float64
            # advantages of 1e39 beside float32 log-probs): an error, never an infinite loss.
            if old is not None:
                _check_converted(old_s, old, valid, "old_logprob")
            _check_converted(adv_s, adv, valid, "advantages")
    return _Batch(lp_s, rl_s, old_s, adv_s, valid, old is not None, dt, bool(validate))


# ------------------------------------------------------------------------------------------------
# masked statistics
# ------------------------------------------------------------------------------------------------
def _frac(num: torch.Tensor, den: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``num / den`` of two token counts, ``num <= den``; 0 if ``den`` is 0 (then so is ``num``)."""
    return (num.to(dt) / den.clamp_min(1).to(dt)).detach()


def _mean(x: torch.Tensor, sel: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over ``sel`` (0 if empty); ``n``: the count of ``sel`` when known."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    s = torch.where(sel, x.detach(), zero).sum()
    n = sel.sum() if n is None else n
    return (s / n.clamp_min(1).to(x.dtype)).detach()


def _extreme(x: torch.Tensor, sel: torch.Tensor, largest: bool, n: torch.Tensor | None = None) -> torch.Tensor:
    """Largest (smallest) ``x`` over ``sel``, 0 if empty; NaN propagates. No host
    synchronisation, no boolean indexing; ``n``: the count of ``sel`` when known."""
    x = x.detach()
    if x.numel() == 0:  # an empty batch (a shape, known on the host)
        return torch.zeros((), dtype=x.dtype, device=x.device)
    fill = torch.full((), -math.inf if largest else math.inf, dtype=x.dtype, device=x.device)
    xs = torch.where(sel, x, fill)
    m = xs.max() if largest else xs.min()
    has = sel.any() if n is None else n > 0
    return torch.where(has, m, torch.zeros_like(m))


def _max(x: torch.Tensor, sel: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
    return _extreme(x, sel, True, n)


def _min(x: torch.Tensor, sel: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
    return _extreme(x, sel, False, n)


def _sign_split(metrics: dict, key: str, hit: torch.Tensor, b: _Batch) -> None:
    """``key``: fraction of valid tokens; ``key_pos`` / ``key_neg``: among those with A > 0 / A < 0."""
    hit = hit & b.valid
    metrics[key] = _frac(torch.count_nonzero(hit), b.count("valid"), b.dtype)
    metrics[key + "_pos"] = _frac(torch.count_nonzero(hit & b.pos), b.count("pos"), b.dtype)
    metrics[key + "_neg"] = _frac(torch.count_nonzero(hit & b.neg), b.count("neg"), b.dtype)


def _ratio_stats(metrics: dict, r: torch.Tensor, b: _Batch) -> None:
    n = b.count("valid")
    metrics["ratio_mean"] = _mean(r, b.valid, n)
    metrics["ratio_min"] = _min(r, b.valid, n)
    metrics["ratio_max"] = _max(r, b.valid, n)


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------
def _check_aggregation(mode: Any) -> str:
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregation: unknown mode {mode!r}; valid modes: {', '.join(AGGREGATIONS)}")
    return mode


def loss_normalizer(mask: Any, aggregation: str = "token-mean") -> torch.Tensor:
    r"""The local count that ``aggregation`` divides by: valid tokens or non-empty sequences.

    Under gradient accumulation (or data parallelism) sum this over all micro-batches (ranks)
    of one optimiser step and pass the total as ``normalizer=`` to every call: the summed
    micro-batch losses then equal the loss of the whole batch.

    .. math::

        N_{\text{token-mean}} = \sum_{b,t} M_{bt}, \qquad
        N_{\text{seq-*}} = \#\{b : \textstyle\sum_t M_{bt} > 0\}

    Parameters
    ----------
    mask : torch.Tensor or numpy.ndarray, shape ``[B, T]``
        Bool, or 0/1 of any dtype.
    aggregation : str
        One of :data:`AGGREGATIONS`.

    Returns
    -------
    torch.Tensor
        0-d int64.

    Examples
    --------
    >>> import torch, trmath
    >>> m = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    >>> int(trmath.loss_normalizer(m)), int(trmath.loss_normalizer(m, "seq-mean-token-mean"))
    (3, 2)
    """
    mode = _check_aggregation(aggregation)
    m = _tensor(mask, "mask")
    if m.dim() != 2:
        raise ValueError(f"mask: expected shape [B, T], got {tuple(m.shape)}")
    m = _as_mask(m, tuple(m.shape), m.device)
    if mode == "token-mean":
        return m.sum()
    return m.any(dim=-1).sum()


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: Any = None,
    aggregation: str = "token-mean",
    *,
    normalizer: Any = None,
    max_length: int | None = None,
    validate: bool = True,
) -> torch.Tensor:
    r"""Reduce a per-token loss matrix ``[B, T]`` to a scalar over the valid tokens.

    With :math:`M` the mask, :math:`n_b = \sum_t M_{bt}`, :math:`S = \{b : n_b > 0\}`:

    .. math::

        \text{token-mean}: \frac{\sum_{b,t} M_{bt}\,\ell_{bt}}{N},\quad N = \sum_b n_b

        \text{seq-mean-token-sum}: \frac{1}{N}\sum_{b} \sum_t M_{bt}\,\ell_{bt},\quad N = |S|

        \text{seq-mean-token-mean}: \frac{1}{N}\sum_{b \in S} \frac{\sum_t M_{bt}\,\ell_{bt}}{n_b}

        \text{seq-mean-token-sum-norm}: \frac{1}{N L}\sum_{b} \sum_t M_{bt}\,\ell_{bt}

    where :math:`L` is ``max_length`` (default ``T``; Dr. GRPO's constant length normaliser)
    and :math:`N` is replaced by ``normalizer`` when given. Masked positions are selected out,
    so padding holding ``inf`` or NaN changes nothing; a fully masked sequence contributes 0 and
    is not counted; an all-masked batch gives 0 (with zero gradient), never NaN.

    Other frameworks' conventions, through ``normalizer``: verl's ``seq-mean-token-sum-norm``
    divides by :math:`L` alone (``normalizer=1``); TRL's ``dr_grpo`` divides by :math:`B L`, and
    its ``grpo``/``sapo`` sequence means by :math:`B`, counting fully masked sequences
    (``normalizer=B``; the same as the default when no sequence is fully masked).

    Parameters
    ----------
    token_loss : torch.Tensor, shape ``[B, T]``
    mask : shape ``[B, T]``, optional
        Bool or 0/1; ``None`` means every token is valid.
    aggregation : str
        One of :data:`AGGREGATIONS`.
    normalizer : number or 0-d tensor, optional
        The *global* :math:`N` across all micro-batches of an optimiser step (the sum of
        :func:`loss_normalizer` over them). Must be > 0.
    max_length : int, optional
        :math:`L` of ``seq-mean-token-sum-norm``; pass the same value to every micro-batch.
    validate : bool
        Check a tensor ``normalizer`` (finite, > 0), which reads its value on the host (a
        synchronisation on a GPU, a graph break under ``torch.compile``). ``False`` skips
        that check (a number is always checked): the objectives pass their own ``validate``, so
        ``normalizer=loss_normalizer(...)`` compiles with ``fullgraph=True`` beside
        ``validate=False``; a normaliser <= 0 or NaN then gives a loss of the wrong sign, inf or
        NaN, never an error. The mask's 0/1 check is governed by the same flag.

    Returns
    -------
    torch.Tensor
        0-d, the dtype of ``token_loss``.

    Examples
    --------
    >>> import torch, trmath
    >>> loss = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), float("inf")]])
    >>> mask = torch.tensor([[True, True, False], [True, False, False]])
    >>> float(trmath.aggregate_loss(loss, mask))                           # (1 + 2 + 3) / 3
    2.0
    >>> float(trmath.aggregate_loss(loss, mask, "seq-mean-token-mean"))  # (1.5 + 3) / 2
    2.25
    """
    mode = _check_aggregation(aggregation)
    x = _tensor(token_loss, "token_loss")
    if not x.is_floating_point():
        raise TypeError(f"token_loss: expected a floating dtype, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"token_loss: expected shape [B, T], got {tuple(x.shape)}")
    valid = _as_mask(mask, tuple(x.shape), x.device, check=validate)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    xs = torch.where(valid, x, zero)
    n_tok = valid.sum(dim=-1)
    if normalizer is None:
        denom = (n_tok.sum() if mode == "token-mean" else (n_tok > 0).sum()).to(x.dtype)
        denom = denom.clamp_min(1)  # nothing valid: the sum is 0, and so is the loss
    else:
        if isinstance(normalizer, torch.Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer: expected a scalar, got shape {tuple(normalizer.shape)}")
            if normalizer.is_complex() or normalizer.dtype == torch.bool:
                raise TypeError(f"normalizer: expected a real number, got a {normalizer.dtype} tensor")
            denom = normalizer.detach().reshape(()).to(device=x.device, dtype=x.dtype)
            if validate:
                nv = float(normalizer)
                if not (nv > 0 and math.isfinite(nv)):
                    raise ValueError(f"normalizer: must be finite and > 0, got {nv!r}")
        else:
            nv = _check_number(normalizer, "normalizer", strict=True)
            denom = torch.tensor(nv, dtype=x.dtype, device=x.device)
    if mode == "token-mean" or mode == "seq-mean-token-sum":
        return xs.sum() / denom
    if mode == "seq-mean-token-mean":
        per_seq = xs.sum(dim=-1) / n_tok.clamp_min(1).to(x.dtype)
        return per_seq.sum() / denom
    if max_length is None:
        L = x.shape[-1]
    else:
        if (isinstance(max_length, (bool, np.bool_)) or not isinstance(max_length, numbers.Integral)
                or max_length < 1):
            raise ValueError(f"max_length: expected an integer >= 1, got {max_length!r}")
        L = int(max_length)
    return xs.sum() / (denom * L)


# ------------------------------------------------------------------------------------------------
# importance weights (TIS / MIS) and mismatch diagnostics
# ------------------------------------------------------------------------------------------------
def _mismatch(rollout: torch.Tensor, trainer: torch.Tensor, valid: torch.Tensor,
              n: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Diagnostics of KL(mu || pi_trainer) from the sampled tokens, in float64 (valid tokens only).

    ``rollout`` and ``trainer`` share a dtype (as :func:`_prepare` makes them); ``n``: the count
    of ``valid`` when known. One pass over both (``trmath::mismatch_sums``: on CPU the element
    kernel of k3), then scalar arithmetic: no boolean indexing, no host synchronisation.
    """
    from ._estimators_impl import mismatch_sums

    f64 = torch.float64
    zero = torch.zeros((), dtype=f64, device=rollout.device)
    sums = mismatch_sums(rollout.detach(), trainer.detach(), valid)
    n = (valid.sum() if n is None else n).to(f64)
    has = n > 0
    nn = n.clamp_min(1)
    # Normalised effective sample size (sum w)^2 / (n sum w^2) in (0, 1] of w = e^lr, both sums
    # taken about the largest valid lr (no overflow; that term is 1, so both are >= 1 and a term
    # that underflows changes them by less than 1e-300 relative). NaN propagates.
    log_ess = 2 * torch.log(sums[4]) - torch.log(sums[5]) - torch.log(nn)
    return {
        "mismatch_k1": ((0.0 - sums[0]) / nn).detach(),  # k1 = log mu - log pi = -lr; +0 when equal
        "mismatch_k3": (sums[1] / nn).detach(),
        "mismatch_ess": torch.where(has, torch.exp(torch.where(has, log_ess, zero)), zero),
        "mismatch_max_abs_log_ratio": sums[3].detach(),
    }


def _is_weights(b: _Batch, correction, level, cap, low) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Detached weights ``w`` [B, T] and keep-mask for ``correction`` of pi_old / mu."""
    if correction not in _IS_CORRECTIONS:
        raise ValueError(f"is_correction: unknown {correction!r}; valid: None, 'tis', 'mis'")
    if level not in _IS_LEVELS:
        raise ValueError(f"is_level: unknown {level!r}; valid: {', '.join(_IS_LEVELS)}")
    cap = _check_number(cap, "is_cap", lo=1.0, allow_inf=True)
    low = (1.0 / cap if cap != math.inf else 0.0) if low is None else _check_number(low, "is_low")
    if low > cap:
        raise ValueError(f"is_low: must be <= is_cap ({cap!r}), got {low!r}")
    valid = b.valid
    log_w = b.old - b.rollout  # 0 outside valid (both selected to 0)
    if level != "token":
        s = log_w.sum(dim=-1, keepdim=True)
        if level == "geometric":
            s = s / valid.sum(dim=-1, keepdim=True).clamp_min(1).to(s.dtype)
        log_w = s.expand_as(log_w)
    ones = torch.ones_like(log_w)
    metrics: dict[str, torch.Tensor] = {}
    if correction is None:
        return ones, valid, metrics
    log_cap = math.log(cap) if cap != math.inf else math.inf
    if correction == "tis":
        # min(w, C) without ever forming an overflowing w: exp(log w) below the cap, C itself
        # (exactly, not exp(log C)) above it.
        hit = log_w > log_cap
        w = torch.where(hit, torch.full_like(log_w, cap if cap != math.inf else 0.0),
                        torch.exp(torch.clamp(log_w, max=log_cap)))
        metrics["is_truncated_frac"] = _frac(torch.count_nonzero(hit & valid), b.count("valid"), b.dtype)
        keep = valid
    else:
        log_low = math.log(low) if low > 0 else -math.inf
        out = (log_w > log_cap) | (log_w < log_low)
        w = torch.where(torch.isnan(log_w), log_w, ones)  # an unvalidated NaN stays NaN
        keep = valid & ~out
        metrics["is_masked_frac"] = _frac(torch.count_nonzero(out & valid), b.count("valid"), b.dtype)
    metrics["is_weight_mean"] = _mean(w, keep, b.count("valid"))  # over valid: 0 where not kept
    return w.detach(), keep, metrics


def importance_weights(
    old_logprob: Any,
    rollout_logprob: Any,
    mask: Any = None,
    *,
    correction: str = "tis",
    level: str = "token",
    cap: float = 2.0,
    low: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Truncated (TIS) or masked (MIS) importance weights for rollout--trainer mismatch.

    With :math:`\log w_t = \log\pi_{\rm old}(a_t) - \log\mu(a_t)` (``level="token"``),
    :math:`\sum_t \log w_t` (``"sequence"``) or its mean (``"geometric"``):

    .. math::

        \text{TIS}: w_t \leftarrow \min(w_t, C), \qquad
        \text{MIS}: M_t \leftarrow M_t\,[\,w_{\rm low} \le w_t \le C\,]

    The weights are detached (they multiply the per-token loss as constants). The truncated
    weight is :math:`C` where :math:`\log w > \log C` and :math:`e^{\log w}` elsewhere, so a
    huge sequence weight never overflows. MIS as here (weight 1 on the kept tokens) is verl's
    rejection mask; TRL's ``token_mask`` and OpenRLHF's ``icepop`` also multiply the kept tokens
    by :math:`w_t` (the TIS weights times this mask).

    Parameters
    ----------
    old_logprob, rollout_logprob : shape ``[B, T]``
        The trainer's log-probs of the sampled tokens under the behaviour parameters, and the
        rollout engine's.
    mask : shape ``[B, T]``, optional
    correction : {"tis", "mis"}
    level : {"token", "sequence", "geometric"}
    cap : float
        :math:`C \ge 1` (may be ``inf``).
    low : float, optional
        MIS lower threshold; default :math:`1/C`.

    Returns
    -------
    weights : torch.Tensor ``[B, T]``
        1 for MIS (its effect is the mask).
    keep : torch.Tensor, bool ``[B, T]``
        Valid tokens that keep their gradient.

    Examples
    --------
    >>> import torch, trmath
    >>> old = torch.tensor([[-1.0, -0.1]]); mu = torch.tensor([[-2.0, -0.1]])
    >>> w, keep = trmath.importance_weights(old, mu, cap=2.0)
    >>> w
    tensor([[2., 1.]])
    >>> trmath.importance_weights(old, mu, correction="mis", cap=2.0)[1]
    tensor([[False,  True]])
    """
    o = _float_tensor(old_logprob, "old_logprob")
    b = _prepare(o, rollout_logprob, torch.zeros(o.shape[0] if o.dim() else 0, dtype=o.dtype, device=o.device),
                 mask, o, True, "old_logprob")
    if correction is None:
        raise ValueError("correction: expected 'tis' or 'mis', got None")
    w, keep, _ = _is_weights(b, correction, level, cap, low)
    return w, keep


def mismatch_metrics(rollout_logprob: Any, trainer_logprob: Any, mask: Any = None) -> dict[str, torch.Tensor]:
    r"""Rollout--trainer mismatch diagnostics from the sampled tokens' log-probs.

    With :math:`\ell_t = \log\pi(a_t) - \log\mu(a_t)` over the valid tokens (:math:`a_t \sim \mu`):

    * ``mismatch_k1`` -- mean of :math:`k_1 = -\ell`, unbiased for :math:`\mathrm{KL}(\mu\|\pi)`;
    * ``mismatch_k3`` -- mean of :math:`k_3 = \operatorname{expm1}(\ell) - \ell \ge 0`, unbiased
      for the same KL, low variance when :math:`\mu \approx \pi`;
    * ``mismatch_ess`` -- normalised effective sample size
      :math:`(\sum w)^2 / (n \sum w^2) \in (0, 1]` of :math:`w = e^{\ell}`, in log space;
    * ``mismatch_max_abs_log_ratio`` -- :math:`\max |\ell|`.

    All in float64 (0 when no token is valid). ``mismatch_k3`` uses :func:`trmath.k3`.

    Parameters
    ----------
    rollout_logprob, trainer_logprob : shape ``[B, T]``
    mask : shape ``[B, T]``, optional

    Returns
    -------
    dict of str to 0-d float64 tensors

    Examples
    --------
    >>> import torch, trmath
    >>> m = trmath.mismatch_metrics(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]]))
    >>> float(m["mismatch_k3"]), float(m["mismatch_ess"])
    (0.0, 1.0)
    """
    b = _prepare(trainer_logprob, rollout_logprob,
                 torch.zeros(_tensor(trainer_logprob, "trainer_logprob").shape[:1]), mask, None, True,
                 "trainer_logprob")
    return _mismatch(b.rollout, b.lp, b.valid)


# ------------------------------------------------------------------------------------------------
# the shared pipeline
# ------------------------------------------------------------------------------------------------
def _finish(token_loss, keep, b: _Batch, metrics: dict, *, aggregation, normalizer, max_length,
            is_correction, is_level, is_cap, is_low):
    w, is_keep, is_metrics = _is_weights(b, is_correction, is_level, is_cap, is_low)
    metrics.update(is_metrics)
    zero = torch.zeros((), dtype=token_loss.dtype, device=token_loss.device)
    keep = keep & is_keep & b.valid
    # (MIS weights are 1, or NaN where an unvalidated log-weight is)
    loss_mat = torch.where(keep, token_loss * w if is_correction is not None else token_loss, zero)
    trainer = b.old if b.has_old else b.lp
    metrics.update(_mismatch(b.rollout, trainer, b.valid, b.count("valid")))
    metrics["n_tokens"] = b.count("valid").detach()
    metrics["n_seqs"] = b.valid.any(dim=-1).sum().detach()
    if aggregation is None:
        return loss_mat, metrics
    loss = aggregate_loss(loss_mat, b.valid, aggregation, normalizer=normalizer, max_length=max_length,
                          validate=b.validate)
    return loss, metrics


_COMMON_DOC = """old_logprob : shape ``[B, T]``, optional
        :math:`\\log\\pi_{\\rm old}(a_t)` recomputed by the trainer; the anchor of the ratio
        (default: ``rollout_logprob``) and the numerator of the TIS/MIS weight.
    aggregation : str or None
        One of :data:`AGGREGATIONS` (default ``"token-mean"``), or ``None`` for the per-token
        loss matrix ``[B, T]`` (0 at excluded positions, TIS weights applied).
    normalizer, max_length
        See :func:`aggregate_loss`.
    is_correction : {None, "tis", "mis"}
        Truncated or masked importance weights of :math:`\\pi_{\\rm old}/\\mu`
        (:func:`importance_weights`); the identity without ``old_logprob``.
    is_level : {"token", "sequence", "geometric"}
    is_cap, is_low : float
        TIS/MIS thresholds (defaults 2 and ``1/is_cap``).
    validate : bool
        If true (default), NaN or infinite values at *valid* positions raise
        :class:`ValueError` naming the argument and the position; padding may hold anything."""


def _check_eps(eps_low, eps_high):
    el = _check_number(eps_low, "eps_low", allow_inf=True)
    eh = el if eps_high is None else _check_number(eps_high, "eps_high", allow_inf=True)
    return el, eh


def _clip_surrogate(lr: torch.Tensor, b: _Batch, eps_low: float, eps_high: float,
                    clip_ratio_c: float | None):
    r"""PPO's clipped surrogate on log-ratios ``lr`` (with gradient), per token.

    Where the gradient is zero (the clip or the dual clip is active), the log-ratio is detached
    before the exponential, so an overflowing ratio there cannot turn the zero into ``0 * inf``.
    """
    A = b.adv
    r_det = torch.exp(lr.detach())
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    clip_hi = b.pos & (r_det > hi)
    clip_lo = b.neg & (r_det < lo)
    dual = b.neg & (r_det > clip_ratio_c) if clip_ratio_c is not None else torch.zeros_like(clip_hi)
    frozen = clip_hi | clip_lo | dual
    r = torch.exp(torch.where(frozen, lr.detach(), lr))
    loss = torch.maximum(-A * r, -A * torch.clamp(r, min=lo, max=hi))
    if clip_ratio_c is not None:
        loss = torch.where(b.neg, torch.minimum(loss, -A * clip_ratio_c), loss)
    return loss, r_det, clip_hi | clip_lo, dual


# ------------------------------------------------------------------------------------------------
# the objectives
# ------------------------------------------------------------------------------------------------
def _with_common_doc(fn):
    fn.__doc__ = fn.__doc__.replace("@COMMON_OPTIONS@", _COMMON_DOC)
    return fn


@_with_common_doc
def ppo_loss(
    logprob: Any,
    rollout_logprob: Any,
    advantages: Any,
    mask: Any = None,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    clip_ratio_c: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""PPO's clipped surrogate, with asymmetric clipping (DAPO's clip-higher) and optional dual clip.

    .. math::

        \ell_t = -\min\bigl(r_t A_t,\ \operatorname{clip}(r_t, 1-\epsilon_{\rm low},
        1+\epsilon_{\rm high})\,A_t\bigr),\qquad r_t = \frac{\pi(a_t)}{\pi_{\rm old}(a_t)},

    and with the dual clip :math:`c > 1`, :math:`\ell_t \leftarrow \min(\ell_t, -c A_t)` for
    :math:`A_t < 0`. Gradient: :math:`-A_t r_t \nabla\log\pi(a_t)` where no clip is active, 0
    where one is (:math:`A_t>0, r_t>1+\epsilon_{\rm high}`; :math:`A_t<0, r_t<1-\epsilon_{\rm low}`;
    :math:`A_t<0, r_t>c`). The objective :math:`-\ell_t` never exceeds :math:`r_t A_t`
    without the dual clip.

    The log-ratio is not clamped. verl and OpenRLHF clamp :math:`\log r_t` to
    :math:`[-20, 20]` before exponentiating, which changes the loss only beyond that range (where
    the unclipped :math:`A_t < 0` side is then :math:`e^{20} |A_t|` instead of :math:`r_t |A_t|`);
    the dual clip (``clip_ratio_c``) bounds that side here, and verl applies it by default with
    :math:`c = 3`.

    Parameters
    ----------
    logprob : torch.Tensor, shape ``[B, T]``
        :math:`\log\pi(a_t)` of the policy being trained (carries the gradient).
    rollout_logprob : shape ``[B, T]``
        :math:`\log\mu(a_t)` from the rollout engine.
    advantages : shape ``[B, T]`` or ``[B]``
    mask : shape ``[B, T]``, optional
        Response mask (bool or 0/1); ``None``: all valid.
    eps_low, eps_high : float
        Clip range; ``eps_high`` defaults to ``eps_low`` (DAPO: 0.2 / 0.28).
    clip_ratio_c : float, optional
        Dual-clip constant :math:`c > 1` (typically 3).
    **kwargs
        Common options, below.
    @COMMON_OPTIONS@

    Returns
    -------
    loss : torch.Tensor
        0-d (or ``[B, T]`` with ``aggregation=None``); float32, float64 for float64 inputs.
    metrics : dict of str to 0-d tensors
        ``clip_frac`` (+ ``_pos``/``_neg``: among tokens with that advantage sign),
        ``dual_clip_frac``, ``ratio_mean/min/max``, mismatch diagnostics
        (:func:`mismatch_metrics`), ``n_tokens``, ``n_seqs``.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    >>> mu = torch.tensor([[-1.0, -1.0, -2.0]])
    >>> loss, m = trmath.ppo_loss(lp, mu, torch.tensor([1.0]), eps_low=0.2, eps_high=0.28)
    >>> float(m["clip_frac"])   # r = e^0.5 > 1.28 on the second token
    0.3333333432674408
    >>> loss.backward(); lp.grad
    tensor([[-0.3333,  0.0000, -0.3333]])
    """
    el, eh = _check_eps(eps_low, eps_high)
    if clip_ratio_c is not None:
        clip_ratio_c = _check_number(clip_ratio_c, "clip_ratio_c", lo=1.0, strict=True)
    return _ppo_family(logprob, rollout_logprob, advantages, mask, el, eh, clip_ratio_c, kwargs)


def _ppo_family(logprob, rollout_logprob, advantages, mask, el, eh, c, kwargs):
    kw = _split_kwargs(kwargs, ())
    b = _prepare(logprob, rollout_logprob, advantages, mask, kw.get("old_logprob"), kw.get("validate", True))
    loss, r, clipped, dual = _clip_surrogate(b.lp - b.old, b, el, eh, c)
    metrics: dict[str, torch.Tensor] = {}
    _sign_split(metrics, "clip_frac", clipped, b)
    if c is not None:
        metrics["dual_clip_frac"] = _frac(torch.count_nonzero(dual & b.valid), b.count("valid"), b.dtype)
    _ratio_stats(metrics, r, b)
    return _finish(loss, b.valid, b, metrics, **_finish_kw(kw))


def _split_kwargs(kwargs: dict, extra: tuple[str, ...]) -> dict:
    allowed = {"old_logprob", "aggregation", "normalizer", "max_length", "is_correction",
               "is_level", "is_cap", "is_low", "validate", *extra}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    return kwargs


def _finish_kw(kw: dict) -> dict:
    agg = kw.get("aggregation", "token-mean")
    if agg is not None:
        _check_aggregation(agg)
    return dict(aggregation=agg, normalizer=kw.get("normalizer"), max_length=kw.get("max_length"),
                is_correction=kw.get("is_correction"), is_level=kw.get("is_level", "token"),
                is_cap=kw.get("is_cap", 2.0), is_low=kw.get("is_low"))


def dual_clip_loss(
    logprob: Any,
    rollout_logprob: Any,
    advantages: Any,
    mask: Any = None,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    clip_ratio_c: float = 3.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Dual-clip PPO: :func:`ppo_loss` with the dual clip on (:math:`c = 3` by default).

    .. math::

        \ell_t = \min\bigl(\ell^{\rm PPO}_t,\ -c A_t\bigr)\ \text{ for } A_t < 0,

    bounding the loss of a negative-advantage token whose ratio has run away upwards
    (gradient 0 where :math:`r_t > c`). Parameters and returns as :func:`ppo_loss`.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([[0.0, -1.0]], requires_grad=True); mu = torch.tensor([[-5.0, -1.0]])
    >>> loss, m = trmath.dual_clip_loss(lp, mu, torch.tensor([[-1.0, -1.0]]), aggregation=None)
    >>> loss.detach()        # r = e^5 > 3 is capped at c * |A| = 3
    tensor([[3., 1.]])
    """
    return ppo_loss(logprob, rollout_logprob, advantages, mask, eps_low=eps_low, eps_high=eps_high,
                    clip_ratio_c=clip_ratio_c, **kwargs)


def cispo_loss(
    logprob: Any,
    rollout_logprob: Any,
    advantages: Any,
    mask: Any = None,
    *,
    eps_low: float | None = None,
    eps_high: float = 0.28,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""CISPO: a clipped, *detached* importance weight on every token (no token loses its gradient).

    .. math::

        \ell_t = -\operatorname{sg}\bigl(\operatorname{clip}(r_t, 1-\epsilon_{\rm low},
        1+\epsilon_{\rm high})\bigr)\,A_t\,\log\pi(a_t),
        \qquad \nabla\ell_t = -\operatorname{clip}(r_t)\,A_t\,\nabla\log\pi(a_t).

    The value is a surrogate (it contains :math:`\log\pi`); only its gradient is meaningful.
    ``eps_high`` is relative to 1 (the cap is :math:`1 + \epsilon_{\rm high}`), as in verl; TRL's
    ``epsilon_high`` for CISPO is the absolute cap :math:`\epsilon_{\max}`, so TRL's
    :math:`\epsilon_{\max}` is ``eps_high = eps_max - 1`` with ``eps_low=None`` here.

    Parameters
    ----------
    logprob, rollout_logprob, advantages, mask
        As :func:`ppo_loss`.
    eps_low : float, optional
        ``None`` (default): no lower clip, as in the CISPO paper.
    eps_high : float
    **kwargs
        Common options, as :func:`ppo_loss`.

    Returns
    -------
    loss, metrics
        ``clip_frac`` (+ ``_pos``/``_neg``): tokens whose weight is clipped (they keep a
        gradient), ratio statistics, mismatch diagnostics.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([[-1.0, -0.5]], requires_grad=True); mu = torch.tensor([[-1.0, -1.0]])
    >>> loss, _ = trmath.cispo_loss(lp, mu, torch.tensor([1.0]), eps_high=0.28, aggregation="seq-mean-token-sum")
    >>> loss.backward(); lp.grad    # -clip(r) * A: r = 1 and r = e^0.5 clipped to 1.28
    tensor([[-1.0000, -1.2800]])
    """
    el = math.inf if eps_low is None else _check_number(eps_low, "eps_low", allow_inf=True)
    eh = _check_number(eps_high, "eps_high", allow_inf=True)
    kw = _split_kwargs(kwargs, ())
    b = _prepare(logprob, rollout_logprob, advantages, mask, kw.get("old_logprob"), kw.get("validate", True))
    r = torch.exp(b.lp.detach() - b.old)
    lo = 1.0 - el if el != math.inf else -math.inf
    w = torch.clamp(r, min=lo, max=1.0 + eh)
    loss = -b.adv * w * b.lp
    metrics: dict[str, torch.Tensor] = {}
    _sign_split(metrics, "clip_frac", (r > 1.0 + eh) | (r < lo), b)
    _ratio_stats(metrics, r, b)
    return _finish(loss, b.valid, b, metrics, **_finish_kw(kw))


def gspo_loss(
    logprob: Any,
    rollout_logprob: Any,
    advantages: Any,
    mask: Any = None,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""GSPO: PPO's clip on the length-normalised *sequence* ratio.

    .. math::

        s_b = \exp\Bigl(\frac{1}{n_b}\sum_{t} M_{bt}\,\log\frac{\pi(a_{bt})}{\pi_{\rm old}(a_{bt})}\Bigr),
        \qquad s_{bt} = \operatorname{sg}(s_b)\,\frac{\pi(a_{bt})}{\operatorname{sg}\pi(a_{bt})},

        \ell_{bt} = -\min\bigl(s_{bt} A_{bt},\ \operatorname{clip}(s_{bt}, 1-\epsilon_{\rm low},
        1+\epsilon_{\rm high}) A_{bt}\bigr).

    (the GSPO-token form: its value is :math:`s_b` on every token, and with a per-sequence
    advantage and ``seq-mean-token-mean`` aggregation its gradient is exactly GSPO's,
    :math:`-A_b s_b \frac{1}{n_b}\sum_t \nabla\log\pi(a_{bt})` unless the sequence is clipped).
    Default clip range from the GSPO paper (:math:`3\cdot10^{-4}`, :math:`4\cdot10^{-4}`); use
    ``aggregation="seq-mean-token-mean"`` for the paper's objective.

    Parameters and returns as :func:`ppo_loss`; ``clip_frac`` counts tokens of clipped
    sequences, the ratio statistics are of :math:`s_b` over valid tokens.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([[-1.0, -2.0]]); mu = torch.tensor([[-1.0, -2.2]])
    >>> loss, m = trmath.gspo_loss(lp, mu, torch.tensor([1.0]), aggregation="seq-mean-token-mean")
    >>> round(float(m["ratio_mean"]), 6)   # exp(mean(0, 0.2)) = e^0.1
    1.105171
    """
    el, eh = _check_eps(eps_low, eps_high)
    kw = _split_kwargs(kwargs, ())
    b = _prepare(logprob, rollout_logprob, advantages, mask, kw.get("old_logprob"), kw.get("validate", True))
    n = b.valid.sum(dim=-1, keepdim=True).clamp_min(1).to(b.dtype)
    seq_lr = ((b.lp.detach() - b.old).sum(dim=-1, keepdim=True) / n).expand_as(b.lp)
    lr_tok = seq_lr + (b.lp - b.lp.detach())
    loss, s, clipped, _ = _clip_surrogate(lr_tok, b, el, eh, None)
    metrics: dict[str, torch.Tensor] = {}
    _sign_split(metrics, "clip_frac", clipped, b)
    _ratio_stats(metrics, s, b)
    return _finish(loss, b.valid, b, metrics, **_finish_kw(kw))


class _SapoGate(torch.autograd.Function):
    """sigmoid(tau (e^lr - 1)) and its derivative in lr, tau e^lr sigmoid(x) sigmoid(-x) with
    x = tau (e^lr - 1), formed as tau sigmoid(x) exp(lr - softplus(x)).

    As a product the derivative is 0 * inf = NaN once e^lr overflows (lr > 88.7 in float32), and
    cutting the graph above some lr instead loses it where tau is small (tau = 1e-12, lr = 30.5:
    -1.6e6 of an exact -1.6e6, not 0). In the log domain it is finite and accurate everywhere:
    lr - softplus(x) -> -inf as the ratio grows (an exact 0), with softplus(x) =
    max(x, 0) + log1p(e^-|x|) to full relative accuracy (torch's softplus returns x above 20,
    2e-9 off).
    """

    @staticmethod
    def forward(ctx, lr, tau):
        x = tau * torch.expm1(lr)
        ctx.save_for_backward(lr, x, tau)
        return torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        lr, x, tau = ctx.saved_tensors
        softplus = x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))
        return g * (tau * torch.sigmoid(x) * torch.exp(lr - softplus)), None


def sapo_loss(
    logprob: Any,
    rollout_logprob: Any,
    advantages: Any,
    mask: Any = None,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""SAPO: a smooth, temperature-controlled gate instead of a hard clip.

    .. math::

        \ell_t = -A_t\,\frac{4}{\tau_t}\,\sigma\bigl(\tau_t (r_t - 1)\bigr),\qquad
        \nabla\ell_t = -A_t\, r_t \operatorname{sech}^2\!\Bigl(\frac{\tau_t (r_t - 1)}{2}\Bigr)
        \nabla\log\pi(a_t),

    with :math:`\tau_t = \tau_{\rm pos}` for :math:`A_t > 0` and :math:`\tau_{\rm neg}`
    otherwise. At :math:`r = 1` the gradient is the on-policy one; it decays smoothly as the
    ratio leaves 1 instead of dropping to 0 at a threshold. The default aggregation is the
    common option's ``"token-mean"``; verl's SAPO always averages per sequence first
    (``aggregation="seq-mean-token-mean"`` here), and TRL's does too, dividing by the batch size
    including fully masked sequences (add ``normalizer=B`` to match it on such batches).

    Parameters
    ----------
    logprob, rollout_logprob, advantages, mask
        As :func:`ppo_loss`.
    tau_pos, tau_neg : float
        Gate temperatures (> 0).
    **kwargs
        Common options, as :func:`ppo_loss`.

    Returns
    -------
    loss, metrics
        ``gate_mean`` (mean of :math:`\operatorname{sech}^2(\tau(r-1)/2)` over valid tokens),
        ratio statistics, mismatch diagnostics.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([[-1.0]], requires_grad=True)
    >>> loss, m = trmath.sapo_loss(lp, lp.detach(), torch.tensor([2.0]))
    >>> loss.backward(); lp.grad   # r = 1: the on-policy gradient -A
    tensor([[-2.]])
    """
    tp = _check_number(tau_pos, "tau_pos", strict=True)
    tn = _check_number(tau_neg, "tau_neg", strict=True)
    kw = _split_kwargs(kwargs, ())
    b = _prepare(logprob, rollout_logprob, advantages, mask, kw.get("old_logprob"), kw.get("validate", True))
    tau = torch.where(b.pos, torch.full_like(b.adv, tp), torch.full_like(b.adv, tn))
    lr = b.lp - b.old
    loss = -b.adv * (4.0 / tau) * _SapoGate.apply(lr, tau)
    r = torch.exp(lr.detach())
    x = tau * torch.expm1(lr.detach())
    gate = 4.0 * torch.sigmoid(x) * torch.sigmoid(-x)
    metrics: dict[str, torch.Tensor] = {"gate_mean": _mean(gate, b.valid, b.count("valid"))}
    _ratio_stats(metrics, r, b)
    return _finish(loss, b.valid, b, metrics, **_finish_kw(kw))


# ------------------------------------------------------------------------------------------------
# DPPO
# ------------------------------------------------------------------------------------------------
def _check_extra(x: Any, name: str, lead: tuple[int, ...], device, divergence: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{name}: required for divergence={divergence!r}")
    t = _float_tensor(x, name)
    if t.dim() != 3 or tuple(t.shape[:2]) != lead:
        raise ValueError(f"{name}: expected shape [{lead[0]}, {lead[1]}, K or V], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, logprob on {device}")
    return t


class _context:
    """Re-raise a coarse divergence's ValueError under this module's argument names."""

    def __init__(self, divergence: str, pname: str, qname: str, where: str = ""):
        self.d, self.p, self.q, self.where = divergence, pname, qname, where

    def __enter__(self):
        return self

    def __exit__(self, typ, err, tb):
        if typ is ValueError:
            msg = str(err).replace("p_logprobs", self.p).replace("q_logprobs", self.q)
            msg = msg.replace("p_logprob", self.p).replace("q_logprob", self.q)
            msg = msg.replace("p_logits", self.p).replace("q_logits", self.q)
            raise ValueError(f"divergence={self.d!r}{self.where}: {msg}") from err
        return False


@torch.no_grad()
def _divergence(divergence, lp, rollout, valid, *, topk_logprobs, rollout_topk_logprobs, logits,
                rollout_logits, temperature, dt, validate=True) -> torch.Tensor:
    """D_t = divergence(mu, pi) at valid tokens (0 elsewhere), detached, dtype ``dt``.

    ``validate=False``: nothing raises and nothing synchronises with the host (so a compiled
    graph has no break); a bad input gives NaN at its token, which the caller propagates."""
    import trmath

    if isinstance(divergence, (torch.Tensor, np.ndarray)):
        d = _float_tensor(divergence, "divergence")
        if tuple(d.shape) != tuple(lp.shape):
            raise ValueError(f"divergence: expected shape {tuple(lp.shape)}, got {tuple(d.shape)}")
        if validate:
            _check_finite_nan(d, valid, "divergence")
            # A divergence is >= 0: a negative value (or -inf) comes from a bug upstream and
            # would silently keep every token it touches.
            neg = valid & (d < 0)
            if bool(neg.any()):
                flat = int(torch.nonzero(neg.reshape(-1))[0])
                raise ValueError(f"divergence: {float(d.reshape(-1)[flat])!r} < 0 at valid position "
                                 f"{_pos(flat, tuple(d.shape))} (a divergence is never negative)")
        return torch.where(valid, d.detach().to(dt), torch.zeros((), dtype=dt, device=d.device))
    if not isinstance(divergence, str) or divergence not in DPPO_DIVERGENCES:
        raise ValueError(f"divergence: unknown {divergence!r}; valid: {', '.join(DPPO_DIVERGENCES)} "
                         "(or a [B, T] tensor of precomputed values)")
    out = torch.zeros(lp.shape, dtype=dt, device=lp.device)
    lead = tuple(lp.shape)
    if divergence.startswith("binary"):
        fn = getattr(trmath, divergence)
        # Padding holds log-prob 0 in both (selected in _prepare): a valid input giving D = 0.
        with _context(divergence, "rollout_logprob", "logprob"):
            d = torch.as_tensor(fn(rollout, lp.detach(), validate=validate)).to(dt)
        out = torch.where(valid, d, out)
    elif divergence.startswith("topk"):
        q = _check_extra(topk_logprobs, "topk_logprobs", lead, lp.device, divergence)
        p = _check_extra(rollout_topk_logprobs, "rollout_topk_logprobs", lead, lp.device, divergence)
        if p.shape != q.shape:
            raise ValueError("rollout_topk_logprobs and topk_logprobs: shapes differ "
                             f"({tuple(p.shape)} vs {tuple(q.shape)})")
        fn = getattr(trmath, divergence)
        if not validate:
            # Every row, unvalidated: a bad one (padding may hold anything) gives NaN, selected
            # out at padding; no data-dependent shape, so this traces into one graph.
            with _context(divergence, "rollout_topk_logprobs", "topk_logprobs"):
                d = torch.as_tensor(fn(p.detach(), q.detach(), validate=False)).to(dt)
            return torch.where(valid, d, out)
        # The valid rows only (padding rows may hold anything), gathered by index: one nonzero
        # shared by both arguments and the scatter back (boolean indexing repeats it, 5x slower).
        idx = torch.nonzero(valid.reshape(-1)).squeeze(1)
        with _context(divergence, "rollout_topk_logprobs", "topk_logprobs",
                      " (indices count the valid tokens in row-major order)"):
            # flatten (not reshape(-1, K)): an empty K axis reaches the divergence's own check
            d = torch.as_tensor(fn(p.detach().flatten(0, 1).index_select(0, idx),
                                   q.detach().flatten(0, 1).index_select(0, idx))).to(dt)
        out.view(-1).index_copy_(0, idx, d)
    else:
        q = _check_extra(logits, "logits", lead, lp.device, divergence)
        p = _check_extra(rollout_logits, "rollout_logits", lead, lp.device, divergence)
        fn = trmath.tv if divergence == "exact_tv" else trmath.kl
        # validate=False: padding rows may hold anything (they give NaN and are selected out);
        # an invalid row at a valid position is caught below.
        with _context(divergence, "rollout_logits", "logits"):
            d = fn(p.detach(), q.detach(), temperature=temperature, validate=False).to(dt)
        bad = valid & torch.isnan(d)
        if validate and bool(bad.any()):
            flat = int(torch.nonzero(bad.reshape(-1))[0])
            raise ValueError(f"rollout_logits, logits: the row at valid position {_pos(flat, lead)} "
                             "contains NaN or +inf, or is entirely -inf")
        out = torch.where(valid, d, out)
    return out


def _check_finite_nan(d: torch.Tensor, valid: torch.Tensor, name: str) -> None:
    bad = valid & torch.isnan(d)
    if bool(bad.any()):
        flat = int(torch.nonzero(bad.reshape(-1))[0])
        raise ValueError(f"{name}: contains NaN at valid position {_pos(flat, tuple(d.shape))}")


def _deltas(divergence, delta, delta_low, delta_high) -> tuple[float, float]:
    if not isinstance(divergence, (str, torch.Tensor, np.ndarray)) or (
            isinstance(divergence, str) and divergence not in DPPO_DIVERGENCES):
        raise ValueError(f"divergence: unknown {divergence!r}; valid: {', '.join(DPPO_DIVERGENCES)} "
                         "(or a [B, T] tensor of precomputed values)")
    if isinstance(divergence, str) and divergence in DPPO_DIVERGENCES:
        default = DPPO_DIVERGENCES[divergence]["default_delta"]
    else:
        default = None
    base = default if delta is None else delta
    lo = base if delta_low is None else delta_low
    hi = base if delta_high is None else delta_high
    if lo is None or hi is None:
        raise ValueError("delta: required when divergence is a tensor (or give delta_low and delta_high)")
    return (_check_number(lo, "delta_low", allow_inf=True), _check_number(hi, "delta_high", allow_inf=True))


def _dppo_core(b: _Batch, divergence, delta, delta_low, delta_high, extras):
    dl, dh = _deltas(divergence, delta, delta_low, delta_high)
    r = torch.exp(b.lp.detach() - b.rollout)
    D = _divergence(divergence, b.lp, b.rollout, b.valid, dt=b.dtype, validate=b.validate, **extras)
    # A NaN divergence reaches here at a valid position only unvalidated (the token is then kept
    # and dppo_loss makes its loss NaN); +inf (KL with pi(i) = 0 < mu(i)) is a legitimate
    # "outside the region".
    drop = (b.pos & (r > 1) & (D > dh)) | (b.neg & (r < 1) & (D > dl))
    return b.valid & ~drop, r, D


def dppo_mask(
    logprob: Any,
    rollout_logprob: Any,
    advantages: Any,
    *,
    divergence: Any,
    delta: float | None = None,
    delta_low: float | None = None,
    delta_high: float | None = None,
    mask: Any = None,
    topk_logprobs: Any = None,
    rollout_topk_logprobs: Any = None,
    logits: Any = None,
    rollout_logits: Any = None,
    temperature: float = 1.0,
    return_divergence: bool = False,
    validate: bool = True,
) -> Any:
    r"""DPPO's keep-mask: ``True`` where a token keeps its gradient.

    .. math::

        M_t = 0 \iff (A_t > 0 \wedge r_t > 1 \wedge D_t > \delta_{\rm high})
        \ \vee\ (A_t < 0 \wedge r_t < 1 \wedge D_t > \delta_{\rm low}),
        \qquad r_t = \frac{\pi(a_t)}{\mu(a_t)},

    with :math:`D_t` a divergence between the rollout policy :math:`\mu` and the trained
    policy :math:`\pi` at position :math:`t` (anchored to the rollout, never to a recomputed
    old policy). Padding (``mask`` false) is ``False``. Only updates that *move further* out of
    the trust region in the advantage's direction are masked; a token outside the region whose
    update brings it back keeps its gradient. A token with :math:`A_t = 0` is kept (its loss and
    gradient are 0 either way; implementations that apply the :math:`A_t < 0` rule to it count
    it in ``masked_frac``). Everything here is detached.

    Parameters
    ----------
    logprob, rollout_logprob : shape ``[B, T]``
        :math:`\log\pi(a_t)`, :math:`\log\mu(a_t)`.
    advantages : shape ``[B, T]`` or ``[B]``
    divergence : str or tensor
        One of :data:`DPPO_DIVERGENCES` -- ``binary_tv``, ``binary_kl`` (from the two log-probs;
        ``trmath.binary_tv``, ``trmath.binary_kl``), ``topk_tv``, ``topk_kl`` (needs
        ``topk_logprobs`` and ``rollout_topk_logprobs``, ``[B, T, K]`` log-probs of the same
        token set under :math:`\pi` and :math:`\mu`), ``exact_tv``, ``exact_kl`` (needs ``logits``
        and ``rollout_logits``, ``[B, T, V]``; :math:`\mathrm{TV}(\mu,\pi)`,
        :math:`\mathrm{KL}(\mu\|\pi)` by :func:`trmath.tv`, :func:`trmath.kl`) -- or a ``[B, T]``
        tensor of precomputed :math:`D_t` (e.g. :math:`|r_t - 1|`, which recovers PPO's clip).
    delta : float, optional
        Both thresholds; default 0.15 for TV, 0.05 for KL (the DPPO paper's values).
    delta_low, delta_high : float, optional
        Override the threshold for :math:`A < 0` / :math:`A > 0`.
    mask : shape ``[B, T]``, optional
    temperature : float
        Sampling temperature for the exact divergences.
    return_divergence : bool
        Also return :math:`D_t` (0 at padding).
    validate : bool
        NaN/inf at valid positions raise :class:`ValueError`. ``False``: nothing raises (and
        nothing synchronises with the host, so the call compiles into one graph); a token whose
        divergence is NaN (a bad input) is kept and its divergence returned as NaN
        (:func:`dppo_loss` makes its loss NaN).

    Returns
    -------
    keep : bool, shape ``[B, T]``
        (and ``divergence`` if requested). numpy in, numpy out.

    Examples
    --------
    >>> import torch, trmath
    >>> z_mu = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    >>> z_pi = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.1, 0.0]]])
    >>> tok = torch.tensor([[1, 1]])
    >>> lp_pi, lp_mu = trmath.token_logprobs(z_pi, tok), trmath.token_logprobs(z_mu, tok)
    >>> trmath.dppo_mask(lp_pi, lp_mu, torch.tensor([1.0]), divergence="exact_tv", delta=0.15,
    ...                  logits=z_pi, rollout_logits=z_mu)
    tensor([[False,  True]])
    """
    back = (lambda t: t.numpy()) if isinstance(logprob, np.ndarray) else (lambda t: t)
    b = _prepare(logprob, rollout_logprob, advantages, mask, None, validate)
    extras = dict(topk_logprobs=topk_logprobs, rollout_topk_logprobs=rollout_topk_logprobs,
                  logits=logits, rollout_logits=rollout_logits, temperature=temperature)
    keep, _, D = _dppo_core(b, divergence, delta, delta_low, delta_high, extras)
    if return_divergence:
        return back(keep), back(D)
    return back(keep)


def dppo_loss(
    logprob: Any,
    rollout_logprob: Any,
    advantages: Any,
    mask: Any = None,
    *,
    divergence: Any = "binary_tv",
    delta: float | None = None,
    delta_low: float | None = None,
    delta_high: float | None = None,
    cap: float = math.inf,
    topk_logprobs: Any = None,
    rollout_topk_logprobs: Any = None,
    logits: Any = None,
    rollout_logits: Any = None,
    temperature: float = 1.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""DPPO: policy gradient with a divergence trust-region mask, anchored to the rollout policy.

    .. math::

        \ell_t = -A_t\,\operatorname{sg}\bigl(\min(r_t, C)\bigr)\,M_t\,\log\pi(a_t),
        \qquad \nabla\ell_t = -A_t \min(r_t, C)\,M_t\,\nabla\log\pi(a_t),

    :math:`r_t = \pi(a_t)/\mu(a_t)`, :math:`M_t` from :func:`dppo_mask`. The paper uses
    :math:`C = \infty` or 5, :math:`\delta_{\rm TV} \in \{0.15, 0.2\}`,
    :math:`\delta_{\rm KL} = 0.05`, :math:`K = 20`. The value is a surrogate (it contains
    :math:`\log\pi`); only its gradient is meaningful. Masked tokens are selected out.

    Parameters
    ----------
    logprob, rollout_logprob, advantages, mask
        As :func:`ppo_loss`.
    divergence, delta, delta_low, delta_high, topk_logprobs, rollout_topk_logprobs, logits, rollout_logits, temperature
        As :func:`dppo_mask`.
    cap : float
        The importance-sampling cap :math:`C \ge 1` (default ``inf``).
    **kwargs
        Common options, as :func:`ppo_loss`. ``old_logprob`` only feeds the mismatch
        diagnostics and MIS (the ratio is always against :math:`\mu`); ``is_correction="tis"``
        is refused because :math:`\min(r_t, C)` already truncates the full rollout ratio.

    Returns
    -------
    loss, metrics
        ``masked_frac`` (+ ``_pos``/``_neg``: among tokens with that advantage sign),
        ``divergence_mean``, ``divergence_max``, ``truncated_frac`` (:math:`r_t > C`), ratio
        statistics, mismatch diagnostics, counts.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([[-0.1, -3.0]], requires_grad=True)
    >>> mu = torch.tensor([[-1.0, -3.0]])
    >>> d = (lp.detach() - mu).exp().sub(1).abs()         # D = |r - 1|: PPO's region
    >>> loss, m = trmath.dppo_loss(lp, mu, torch.tensor([1.0]), divergence=d, delta=0.2,
    ...                            aggregation="seq-mean-token-sum")
    >>> float(m["masked_frac"])
    0.5
    >>> loss.backward(); lp.grad                         # -A * min(r, C) * M
    tensor([[-0., -1.]])
    """
    kw = _split_kwargs(kwargs, ())
    if kw.get("is_correction") == "tis":
        raise ValueError("is_correction: 'tis' does not compose with dppo, whose ratio is already "
                         "pi/mu truncated at cap; use cap=..., or is_correction='mis'")
    C = _check_number(cap, "cap", lo=1.0, allow_inf=True)
    b = _prepare(logprob, rollout_logprob, advantages, mask, kw.get("old_logprob"), kw.get("validate", True))
    extras = dict(topk_logprobs=topk_logprobs, rollout_topk_logprobs=rollout_topk_logprobs,
                  logits=logits, rollout_logits=rollout_logits, temperature=temperature)
    keep, r, D = _dppo_core(b, divergence, delta, delta_low, delta_high, extras)
    w = torch.clamp(r, max=C)
    zero = torch.zeros((), dtype=b.dtype, device=b.lp.device)
    loss = torch.where(keep, -b.adv * w * b.lp, zero)
    if not b.validate:
        # an unvalidated NaN divergence at a valid token: that token's loss (and its gradient)
        # is NaN -- times NaN, not a selection, so it cannot vanish into a finite loss
        loss = loss * torch.where(b.valid & torch.isnan(D), math.nan, 1.0).to(loss.dtype)
    metrics: dict[str, torch.Tensor] = {}
    _sign_split(metrics, "masked_frac", b.valid & ~keep, b)
    metrics["divergence_mean"] = _mean(D, b.valid, b.count("valid"))
    metrics["divergence_max"] = _max(D, b.valid, b.count("valid"))
    metrics["truncated_frac"] = _frac(torch.count_nonzero((r > C) & b.valid), b.count("valid"), b.dtype)
    _ratio_stats(metrics, r, b)
    return _finish(loss, keep, b, metrics, **_finish_kw(kw))


def _troll_loss(logprob, rollout_logprob, advantages, mask=None, **options):
    """The registry's entry for :func:`trmath.troll_loss` (imported on use: the projections
    module builds on this one)."""
    from .projections import troll_loss

    return troll_loss(logprob, rollout_logprob, advantages, mask, **options)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ObjectiveInfo:
    """Metadata of a registered objective (see :data:`OBJECTIVES`).

    Attributes
    ----------
    name : str
    fn : callable
        ``fn(logprob, rollout_logprob, advantages, mask=None, **options) -> (loss, metrics)``.
    summary : str
    loss : str
        The per-token loss, in words/ASCII maths.
    gradient : str
        The documented gradient form (what the tests check against autograd).
    ratio : str
        ``"token"``, ``"sequence"`` (one ratio per sequence) -- which importance ratio.
    anchor : str
        ``"old"`` (``old_logprob``, else the rollout) or ``"rollout"`` (always :math:`\\mu`).
    level : str
        ``"token"`` or ``"sequence"``: where clipping/masking decisions are taken.
    limits : str
        What is clipped, masked or gated.
    needs : tuple of str
        Keyword inputs required beyond the log-probs whatever the options; see
        the method ``required_inputs(**config)`` for those that depend on an option (DPPO's
        ``divergence``).
    defaults : dict
        Default hyper-parameters.
    reference : str
    """

    name: str
    fn: Callable[..., Any]
    summary: str
    loss: str
    gradient: str
    ratio: str
    anchor: str
    level: str
    limits: str
    needs: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    reference: str = ""

    def required_inputs(self, **config: Any) -> tuple[str, ...]:
        """The keyword inputs a call with ``config`` needs (top-K log-probs, full logits).

        Examples
        --------
        >>> import trmath
        >>> trmath.get_objective("dppo").required_inputs(divergence="exact_kl")
        ('logits', 'rollout_logits')
        >>> trmath.get_objective("ppo").required_inputs()
        ()
        """
        if self.name != "dppo":
            return tuple(self.needs)
        d = config.get("divergence", self.defaults.get("divergence"))
        if isinstance(d, str):
            if d not in DPPO_DIVERGENCES:
                raise ValueError(f"divergence: unknown {d!r}; valid: {', '.join(DPPO_DIVERGENCES)}")
            return tuple(DPPO_DIVERGENCES[d]["needs"])
        return ()


OBJECTIVES: Mapping[str, ObjectiveInfo] = {
    o.name: o
    for o in (
        ObjectiveInfo(
            "ppo", ppo_loss, "PPO clipped surrogate, asymmetric clip (clip-higher)",
            "-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)",
            "-A * r * grad log pi where unclipped, else 0", "token", "old", "token",
            "gradient zeroed when r leaves [1-eps_low, 1+eps_high] in the advantage's direction",
            (), {"eps_low": 0.2, "eps_high": None, "clip_ratio_c": None},
            "Schulman et al. 2017; Yu et al. 2025 (DAPO, clip-higher 0.2/0.28)"),
        ObjectiveInfo(
            "dual_clip", dual_clip_loss, "PPO with the dual clip for negative advantages",
            "ppo, and min(., -c*A) for A < 0", "ppo's, and 0 where A < 0 and r > c",
            "token", "old", "token", "as ppo, plus r > c for A < 0",
            (), {"eps_low": 0.2, "eps_high": None, "clip_ratio_c": 3.0}, "Ye et al. 2020"),
        ObjectiveInfo(
            "cispo", cispo_loss, "clipped, detached importance weight on every token",
            "-sg(clip(r, 1-eps_low, 1+eps_high)) * A * log pi",
            "-clip(r) * A * grad log pi", "token", "old", "token",
            "the weight is clipped; no token loses its gradient",
            (), {"eps_low": None, "eps_high": 0.28}, "MiniMax-M1, 2025"),
        ObjectiveInfo(
            "gspo", gspo_loss, "PPO clip on the length-normalised sequence ratio",
            "-min(s*A, clip(s)*A), s = exp(mean_t log r_t) (token form)",
            "-A * s / n * grad log pi per token, 0 for a clipped sequence",
            "sequence", "old", "sequence", "whole sequences clipped",
            (), {"eps_low": 3e-4, "eps_high": 4e-4}, "Zheng et al. 2025 (GSPO)"),
        ObjectiveInfo(
            "sapo", sapo_loss, "soft, temperature-controlled gate instead of a hard clip",
            "-A * (4/tau) * sigmoid(tau * (r - 1))",
            "-A * r * sech^2(tau * (r - 1) / 2) * grad log pi", "token", "old", "token",
            "gradient smoothly gated (tau_pos for A > 0, tau_neg otherwise)",
            (), {"tau_pos": 1.0, "tau_neg": 1.05}, "Gao et al. 2025 (SAPO)"),
        ObjectiveInfo(
            "dppo", dppo_loss, "divergence trust-region mask anchored to the rollout policy",
            "-A * sg(min(r, C)) * M * log pi, r = pi/mu",
            "-A * min(r, C) * M * grad log pi", "token", "rollout", "token",
            "tokens masked when D(mu, pi) > delta and the update moves further out",
            (),
            {"divergence": "binary_tv", "delta": None, "cap": math.inf},
            "DPPO (divergence proximal policy optimisation): Rethinking the Trust Region in "
            "LLM Reinforcement Learning, arXiv:2602.04879, 2026"),
        ObjectiveInfo(
            "troll", _troll_loss, "policy projected onto the KL ball around the rollout policy (TROLL)",
            "-A * pi~(a)/mu(a) + alpha * KL(pi || sg pi~), pi~ = project_kl(pi, mu, epsilon)",
            "through the projection (implicit d eta / d logits) + alpha * grad KL(pi || sg pi~)",
            "token", "rollout", "token",
            "the ratio is taken on the projected policy; no token loses its gradient",
            ("logits", "rollout_logits", "tokens"), {"epsilon": 0.05, "alpha": 1.0},
            "TROLL: trust region optimisation with a differentiable KL projection, 2025"),
    )
}


def get_objective(name: str) -> ObjectiveInfo:
    """Look up a registered objective by name.

    Parameters
    ----------
    name : str
        One of the keys of :data:`OBJECTIVES`.

    Returns
    -------
    ObjectiveInfo

    Raises
    ------
    ValueError
        For an unknown name, listing the valid ones.

    Examples
    --------
    >>> import trmath
    >>> trmath.get_objective("cispo").gradient
    '-clip(r) * A * grad log pi'
    >>> sorted(trmath.OBJECTIVES)
    ['cispo', 'dppo', 'dual_clip', 'gspo', 'ppo', 'sapo', 'troll']
    """
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ValueError(f"objective: unknown name {name!r}; valid names: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def policy_loss(
    name: str,
    logprob: Any,
    rollout_logprob: Any,
    advantages: Any,
    mask: Any = None,
    **config: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Compute the loss of the objective registered as ``name``: one entry point for trainers.

    Parameters
    ----------
    name : str
        A key of :data:`OBJECTIVES` (``ppo``, ``dual_clip``, ``cispo``, ``gspo``, ``sapo``,
        ``dppo``, ``troll``).
    logprob, rollout_logprob, advantages, mask
        As :func:`ppo_loss`.
    **config
        The objective's own hyper-parameters and extra inputs (e.g. ``eps_high=``,
        ``divergence=``, ``rollout_logits=``) and the common options (``old_logprob=``,
        ``aggregation=``, ``normalizer=``, ``is_correction=``, ...). An option the objective does
        not take raises :class:`TypeError`.

    Returns
    -------
    loss, metrics
        As the objective's function.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    >>> mu = torch.tensor([[-1.1, -2.0, -0.4]])
    >>> loss, m = trmath.policy_loss("ppo", lp, mu, torch.tensor([1.0]), eps_high=0.28)
    >>> loss.backward()
    >>> sorted(k for k in m if k.startswith("clip"))
    ['clip_frac', 'clip_frac_neg', 'clip_frac_pos']
    """
    return get_objective(name).fn(logprob, rollout_logprob, advantages, mask, **config)
