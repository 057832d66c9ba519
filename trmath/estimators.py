r"""Sampled (Monte Carlo) KL estimators, the Rao--Blackwellized sequence KL, and their registry.

A trainer that only has the log-probabilities of the *sampled* tokens estimates a KL divergence
from them. With :math:`x \sim s` (the *sampler*), :math:`o` the other policy and the log-ratio
:math:`\ell = \log o(x) - \log s(x)`:

.. math::

    k_1 = -\ell, \qquad k_2 = \tfrac12 \ell^2, \qquad k_3 = (e^{\ell} - 1) - \ell

all estimate :math:`\mathrm{KL}(s\|o)`. They differ in bias, variance and -- the point most
often missed -- in the *gradient* their expectation has when they are placed in a loss
(:math:`\mathbb E[\nabla k_1] = 0`,
:math:`\mathbb E[\nabla k_2] = \nabla\mathrm{KL}(\pi_\theta\|o)`,
:math:`\mathbb E[\nabla k_3] = \nabla\mathrm{KL}(o\|\pi_\theta)`, the *forward* KL). Every
estimator is registered with that metadata (:data:`~trmath.ESTIMATORS`,
:func:`~trmath.get_estimator`); the
claims are proved by exact enumeration with :mod:`trmath.testing.expectation`. See
:doc:`/theory/estimators`.

Conventions of all token-level estimators:

* inputs are log-probabilities (not logits) of the sampled tokens, ``[...]``, torch tensors or
  numpy arrays (numpy in, numpy out), float16, bfloat16, float32 or float64;
* all inputs must have the **same shape** -- no broadcasting (a silent ``[B, T]`` against
  ``[B, T, 1]`` broadcast is a classic bug); mixed dtypes are promoted;
* the result is float32 for 16/32-bit inputs and float64 for float64 inputs, computed in
  float64 inside, accurate to a few ulps of the result type on the exact values the inputs
  represent, for :math:`|\ell|` from ``1e-30`` to ``80``;
* ``mask`` (optional, boolean, same shape): masked entries give 0 and a zero gradient and are
  not validated (padding may hold anything);
* no hidden clamps; ``clamp=(lo, hi)`` is opt-in and also returns the clamped fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch

from . import _estimators_impl as _impl
from ._validation import as_tensor, check_pair, check_temperature, from_numpy

__all__ = [
    "ESTIMATORS",
    "LOGPROB_TOLERANCE",
    "ClampedEstimate",
    "EstimatorInfo",
    "RBKL",
    "get_estimator",
    "k1",
    "k2",
    "k3",
    "kl_estimate",
    "rb_kl",
]

#: A log-probability above ``0`` by more than this (by input dtype) raises ``ValueError``;
#: smaller positive values are rounding (a log-softmax of logits of magnitude ~10 rounds
#: ``log p`` for ``p`` near 1 by a few ulps of 10) and are used as given.
LOGPROB_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.bfloat16: 0.25,
    torch.float16: 0.05,
}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The tolerances as the comparison ``t > tol`` of _check_logprob sees them (rounded to t's dtype),
# for validation inside the estimator kernel.
_TOL_IN_DTYPE = {d: float(torch.tensor(v, dtype=d)) for d, v in LOGPROB_TOLERANCE.items()}


class ClampedEstimate(NamedTuple):
    """Result of an estimator called with ``clamp=(lo, hi)``."""

    #: The clamped estimates (zero gradient where clamped).
    value: Any
    #: Fraction of the (unmasked) entries whose estimate fell outside ``[lo, hi]``, 0-d.
    clamped_fraction: Any


class RBKL(NamedTuple):
    """Result of :func:`rb_kl`."""

    #: Per-sequence KL estimate :math:`\sum_n \mathrm{KL}_n` over valid positions, ``[...]``.
    kl: Any
    #: Surrogate whose gradient is the unbiased sequence-KL gradient; equal in value to ``kl``.
    loss: Any
    #: :math:`\mathrm{KL}_n` per position, ``[..., T]`` (0 at masked positions).
    per_position: Any


# --------------------------------------------------------------------------------------------
# validation


def _index(flat: int, shape: tuple[int, ...]) -> str:
    if len(shape) <= 1:
        return f"index {flat}"
    return f"index {tuple(int(i) for i in np.unravel_index(flat, shape))}"


def _first(bad: torch.Tensor) -> Optional[int]:
    idx = torch.nonzero(bad.reshape(-1))
    return None if idx.numel() == 0 else int(idx[0, 0])


def _check_logprob(t: torch.Tensor, name: str, valid: Optional[torch.Tensor],
                   sampled_from: bool) -> None:
    """NaN, ``+inf`` or values above the rounding tolerance raise; so does ``-inf`` for a
    distribution the token was drawn from (or whose ratio weights it)."""
    with torch.no_grad():
        tol = LOGPROB_TOLERANCE[t.dtype]
        checks = [(torch.isnan(t), "contains NaN"),
                  (t > tol, "is a log-probability above 0 (beyond the rounding tolerance "
                            f"{tol:g})")]
        if sampled_from:
            checks.append((t == -math.inf, "is -inf (probability 0 for a sampled token)"))
        for bad, what in checks:
            if valid is not None:
                bad = bad & valid
            i = _first(bad)
            if i is not None:
                v = float(t.reshape(-1)[i])
                where = _index(i, tuple(t.shape))
                raise ValueError(f"{name}: entry at {where} {what} (value {v!r})")


def _validate(args, tensors, valid) -> None:
    """The value checks of the inputs (the sampler's and the behaviour's log-probabilities may
    not be ``-inf``; the other policy's may); raises for the first bad entry."""
    for i, t in enumerate(tensors):
        _check_logprob(t, args[i][1], valid, sampled_from=(i != 1))


def _prepare(args: list[tuple[Any, str]], mask: Any):
    """Tensors of the inputs (checked dtypes and shapes), the boolean mask, the output dtype and
    the converter back to the caller's type. The values are checked by the estimator's own pass
    (and :func:`_validate` where it flags one)."""
    tensors = []
    back = None
    for x, name in args:
        t, b = as_tensor(x, name)
        if back is None:
            back = b
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name}: expected a floating dtype (float16, bfloat16, float32, "
                            f"float64), got {t.dtype}")
        tensors.append(t)
    t0, n0 = tensors[0], args[0][1]
    for t, (_, name) in zip(tensors[1:], args[1:]):
        if t.shape != t0.shape:
            raise ValueError(f"{n0} and {name}: shapes differ ({tuple(t0.shape)} vs "
                             f"{tuple(t.shape)}); estimator inputs are not broadcast")
        if t.device != t0.device:
            raise ValueError(f"{n0} and {name}: tensors are on different devices "
                             f"({t0.device}, {t.device})")
    valid = None
    if mask is not None:
        m = mask if isinstance(mask, torch.Tensor) else from_numpy(mask, "mask")
        if m.dtype != torch.bool:
            if m.is_floating_point() or m.is_complex():
                raise TypeError(f"mask: expected a boolean (or 0/1 integer) mask, got {m.dtype}")
            if bool(((m != 0) & (m != 1)).any()):
                raise ValueError("mask: integer masks must hold only 0 and 1")
            m = m != 0
        if tuple(m.shape) != tuple(t0.shape):
            raise ValueError(f"mask: expected shape {tuple(t0.shape)}, got {tuple(m.shape)}")
        valid = m.to(t0.device)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return tensors, valid, out_dtype, back


def _check_clamp(clamp: Any) -> Optional[tuple[float, float]]:
    if clamp is None:
        return None
    try:
        lo, hi = (float(clamp[0]), float(clamp[1])) if len(clamp) == 2 else (None, None)
    except (TypeError, ValueError):
        raise TypeError(f"clamp: expected a pair (lo, hi) of numbers, got {clamp!r}") from None
    if lo is None or math.isnan(lo) or math.isnan(hi) or not lo <= hi:
        raise ValueError(f"clamp: expected (lo, hi) with lo <= hi, got {clamp!r}")
    return lo, hi


# --------------------------------------------------------------------------------------------
# token-level estimators

_KIND = {"k1": 1, "k2": 2, "k3": 3}


def _estimate(kind: str, sampler_logprob, other_logprob, behaviour_logprob, straight_through,
              mask, clamp, validate):
    args = [(sampler_logprob, "sampler_logprob"), (other_logprob, "other_logprob")]
    if behaviour_logprob is not None:
        args.append((behaviour_logprob, "behaviour_logprob"))
    bounds = _check_clamp(clamp)
    if not isinstance(straight_through, bool):
        raise TypeError(f"straight_through: expected a bool, got {type(straight_through).__name__}")
    if straight_through and behaviour_logprob is not None:
        raise ValueError("straight_through: only defined on-policy (without behaviour_logprob); "
                         "the importance-weighted estimators carry their own unbiased gradient")
    # Validation happens in the estimator's own pass (below); a flagged entry is then found and
    # named by _validate (on other devices the pass always flags, and _validate does it all).
    tensors, valid, out_dtype, back = _prepare(args, mask)
    kv = _KIND[kind]
    sk = 2 if straight_through else kv
    check = None
    if validate:
        check = tuple(_TOL_IN_DTYPE[tensors[i].dtype] if i < len(tensors) else 0.0 for i in range(3))
    # One pass over the inputs (trmath::k_fwd: the C++ element kernel on CPU): the log-ratio as
    # an exact two-sum, the estimator (times w = exp(s - b) off-policy) in float64, rounded once;
    # s = +-inf, o = +inf, b = +-inf and NaN give NaN (validation rejects them first when it
    # runs), padding gives 0. The backward recomputes the slope from the inputs.
    b = tensors[2] if len(tensors) == 3 else None
    val, flagged = _impl.k_estimate(tensors[0], tensors[1], b, valid, kv, sk,
                                    out_dtype == torch.float64, check)
    if flagged:
        _validate(args, tensors, valid)
    out = val.to(out_dtype)
    if bounds is None:
        return back(out)
    lo_b, hi_b = bounds
    with torch.no_grad():
        outside = (out < lo_b) | (out > hi_b)
        if valid is not None:
            outside = outside & valid
            n = valid.sum().clamp_min(1)
        else:
            n = max(out.numel(), 1)
        frac = (outside.sum().to(torch.float64) / n).to(out.dtype)
    return ClampedEstimate(back(out.clamp(lo_b, hi_b)), back(frac))


_COMMON_DOC = r"""
    Parameters
    ----------
    sampler_logprob : torch.Tensor or numpy.ndarray, shape ``[...]``
        :math:`\log s(x)` of the sampled tokens under the sampler (on-policy: the trained
        policy :math:`\pi_\theta`; off-policy: :math:`\log\pi_\theta(x)` of tokens drawn from
        the behaviour :math:`\mu`).
    other_logprob : same shape
        :math:`\log o(x)` under the other policy (e.g. the reference model). ``-inf`` is allowed
        (the estimate is then ``+inf``, as is the KL).
    behaviour_logprob : same shape, optional
        :math:`\log\mu(x)` of the behaviour policy the tokens were drawn from. When given, the
        estimate is importance weighted, :math:`w\,k` with :math:`w = \pi_\theta(x)/\mu(x)`
        (differentiable through :math:`w`).
    straight_through : bool, optional
        If true, the value of this estimator with the gradient of :math:`k_2` (on-policy only:
        together with ``behaviour_logprob`` it raises :class:`ValueError`).
    mask : boolean tensor or array, same shape, optional
        False entries give 0 with a zero gradient and are not validated.
    clamp : (float, float), optional
        Opt-in output clamp; then a :class:`ClampedEstimate` ``(value, clamped_fraction)`` is
        returned. Clamped entries have zero gradient -- which is why no clamp is the default.
    validate : bool, optional
        If true (default), NaN, ``+inf``, a log-probability above
        :data:`LOGPROB_TOLERANCE`, or ``-inf`` in ``sampler_logprob`` or ``behaviour_logprob``
        raise :class:`ValueError` naming the argument and the first bad index. If false, NaN
        and such infinite entries give NaN (also through ``clamp``), never a number.

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape ``[...]``
        float32 for 16/32-bit inputs, float64 for float64 inputs; a :class:`ClampedEstimate`
        if ``clamp`` is given.

    Raises
    ------
    ValueError
        Shapes differ, or invalid values (see ``validate``).
    TypeError
        A non-floating input, or a non-boolean ``mask``.
"""


def k1(sampler_logprob: Any, other_logprob: Any, *, behaviour_logprob: Any = None,
       straight_through: bool = False, mask: Any = None, clamp: Any = None,
       validate: bool = True) -> Any:
    r"""The naive estimator :math:`k_1 = \log s(x) - \log o(x)` of :math:`\mathrm{KL}(s\|o)`.

    .. math::

        k_1 = -\ell, \qquad \ell = \log o(x) - \log s(x), \qquad
        \mathbb E_{x\sim s}[k_1] = \mathrm{KL}(s\|o).

    Unbiased, high variance, often negative. In a loss its expected gradient is **zero**
    (:math:`\nabla k_1 = \nabla\log\pi_\theta` has mean 0); use it as a detached reward
    penalty, where :math:`\mathbb E[k_1\nabla\log\pi_\theta] = \nabla\mathrm{KL}(\pi_\theta\|o)`,
    or importance weighted (``behaviour_logprob``), where :math:`\nabla(w k_1)` is unbiased for
    :math:`\nabla\mathrm{KL}(\pi_\theta\|o)`.
    """ + _COMMON_DOC + r"""
    Examples
    --------
    >>> import torch, trmath
    >>> trmath.k1(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]))
    tensor([ 0.5000, -1.0000])
    """
    return _estimate("k1", sampler_logprob, other_logprob, behaviour_logprob, straight_through,
                     mask, clamp, validate)


def k2(sampler_logprob: Any, other_logprob: Any, *, behaviour_logprob: Any = None,
       straight_through: bool = False, mask: Any = None, clamp: Any = None,
       validate: bool = True) -> Any:
    r"""The squared log-ratio :math:`k_2 = \tfrac12 \ell^2`, a biased estimator of the KL.

    .. math::

        k_2 = \tfrac12 \ell^2 \ge 0, \qquad
        \mathbb E_{x\sim s}[k_2] = \mathrm{KL}(s\|o) + O(\|\log o - \log s\|^3).

    Its *value* is biased (it is an f-divergence with :math:`f(u) = \tfrac12\log^2 u`, which
    agrees with KL to second order only), but in a loss its expected gradient is exactly the
    reverse KL's, :math:`\mathbb E[\nabla k_2] = \nabla\mathrm{KL}(\pi_\theta\|o)`. Off-policy,
    :math:`w k_2` is **not** unbiased, for the value or the gradient. With ``straight_through``
    it is unchanged.
    """ + _COMMON_DOC + r"""
    Examples
    --------
    >>> import torch, trmath
    >>> trmath.k2(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]))
    tensor([0.1250, 0.5000])
    """
    return _estimate("k2", sampler_logprob, other_logprob, behaviour_logprob, straight_through,
                     mask, clamp, validate)


def k3(sampler_logprob: Any, other_logprob: Any, *, behaviour_logprob: Any = None,
       straight_through: bool = False, mask: Any = None, clamp: Any = None,
       validate: bool = True) -> Any:
    r"""The unbiased non-negative estimator :math:`k_3 = \operatorname{expm1}(\ell) - \ell`.

    .. math::

        k_3 = (e^{\ell} - 1) - \ell \ge 0, \qquad
        \mathbb E_{x\sim s}[k_3] = \mathrm{KL}(s\|o)
        \quad\text{(since } \mathbb E_s[e^{\ell}] = 1\text{ when } o \ll s\text{)}.

    Computed without cancellation: a Taylor series :math:`\ell^2\sum_j \ell^j/(j+2)!` for
    :math:`-1.6 \le \ell \le 1`, ``expm1(l) - l`` elsewhere, in float64 on the exact log-ratio
    (a two-sum) -- a few ulps for every :math:`|\ell|` from ``1e-30`` to ``80``. The textbook
    ``exp(l) - 1 - l`` in float32 returns 0 or negative values for :math:`|\ell| < 10^{-3}`.
    The gradient is :math:`\operatorname{expm1}(\ell)\,\nabla\ell`. A float32 result
    overflows to ``+inf`` (the correct rounding) only for :math:`\ell > 88.7`.

    In a loss, :math:`\mathbb E[\nabla k_3] = \nabla\mathrm{KL}(o\|\pi_\theta)`, the gradient of
    the **forward** KL, not of the reverse KL the value estimates. Importance weighted
    (``behaviour_logprob``) both the value and the gradient of :math:`w k_3` are unbiased for
    the reverse KL :math:`\mathrm{KL}(\pi_\theta\|o)`. ``straight_through=True`` keeps the value
    and takes :math:`k_2`'s gradient (the reverse KL's).

    A sampler truncated to a support :math:`S` (top-k, top-p) breaks
    :math:`\mathbb E_s[e^\ell] = 1`: :math:`\mathbb E_s[k_3] = \mathrm{KL}(s\|o) - o(\bar S)`.
    """ + _COMMON_DOC + r"""
    Examples
    --------
    >>> import torch, trmath
    >>> trmath.k3(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]))
    tensor([0.1065, 0.7183])
    >>> lr = torch.tensor(-1e-5)        # float32 exp(l) - 1 - l is negative here
    >>> float(torch.exp(lr) - 1 - lr), float(trmath.k3(torch.tensor(0.0), lr))
    (-1.358057488687...e-08, 4.99998306646...e-11)
    """
    return _estimate("k3", sampler_logprob, other_logprob, behaviour_logprob, straight_through,
                     mask, clamp, validate)


# --------------------------------------------------------------------------------------------
# Rao-Blackwellized sequence KL


def rb_kl(p_logits: Any, q_logits: Any, tokens: Any, mask: Any = None, *,
          temperature: float = 1.0) -> RBKL:
    r"""Rao--Blackwellized estimate of the sequence KL, with its unbiased surrogate loss.

    For a sequence :math:`y \sim P` sampled from the policy :math:`p`,

    .. math::

        \widehat{\mathrm{KL}}(y) = \sum_{n\ \mathrm{valid}} \mathrm{KL}_n, \qquad
        \mathrm{KL}_n = \mathrm{KL}\bigl(p(\cdot|y_{<n})\,\|\,q(\cdot|y_{<n})\bigr)

    with the exact per-position KL of :func:`trmath.kl` (Amini et al. 2025). It is unbiased for
    the sequence KL :math:`\sum_y P(y)\log\frac{P(y)}{Q(y)}` and never negative. The returned
    ``loss`` equals ``kl`` in value and has the unbiased gradient

    .. math::

        \nabla \mathcal L = \sum_n \nabla\mathrm{KL}_n
        + \sum_n \nabla\log p(y_n|y_{<n}) \sum_{m>n} \mathrm{KL}_m ,

    the future KLs :math:`\mathrm{KL}_m` detached in the score-function weight. Gradients reach
    ``p_logits`` and ``q_logits``.

    Parameters
    ----------
    p_logits, q_logits : torch.Tensor or numpy.ndarray, shape ``[..., T, V]``
        Logits of the sampling policy :math:`p` (trained) and of :math:`q`, at each position
        (numpy in, numpy out; the surrogate ``loss`` is useful with torch tensors).
    tokens : integer tensor or array, shape ``[..., T]``
        The sampled sequence (entries at masked positions are ignored, e.g. ``-100``).
    mask : boolean tensor, shape ``[..., T]``, optional
        True at valid (response) positions. Masked rows are *selected out* before any
        arithmetic, so padding holding ``-inf`` or NaN logits cannot produce NaN.
    temperature : float, optional
        The temperature the tokens were sampled at (both policies are scored at it).

    Returns
    -------
    RBKL
        ``(kl [...], loss [...], per_position [..., T])``; float32 for 16/32-bit logits,
        float64 for float64.

    Notes
    -----
    The Rao--Blackwellized term :math:`\mathrm{KL}_n = \mathbb E[k_1 \text{ at } n\,|\,y_{<n}]`
    has *per position* a variance no larger than the sampled :math:`k_1` term. The variance of
    the whole-sequence sum can nevertheless be **larger** than that of :math:`\sum_n k_1`,
    because the sampled terms of different positions can be negatively correlated and cancel;
    see :doc:`/theory/estimators` for a concrete tree. With a mask the valid rows are gathered
    (a copy of those rows) before the exact KL is taken.

    Examples
    --------
    >>> import torch, trmath
    >>> p = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    >>> q = torch.zeros(1, 3, 2)
    >>> res = trmath.rb_kl(p, q, torch.tensor([[1, 0, -100]]), torch.tensor([[True, True, False]]))
    >>> bool(torch.allclose(res.kl, trmath.kl(p[0, :2], q[0, :2]).sum()))
    True
    >>> res.loss.sum().backward()
    >>> p.grad[0, 2]                                    # the masked position gets no gradient
    tensor([0., 0.])
    """
    from .exact import kl as _kl, token_logprobs as _tlp

    z, back = as_tensor(p_logits, "p_logits")
    w, _ = as_tensor(q_logits, "q_logits")
    z, w = check_pair(z, w, "p_logits", "q_logits")
    if z.dim() < 2:
        raise ValueError(f"p_logits: expected shape [..., T, V], got {tuple(z.shape)}")
    T = check_temperature(temperature)
    lead = tuple(z.shape[:-1])
    if isinstance(tokens, np.ndarray):
        tokens = from_numpy(tokens, "tokens")
    if (not isinstance(tokens, torch.Tensor) or tokens.dtype == torch.bool
            or tokens.is_floating_point()):
        raise TypeError(f"tokens: expected an integer torch.Tensor or numpy array, got "
                        f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tuple(tokens.shape) != lead:
        raise ValueError(f"tokens: expected shape {lead} (the logits' leading axes), "
                         f"got {tuple(tokens.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            mask = from_numpy(mask, "mask")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or bool(((mask != 0) & (mask != 1)).any()):
                raise TypeError(f"mask: expected a boolean (or 0/1 integer) mask, got {mask.dtype}")
            mask = mask != 0
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask: expected shape {lead}, got {tuple(mask.shape)}")
        mask = mask.to(z.device)
    out_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    if mask is None or bool(mask.all()):
        kl_pos = _kl(z, w, temperature=T).to(torch.float64)
        lp = _tlp(z, tokens.to(z.device), temperature=T).to(torch.float64)
    else:  # gather the valid rows: padding never enters any arithmetic
        zv, wv = z[mask], w[mask]
        if zv.shape[0] == 0:  # no valid position: an empty sum keeps the graph, no kernel call
            kl_v = lp_v = zv.sum(-1).to(torch.float64)
        else:
            kl_v = _kl(zv, wv, temperature=T).to(torch.float64)
            lp_v = _tlp(zv, tokens.to(z.device)[mask], temperature=T).to(torch.float64)
        zero = torch.zeros(lead, dtype=torch.float64, device=z.device)
        kl_pos = zero.masked_scatter(mask, kl_v)
        lp = zero.masked_scatter(mask, lp_v)
    total = kl_pos.sum(-1)
    # future_n = sum_{m > n} KL_m as an exclusive reverse cumulative sum (no subtraction)
    with torch.no_grad():
        rev = torch.flip(torch.cumsum(torch.flip(kl_pos.detach(), [-1]), -1), [-1])
        future = torch.cat([rev[..., 1:], torch.zeros_like(rev[..., :1])], -1)
    score = (lp - lp.detach()) * future  # value exactly 0; gradient grad log p * future
    loss = total + score.sum(-1)
    return RBKL(back(total.to(out_dtype)), back(loss.to(out_dtype)), back(kl_pos.to(out_dtype)))


# --------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class EstimatorInfo:
    r"""What a registered estimator estimates, and what its gradient is.

    The gradient claims use :math:`\pi_\theta` for the trained policy (the distribution of
    ``sampler_logprob``) and :math:`o` for the other policy, held fixed. ``loss_gradient`` is
    :math:`\mathbb E[\nabla_\theta\,\mathrm{est}]` with the draws held fixed (the estimator
    placed in the loss); ``reward_gradient`` is
    :math:`\mathbb E[\mathrm{sg}(\mathrm{est})\,\nabla_\theta\log\pi_\theta(x)]` (the estimator as
    a detached per-token reward penalty, on-policy). ``None`` means: not the gradient of any
    KL (biased). Every claim is checked by exact enumeration in the test suite.
    """

    #: Registry name, e.g. ``"k3_is"``.
    name: str
    #: The formula, in plain text.
    formula: str
    #: The divergence its value estimates (``"KL(pi||o)"``: the reverse KL of the sampler's
    #: policy; ``"KL(P||Q) (sequence)"`` for the sequence estimator).
    estimates: str
    #: Whether ``E[value]`` equals that divergence exactly.
    value_unbiased: bool
    #: Whether every sample is ``>= 0``.
    nonnegative: bool
    #: ``E[grad est]`` with the draws fixed: ``"0"``, ``"grad KL(pi||o)"``,
    #: ``"grad KL(o||pi)"``, ``"grad KL(P||Q)"``, or ``None`` (no KL's gradient).
    loss_gradient: Optional[str]
    #: ``E[sg(est) grad log pi]`` on-policy: ``"grad KL(pi||o)"`` or ``None``.
    reward_gradient: Optional[str]
    #: ``"on-policy"`` (draws from the trained policy) or ``"off-policy"`` (draws from a
    #: behaviour policy, importance weighted).
    sampling: str
    #: Where it belongs: ``"reward"``, ``"loss"``, ``"metric"`` (value only) or ``"none"``.
    placement: str
    #: ``"token"`` (log-probabilities of sampled tokens) or ``"sequence"`` (:func:`rb_kl`).
    level: str
    #: Straight-through variant (the value of one estimator, the gradient of ``k2``).
    straight_through: bool
    #: Caveats in one sentence.
    notes: str
    #: The callable (``fn(sampler_logprob, other_logprob[, behaviour_logprob])`` for the
    #: token-level estimators; :func:`rb_kl` for the sequence one).
    fn: Callable[..., Any] = field(repr=False, compare=False)


def _token_fn(base: Callable[..., Any], off: bool, st: bool) -> Callable[..., Any]:
    if off:
        def fn(sampler_logprob, other_logprob, behaviour_logprob, **kw):
            return base(sampler_logprob, other_logprob, behaviour_logprob=behaviour_logprob,
                        straight_through=st, **kw)
    else:
        def fn(sampler_logprob, other_logprob, **kw):
            return base(sampler_logprob, other_logprob, straight_through=st, **kw)
    return fn


def _entries() -> dict[str, EstimatorInfo]:
    R, F = "grad KL(pi||o)", "grad KL(o||pi)"
    rows = [
        # name, base, off, st, formula, unbiased, nonneg, loss_grad, reward_grad, placement, notes
        ("k1", k1, False, False, "-l", True, False, "0", R, "reward",
         "unbiased but high variance and often negative; its loss gradient has mean zero"),
        ("k2", k2, False, False, "l^2/2", False, True, R, None, "loss",
         "biased value (KL to second order); in the loss its gradient is the reverse KL's"),
        ("k3", k3, False, False, "expm1(l) - l", True, True, F, None, "metric",
         "unbiased, low variance near o = pi; in the loss it regularises the FORWARD KL"),
        ("k1_st", k1, False, True, "-l (gradient of l^2/2)", True, False, R, R, "loss",
         "value of k1, gradient of k2"),
        ("k3_st", k3, False, True, "expm1(l) - l (gradient of l^2/2)", True, True, R, None, "loss",
         "value of k3, gradient of k2: reverse-KL gradient with an unbiased non-negative value"),
        ("k1_is", k1, True, False, "w * (-l)", True, False, R, None, "loss",
         "off-policy: unbiased value and gradient of the reverse KL"),
        ("k2_is", k2, True, False, "w * l^2/2", False, True, None, None, "none",
         "off-policy: NOT unbiased, for the value or the gradient"),
        ("k3_is", k3, True, False, "w * (expm1(l) - l)", True, True, R, None, "loss",
         "off-policy: unbiased value and gradient of the reverse KL, never negative"),
    ]
    out = {}
    for name, base, off, st, formula, unb, nonneg, lg, rg, place, notes in rows:
        out[name] = EstimatorInfo(
            name=name, formula=formula, estimates="KL(pi||o)", value_unbiased=unb,
            nonnegative=nonneg, loss_gradient=lg, reward_gradient=rg,
            sampling="off-policy" if off else "on-policy", placement=place, level="token",
            straight_through=st, notes=notes, fn=_token_fn(base, off, st))
    out["rb"] = EstimatorInfo(
        name="rb", formula="sum_n KL(p(.|y<n) || q(.|y<n))", estimates="KL(P||Q) (sequence)",
        value_unbiased=True, nonnegative=True, loss_gradient="grad KL(P||Q)",
        reward_gradient=None, sampling="on-policy", placement="loss", level="sequence",
        straight_through=False,
        notes="lower variance per position, not always per sequence; needs the full logits",
        fn=rb_kl)
    return out


#: Every estimator by name, with its metadata (:class:`EstimatorInfo`).
ESTIMATORS: dict[str, EstimatorInfo] = _entries()


def get_estimator(name: str) -> EstimatorInfo:
    """The registry entry of an estimator.

    Parameters
    ----------
    name : str
        One of the keys of :data:`ESTIMATORS`.

    Returns
    -------
    EstimatorInfo

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.

    Examples
    --------
    >>> import trmath
    >>> info = trmath.get_estimator("k3")
    >>> info.value_unbiased, info.loss_gradient
    (True, 'grad KL(o||pi)')
    """
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"name: unknown estimator {name!r}; valid names: {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name]


def kl_estimate(name: str, sampler_logprob: Any, other_logprob: Any, *,
                behaviour_logprob: Any = None, mask: Any = None, clamp: Any = None,
                validate: bool = True) -> Any:
    r"""Evaluate a registered token-level estimator by name.

    ``name`` is a key of :data:`ESTIMATORS` with ``level == "token"``: ``k1``, ``k2``, ``k3``,
    the straight-through ``k1_st``, ``k3_st`` (value of :math:`k_1`/:math:`k_3`, gradient of
    :math:`k_2`) and the importance-weighted ``k1_is``, ``k2_is``, ``k3_is``, which require
    ``behaviour_logprob`` (the others refuse it).

    Parameters
    ----------
    name : str
    sampler_logprob, other_logprob, behaviour_logprob, mask, clamp, validate
        As in :func:`k3`.

    Returns
    -------
    As in :func:`k3`.

    Examples
    --------
    >>> import torch, trmath
    >>> pi, ref = torch.tensor([-0.5, -1.5]), torch.tensor([-0.7, -1.2])
    >>> mu = torch.tensor([-0.6, -1.3])
    >>> trmath.kl_estimate("k3_is", pi, ref, behaviour_logprob=mu)
    tensor([0.0207, 0.0408])
    """
    info = get_estimator(name)
    if info.level != "token":
        raise ValueError(f"name: {name!r} is a sequence-level estimator; call trmath.rb_kl")
    off = info.sampling == "off-policy"
    if off and behaviour_logprob is None:
        raise ValueError(f"behaviour_logprob: required by the off-policy estimator {name!r}")
    if not off and behaviour_logprob is not None:
        raise ValueError(f"behaviour_logprob: given, but {name!r} is on-policy; "
                         f"use {name.split('_')[0]}_is")
    kw = dict(mask=mask, clamp=clamp, validate=validate)
    if off:
        return info.fn(sampler_logprob, other_logprob, behaviour_logprob, **kw)
    return info.fn(sampler_logprob, other_logprob, **kw)
