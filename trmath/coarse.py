r"""Coarse-grained divergences: DPPO's Binary and Top-K approximations of TV and KL.

Coarse-graining the vocabulary into a partition can only lower TV and KL (data processing), so
these are cheap *lower bounds* of the exact divergences, computed from a few log-probabilities
per token:

* **Binary** -- partition ``{a, rest}`` of the sampled token ``a``: :func:`~trmath.binary_tv`,
  :func:`~trmath.binary_kl` take ``log p(a)`` and ``log q(a)``.
* **Top-K** -- partition ``{each kept token} + {tail}`` of a kept set ``S``: :func:`~trmath.topk_tv`,
  :func:`~trmath.topk_kl` take ``[..., K]`` log-probabilities of the same tokens under both policies;
  the tail masses are ``R = 1 - sum_S p``, computed as ``log1mexp(logsumexp(lp_S))``.
* Builders of those inputs from full logits, without ``[N, V]`` temporaries:
  :func:`~trmath.topk_logprobs` (the top-K of ``p`` plus the sampled token, scored under both policies)
  and :func:`~trmath.gather_logprobs` (log-probabilities of given ids).

In DPPO, ``p`` is the rollout policy :math:`\mu` and ``q`` the trainer :math:`\pi`; the
divergences are :math:`\mathrm{KL}(\mu\|\pi)` and :math:`\mathrm{TV}(\mu, \pi)`.

Inputs may be float16, bfloat16, float32 or float64 torch tensors or numpy arrays; the results
are float32 for 16/32-bit inputs and float64 for float64 inputs (every input is computed in
float64 internally). Accuracy against 50-digit references on the exact values the inputs
represent: ``|err| <= 1e-5 |value| + 1e-30`` (16/32-bit) and ``1e-12 |value| + 1e-300``
(float64), including probabilities next to 1, equal inputs (exactly 0) and log-probabilities
down to ``-1e4``. See :doc:`/theory/coarse` for the formulas and the error argument.

**Input tolerance.** A log-probability must be ``<= 0``; values in ``(0, tol]`` with
``tol = 4 * eps(dtype)`` (``eps`` of the *input* dtype: ``4.8e-7`` for float32, ``8.9e-16`` for
float64) are rounding and are clamped to 0; larger ones raise :class:`ValueError`. Likewise the
kept probabilities of a Top-K row may exceed 1 by rounding only: ``log sum_S p <= 4 eps(dtype) (1 + ln K)``
(clamped to a zero tail), otherwise :class:`ValueError`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import _coarse_impl as _impl
from ._validation import FLOAT_DTYPES, as_tensor, check_pair, check_temperature, check_tokens, from_numpy, row_label

__all__ = [
    "binary_tv",
    "binary_kl",
    "topk_tv",
    "topk_kl",
    "topk_logprobs",
    "gather_logprobs",
]

#: Valid values of ``slots`` in :func:`topk_logprobs`.
SLOTS = ("k_plus_1", "exactly_k")

#: Rounding tolerance of a log-probability, in units of the input dtype's epsilon.
_LOGPROB_TOL_EPS = 4.0


def _tol(dtype: torch.dtype) -> float:
    return _LOGPROB_TOL_EPS * torch.finfo(dtype).eps


def _mass_tol(dtype: torch.dtype, K: int) -> float:
    """Largest log kept mass of a Top-K row taken as rounding: 4 eps (1 + ln K). Log-probs rounded
    to the dtype (relative error u = eps / 2 each) give a kept mass of at most sum p_j^(1 - u) <=
    K^u for a true mass <= 1, so log mass <= u ln K; this allows 8 times that, plus 4 eps for
    log-probs computed (not only stored) in the dtype. It grows with ln K, not K: a float32
    log_softmax of large logits (|z| ~ 100) rounded to each dtype stays below a quarter eps."""
    return _tol(dtype) * (1.0 + math.log(max(int(K), 1)))


def _index_label(flat: int, shape: tuple[int, ...]) -> str:
    if len(shape) <= 1:
        return f"index {flat}"
    return f"index {tuple(int(i) for i in np.unravel_index(flat, shape))}"


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )


class _Sanitize(torch.autograd.Function):
    """``x`` with its bad entries (NaN, > 0 beyond rounding) set to 0 and rounding above 0
    clamped to 0; the gradient is NaN at the bad entries (an unvalidated NaN never turns into a
    number, its gradient included) and 0 where the clamp is active."""

    @staticmethod
    def forward(ctx, x, bad):  # type: ignore[override]
        ctx.save_for_backward(x, bad)
        return torch.where(bad, torch.zeros_like(x), x).clamp_max(0.0)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, bad = ctx.saved_tensors
        gx = torch.where(x > 0, torch.zeros_like(g), g)
        return torch.where(bad, torch.full_like(g, math.nan), gx), None


def _inputs(p: Any, q: Any, pname: str, qname: str, topk: bool):
    """Two log-probability arguments as tensors, checked for dtype, shape and device; with the
    numpy/torch converter and the output dtype."""
    lp, back = as_tensor(p, pname)
    lq, _ = as_tensor(q, qname)
    _check_dtype(lp, pname)
    _check_dtype(lq, qname)
    if topk:
        for t, nm in ((lp, pname), (lq, qname)):
            if t.dim() < 1:
                raise ValueError(f"{nm}: expected shape [..., K], got a 0-d tensor")
            if t.shape[-1] == 0:
                raise ValueError(f"{nm}: the kept-token axis (last) is empty")
        if lp.shape != lq.shape:
            if lp.shape[-1] != lq.shape[-1]:
                raise ValueError(
                    f"{pname} and {qname}: numbers of kept tokens K differ "
                    f"({lp.shape[-1]} vs {lq.shape[-1]})"
                )
            raise ValueError(
                f"{pname} and {qname}: batch shapes differ ({tuple(lp.shape[:-1])} vs {tuple(lq.shape[:-1])})"
            )
    elif lp.shape != lq.shape:
        raise ValueError(f"{pname} and {qname}: shapes differ ({tuple(lp.shape)} vs {tuple(lq.shape)})")
    if lp.device != lq.device:
        raise ValueError(f"{pname} and {qname}: tensors are on different devices ({lp.device}, {lq.device})")
    out_dtype = torch.float64 if torch.float64 in (lp.dtype, lq.dtype) else torch.float32
    return lp, lq, back, out_dtype


def _check_values(t: torch.Tensor, nm: str, x: torch.Tensor, nan: torch.Tensor, pos: torch.Tensor) -> None:
    """Raise for the first NaN, else the first positive log-probability beyond rounding, of the
    argument ``nm`` (``x``: ``t`` in float64; ``nan``, ``pos``: its bad entries)."""
    if bool(nan.any()):
        i = int(torch.nonzero(nan.reshape(-1))[0])
        raise ValueError(f"{nm}: contains NaN at {_index_label(i, tuple(x.shape))}")
    if bool(pos.any()):
        i = int(torch.nonzero(pos.reshape(-1))[0])
        v = float(x.reshape(-1)[i])
        raise ValueError(
            f"{nm}: entry at {_index_label(i, tuple(x.shape))} is {v!r} > 0; a log-probability "
            f"must be <= 0 (values up to {_tol(t.dtype):.3g}, 4 eps of {str(t.dtype).replace('torch.', '')}, "
            f"are taken as rounding and clamped to 0)"
        )


def _prepare(p: Any, q: Any, pname: str, qname: str, topk: bool, validate: bool):
    """Validate two log-probability arguments; return float64 views, the output dtype, the
    numpy/torch converter and a mask of invalid rows (only when ``validate`` is false)."""
    lp, lq, back, out_dtype = _inputs(p, q, pname, qname, topk)
    bad_rows = None
    xs = []
    for t, nm in ((lp, pname), (lq, qname)):
        tol = _tol(t.dtype)
        # contiguous: the torch reductions over K then sum in one order whatever the caller's
        # layout, so a row's result does not depend on its strides
        x = t.to(torch.float64).contiguous()
        nan = torch.isnan(x)
        pos = x > tol
        if validate:
            _check_values(t, nm, x, nan, pos)
        else:
            bad = nan | pos
            bad = bad.any(-1) if topk else bad
            bad_rows = bad if bad_rows is None else (bad_rows | bad)
        xs.append(_Sanitize.apply(x, nan | pos))  # -inf stays -inf
    return xs[0], xs[1], out_dtype, back, bad_rows, (lp.dtype, lq.dtype)


def _run_binary(p, q, pname, qname, kind, validate):
    """binary_tv / binary_kl: one pass of the element kernel (CPU; the float64 formulas of
    _coarse_impl elsewhere) that also flags bad entries, which validation then names."""
    lp, lq, back, odt = _inputs(p, q, pname, qname, False)
    out, flagged = _impl.binary(lp, lq, 0 if kind == "binary_tv" else 1, _tol(lp.dtype), _tol(lq.dtype),
                                odt == torch.float64)
    if validate and flagged:
        for t, nm in ((lp, pname), (lq, qname)):
            x = t.detach().to(torch.float64)
            _check_values(t, nm, x, torch.isnan(x), x > _tol(t.dtype))
    return back(out)


def _check_mass(x: torch.Tensor, dtype: torch.dtype, name: str, validate: bool):
    """Log kept mass of each row; raise (or mark) rows whose kept probabilities exceed 1.

    Returns ``(over, A)``: the rows over the tolerance and the log kept masses (reused by the
    divergence, so that each row's log-sum-exp is computed once)."""
    A = _impl.log_kept_mass(x.detach())
    tol = _mass_tol(dtype, x.shape[-1])
    over = A > tol
    if validate and bool(over.any()):
        i = int(torch.nonzero(over.reshape(-1))[0])
        lead = tuple(x.shape[:-1])
        raise ValueError(
            f"{name}: the kept probabilities of {row_label(i, lead)} sum to exp({float(A.reshape(-1)[i]):.6g}) > 1 "
            f"(beyond the rounding tolerance log-mass <= {tol:.3g} = 4 eps (1 + ln K)); the tail mass would be negative"
        )
    return over, A


def _run_topk_kernel(lp, lq, pname, qname, kind, validate, back):
    """topk_tv / topk_kl of 16/32-bit log-probabilities: one operator (the C++ kernel on CPU)
    that also flags bad rows, which validation then names."""
    tp, tq = _tol(lp.dtype), _tol(lq.dtype)
    out, flagged = _impl.topk(lp, lq, 0 if kind == "topk_tv" else 1, tp, tq)
    if validate and flagged:
        xs = []
        for t, nm in ((lp, pname), (lq, qname)):
            x = t.detach().to(torch.float64)
            nan, pos = torch.isnan(x), x > _tol(t.dtype)
            _check_values(t, nm, x, nan, pos)
            xs.append(torch.where(nan | pos, torch.zeros_like(x), x).clamp_max(0.0))
        _check_mass(xs[0], lp.dtype, pname, True)
        _check_mass(xs[1], lq.dtype, qname, True)
    return back(out)


def _run(p, q, pname, qname, kind, validate):
    topk = kind.startswith("topk")
    if not topk:
        return _run_binary(p, q, pname, qname, kind, validate)
    lp0, lq0, back0, _ = _inputs(p, q, pname, qname, True)
    if torch.float64 not in (lp0.dtype, lq0.dtype):  # float64 keeps the double-double refinements
        return _run_topk_kernel(lp0, lq0, pname, qname, kind, validate, back0)
    lp, lq, odt, back, bad, dts = _prepare(p, q, pname, qname, topk, validate)
    if topk:
        o1, A = _check_mass(lp, dts[0], pname, validate)
        o2, B = _check_mass(lq, dts[1], qname, validate)
        if not validate:
            bad = bad | o1 | o2
        # float64 inputs need the double-double tails for their 1e-12 target; 16/32-bit ones meet
        # 1e-5 with a wide margin in plain float64 (see _coarse_impl.Parts).
        out = _impl.coarse(lp, lq, kind, dd=torch.float64 in dts, A=A, B=B)
    else:
        out = _impl.coarse(lp.unsqueeze(-1), lq.unsqueeze(-1), kind)
    if bad is not None:
        # times NaN (not a selection, whose gradient would be 0): the value and the gradient of an
        # invalid row are NaN; the others are multiplied by 1, exactly.
        out = out * torch.where(bad, torch.full_like(out, math.nan), torch.ones_like(out))
    return back(out.to(odt))


def binary_tv(p_logprob: Any, q_logprob: Any, *, validate: bool = True) -> Any:
    r"""Total variation between the binary coarse-grainings ``{a, rest}`` of two policies.

    .. math::

        \mathrm{TV}_{\mathrm{bin}} = |p(a) - q(a)|, \qquad p(a) = e^{\ell_p},\; q(a) = e^{\ell_q},

    computed as :math:`e^{\max(\ell_p, \ell_q)}\,(-\operatorname{expm1}(-|\ell_p - \ell_q|))`, never
    as a difference of two rounded probabilities. In :math:`[0, 1]`; exactly 0 for equal inputs.

    Parameters
    ----------
    p_logprob, q_logprob : torch.Tensor or numpy.ndarray, same shape ``[...]``
        Log-probabilities (``<= 0``, ``-inf`` for probability 0) of the sampled token under the
        two policies (DPPO: rollout :math:`\mu` and trainer :math:`\pi`). Any float dtype.
    validate : bool, optional
        If true (default), NaN or a positive log-probability beyond rounding (see the module
        notes) raises :class:`ValueError` naming the argument and index; if false such entries
        give NaN.

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape ``[...]``
        float32 for 16/32-bit inputs, float64 for float64. Differentiable in both arguments:
        :math:`\partial/\partial\ell_p = s\,p(a)`, :math:`\partial/\partial\ell_q = -s\,q(a)`,
        :math:`s = \operatorname{sign}(p(a) - q(a))`.

    Raises
    ------
    TypeError
        Non-float dtypes or unsupported types.
    ValueError
        Shape mismatch, NaN, log-probabilities ``> 0`` beyond rounding.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([-0.5, -1e-12], dtype=torch.float64)
    >>> lq = torch.tensor([-0.7, -2e-12], dtype=torch.float64)
    >>> trmath.binary_tv(lp, lq)
    tensor([1.0995e-01, 1.0000e-12], dtype=torch.float64)
    """
    return _run(p_logprob, q_logprob, "p_logprob", "q_logprob", "binary_tv", validate)


def binary_kl(p_logprob: Any, q_logprob: Any, *, validate: bool = True) -> Any:
    r"""KL divergence between the binary coarse-grainings ``{a, rest}``: :math:`\mathrm{KL}(\mathrm{Bern}(p(a))\,\|\,\mathrm{Bern}(q(a)))`.

    .. math::

        \mathrm{KL}_{\mathrm{bin}} = p \log\frac{p}{q} + (1 - p)\log\frac{1 - p}{1 - q}
        = p\, g(d) + (1 - p)\, g(d_R),\qquad g(x) = \operatorname{expm1}(x) - x \ge 0,

    with :math:`p = p(a), q = q(a)`, :math:`d = \log(q/p) = \ell_q - \ell_p` and
    :math:`d_R = \log\frac{1-q}{1-p} = \operatorname{log1p}\!\big(\tfrac{p - q}{1 - p}\big)`.
    Both terms are non-negative and each is computed without cancellation (a series for
    :math:`g` at small arguments, :math:`1 - p = -\operatorname{expm1}(\ell_p)`), so the result keeps
    its relative accuracy when :math:`p, q \to 1` and when :math:`p \to q` (exactly 0 for equal
    inputs). Conventions: :math:`0 \log 0 = 0`; :math:`+\infty` when :math:`q = 0 < p` or
    :math:`q = 1 > p`. The textbook ``log((1 - p + 1e-8) / (1 - q + 1e-8))`` is wrong as
    :math:`p, q \to 1`; see :doc:`/theory/coarse`.

    Parameters
    ----------
    p_logprob, q_logprob : torch.Tensor or numpy.ndarray, same shape ``[...]``
        As in :func:`binary_tv`. Argument order is the direction: ``binary_kl(mu, pi)``.
    validate : bool, optional
        As in :func:`binary_tv`.

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape ``[...]``
        Never negative. Differentiable:
        :math:`\partial/\partial\ell_p = p\,(d_R - d)`,
        :math:`\partial/\partial\ell_q = (q - p)/(1 - q)`.

    Raises
    ------
    TypeError, ValueError
        As in :func:`binary_tv`.

    Examples
    --------
    >>> import torch, trmath
    >>> lp = torch.tensor([-1e-12, -0.5], dtype=torch.float64)
    >>> lq = torch.tensor([-2e-12, -0.5], dtype=torch.float64)
    >>> kl = trmath.binary_kl(lp, lq)
    >>> print(f"{float(kl[0]):.6e}", float(kl[1]))  # 1e-12 * (1 - log 2) + O(1e-24); equal -> 0
    3.068528e-13 0.0
    """
    return _run(p_logprob, q_logprob, "p_logprob", "q_logprob", "binary_kl", validate)


def topk_tv(p_logprobs: Any, q_logprobs: Any, *, validate: bool = True) -> Any:
    r"""Total variation between the Top-K coarse-grainings ``{i in S} + {tail}`` of two policies.

    .. math::

        \mathrm{TV}_S = \tfrac12\Big(\sum_{i \in S} |p_i - q_i| + |R_p - R_q|\Big),\qquad
        R_p = 1 - \sum_{i\in S} p_i = -\operatorname{expm1}\big(\operatorname{lse}(\ell_{p,S})\big).

    Each :math:`|p_i - q_i|` is formed from the log-ratio (as in :func:`binary_tv`), and
    :math:`R_q - R_p` from whichever of :math:`\sum_S (p_i - q_i)` or
    :math:`e^{\operatorname{lse}\ell_p} - e^{\operatorname{lse}\ell_q}` has the smaller rounding
    error. It misses at most :math:`\tfrac12(R_p + R_q)` of the exact TV; in :math:`[0, 1]`.

    Parameters
    ----------
    p_logprobs, q_logprobs : torch.Tensor or numpy.ndarray, same shape ``[..., K]``
        Log-probabilities of the same ``K`` kept tokens under the two policies (e.g. from
        :func:`topk_logprobs`); ``-inf`` marks an empty slot or a zero probability. The kept
        probabilities must not sum to more than 1 (beyond rounding, see the module notes).
    validate : bool, optional
        As in :func:`binary_tv`; also checks the kept mass.

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape ``[...]``
        Differentiable (subgradient):
        :math:`\partial/\partial\ell_{p,i} = \tfrac12 p_i (s_i - s_R)`,
        :math:`\partial/\partial\ell_{q,i} = -\tfrac12 q_i (s_i - s_R)`, with
        :math:`s_i = \operatorname{sign}(p_i - q_i)`, :math:`s_R = \operatorname{sign}(R_p - R_q)`.

    Raises
    ------
    TypeError
        Non-float dtypes or unsupported types.
    ValueError
        ``K`` or batch shapes differ, NaN, log-probabilities ``> 0`` or kept mass ``> 1``
        beyond rounding.

    Examples
    --------
    >>> import torch, trmath
    >>> p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    >>> q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64).log()
    >>> round(float(trmath.topk_tv(p[:2], q[:2])), 12)  # kept {0, 1}: 0.5 (0.1 + 0.1 + 0)
    0.1
    """
    return _run(p_logprobs, q_logprobs, "p_logprobs", "q_logprobs", "topk_tv", validate)


def topk_kl(p_logprobs: Any, q_logprobs: Any, *, validate: bool = True) -> Any:
    r"""KL divergence between the Top-K coarse-grainings ``{i in S} + {tail}`` of two policies.

    .. math::

        \mathrm{KL}_S = \sum_{i \in S} p_i \log\frac{p_i}{q_i} + R_p \log\frac{R_p}{R_q}
        = \sum_{i\in S} p_i\, g(d_i) + R_p\, g(d_R),

    with :math:`g(x) = \operatorname{expm1}(x) - x \ge 0`, :math:`d_i = \ell_{q,i} - \ell_{p,i}`,
    :math:`d_R = \log(R_q/R_p)` and the tail masses
    :math:`R = -\operatorname{expm1}(\operatorname{lse}(\ell_S))` (never ``1 - sum``; tails below
    1/2 are refined in double-double, and so is :math:`R_q - R_p` where the kept tokens trade
    mass while the tail barely moves -- see :doc:`/theory/coarse`). The
    identity holds because :math:`\sum_S (q_i - p_i) + (R_q - R_p) = 0`; every term is
    non-negative, so the result is never negative -- unlike the truncated sum without the tail
    bucket, which can be. Conventions as in :func:`binary_kl`.

    Parameters
    ----------
    p_logprobs, q_logprobs : torch.Tensor or numpy.ndarray, same shape ``[..., K]``
        As in :func:`topk_tv`. Argument order is the direction: ``topk_kl(mu, pi)``.
    validate : bool, optional
        As in :func:`topk_tv`.

    Returns
    -------
    torch.Tensor or numpy.ndarray, shape ``[...]``
        Differentiable: :math:`\partial/\partial\ell_{p,i} = p_i (d_R - d_i)`,
        :math:`\partial/\partial\ell_{q,i} = q_i R_p / R_q - p_i`.

    Raises
    ------
    TypeError, ValueError
        As in :func:`topk_tv`.

    Notes
    -----
    With ``K = 1`` this is :func:`binary_kl`. A lower bound of the exact :func:`trmath.kl` of
    the full rows (data processing), and at least :func:`binary_kl` of the sampled token when
    that token is kept.

    Examples
    --------
    >>> import torch, trmath
    >>> p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    >>> q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64).log()
    >>> bool(trmath.topk_kl(p[:2], q[:2]) <= trmath.kl(p, q))  # data processing
    True
    """
    return _run(p_logprobs, q_logprobs, "p_logprobs", "q_logprobs", "topk_kl", validate)


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def _check_k(k: Any, V: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k: expected an integer, got {type(k).__name__}")
    if not 1 <= int(k) <= V:
        raise ValueError(f"k: must be in [1, V] = [1, {V}], got {int(k)}")
    return int(k)


def _check_ids_range(ids: torch.Tensor, V: int, name: str) -> None:
    bad = (ids < 0) | (ids >= V)
    if bool(bad.any()):
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise ValueError(
            f"{name}: entry at {_index_label(i, tuple(ids.shape))} is {int(ids.reshape(-1)[i])}, outside [0, {V})"
        )


def _renamed(err: ValueError, name: str) -> ValueError:
    msg = str(err)
    if msg.startswith("logits:"):
        msg = name + msg[len("logits"):]
    return ValueError(msg)


def _row_logprobs(z: torch.Tensor, ids: torch.Tensor, T: float, name: str, validate: bool) -> torch.Tensor:
    r"""``log softmax(z/T)[ids]`` in float64 as ``(z_i - M)/T + log p(argmax)``.

    Both terms are non-positive (no cancellation near 0); ``log p(argmax) = -log sum e^{(z_j-M)/T}``
    comes from the fused :func:`trmath.token_logprobs` (one pass, no ``[N, V]`` temporary,
    differentiable), the rest is a gather. Gradient: :math:`(e_i - p)/T`.
    """
    from .exact import token_logprobs

    amax = z.argmax(-1)
    try:
        lmax = token_logprobs(z, amax, temperature=T, validate=validate)
    except ValueError as e:
        raise _renamed(e, name) from None
    M = torch.gather(z, -1, amax.unsqueeze(-1)).to(torch.float64)
    zi = torch.gather(z, -1, ids).to(torch.float64)
    return ((zi - M) / T + lmax.to(torch.float64).unsqueeze(-1)).clamp_max(0.0)


def gather_logprobs(logits: Any, ids: Any, *, temperature: float = 1.0, validate: bool = True) -> Any:
    r"""Log-probabilities of given token ids, :math:`\log \operatorname{softmax}(z/T)_{i}`, without a log-softmax.

    .. math::

        \ell_i = \frac{z_i - M}{T} + \log p(\arg\max z),\qquad M = \max_j z_j,

    two non-positive terms (no cancellation for probabilities near 1); the second comes from
    the fused :func:`trmath.token_logprobs`. No ``[N, V]`` temporary is built.

    Parameters
    ----------
    logits : torch.Tensor or numpy.ndarray, shape ``[..., V]``
        Any float dtype.
    ids : integer tensor or array, shape ``[..., K]``
        Token ids in ``[0, V)``, same leading shape as ``logits``.
    temperature : float, optional
        :math:`T > 0`.
    validate : bool, optional
        Rows with NaN / ``+inf`` / only ``-inf`` raise :class:`ValueError` (else give NaN).

    Returns
    -------
    shape ``[..., K]``
        float32 for 16/32-bit logits, float64 for float64. Differentiable with respect to
        ``logits``: :math:`\partial \ell_i / \partial z_j = (\delta_{ij} - p_j)/T`.

    Examples
    --------
    >>> import torch, trmath
    >>> z = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    >>> trmath.gather_logprobs(z, torch.tensor([[3, 1]]))
    tensor([[-1.3863, -1.3863]])
    """
    z, back = as_tensor(logits, "logits")
    _check_dtype(z, "logits")
    if z.dim() < 1 or z.shape[-1] == 0:
        raise ValueError("logits: expected shape [..., V] with V >= 1")
    T = check_temperature(temperature)
    if isinstance(ids, np.ndarray):
        ids = from_numpy(ids, "ids")
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids: expected an integer torch.Tensor or numpy array, got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids: expected an integer dtype, got {ids.dtype}")
    if ids.dim() != z.dim() or tuple(ids.shape[:-1]) != tuple(z.shape[:-1]):
        raise ValueError(
            f"ids: expected shape [{', '.join(str(s) for s in z.shape[:-1])}{', ' if z.dim() > 1 else ''}K], "
            f"got {tuple(ids.shape)}"
        )
    if ids.device != z.device:
        raise ValueError(f"ids: on {ids.device}, logits on {z.device}")
    _check_ids_range(ids, z.shape[-1], "ids")
    odt = torch.float64 if z.dtype == torch.float64 else torch.float32
    return back(_row_logprobs(z, ids.to(torch.int64), T, "logits", validate).to(odt))


def _topk_ids(z: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` ids of each row, by value (descending) then index. CPU tensors: the C++
    streaming search (one pass, no ``[N, V]`` temporary, ties to the lower index). CUDA tensors,
    when the extension has the CUDA kernels: the CUDA radix-select kernel, which gives the CPU
    kernel's ids bit for bit (no ``[N, V]`` temporary; ``k`` above
    ``_backend.cuda_topk_max_k()`` takes a stable sort with the same result). Other devices, and
    CUDA without the kernels: :func:`torch.topk`, whose order among equal logits may differ."""
    from . import _ops

    if _ops.use_cpp(z):
        from . import _backend

        return _backend.topk_rows(z, k)
    if _ops.use_cuda(z):
        from . import _backend

        return _backend.cuda_topk_rows(z, k)
    return torch.topk(z, k, dim=-1, largest=True, sorted=True).indices


def topk_logprobs(
    p_logits: Any,
    q_logits: Any,
    k: int,
    tokens: Any = None,
    *,
    slots: str = "k_plus_1",
    temperature: float = 1.0,
    validate: bool = True,
) -> tuple[Any, Any, Any]:
    r"""Build the Top-K inputs from full logits: the kept ids and their log-probabilities under both policies.

    The kept set is the top-``k`` of ``p`` (DPPO: the rollout policy :math:`\mu`), with the sampled
    token always kept when ``tokens`` is given:

    * ``slots="k_plus_1"`` (default): ``K' = k + 1`` slots, the top-``k`` ids followed by the
      sampled token. When the token is already among the top-``k``, the extra slot repeats the
      token id with log-probability ``-inf`` under both policies: an *empty* slot of zero mass that
      contributes nothing to any divergence (:math:`0 \log(0/0) = 0`, :math:`|0 - 0| = 0`) and
      leaves the tail masses unchanged. So the kept set is exactly :math:`\mathrm{TopK}(\mu) \cup \{a\}`.
    * ``slots="exactly_k"``: ``K' = k`` slots; when the token is missing from the top-``k`` it
      replaces the ``k``-th (the least probable kept) id.

    Without ``tokens`` both modes return the top-``k`` (``K' = k``). Log-probabilities are
    computed as in :func:`gather_logprobs` (no ``[N, V]`` temporary). On the CPU the top-``k``
    search is a streaming C++ kernel (one pass over each row, multi-threaded, ties broken by the
    lower token id, so the result is a deterministic function of the row); on CUDA tensors, when
    the extension is built with its CUDA kernels, a radix-select kernel that returns the same ids
    bit for bit. On other devices (or CUDA without the kernels) it is ``torch.topk``, whose order
    among *equal* logits may differ.

    Parameters
    ----------
    p_logits, q_logits : shape ``[..., V]`` each
        Logits of the two policies, same shape and device, any float dtype.
    k : int
        ``1 <= k <= V``.
    tokens : integer tensor or array, shape ``[...]``, optional
        The sampled tokens, in ``[0, V)``.
    slots : {"k_plus_1", "exactly_k"}
    temperature : float, optional
        :math:`T > 0`, applied to both rows.
    validate : bool, optional
        Rows with NaN / ``+inf`` / only ``-inf`` raise :class:`ValueError` naming the argument.

    Returns
    -------
    ids : torch.Tensor (int64) or numpy array, shape ``[..., K']``
    p_logprobs, q_logprobs : shape ``[..., K']``
        float32 for 16/32-bit logits, float64 for float64. ``q_logprobs`` (and ``p_logprobs``)
        are differentiable with respect to their logits; empty slots have zero gradient.

    Examples
    --------
    >>> import torch, trmath
    >>> mu = torch.tensor([[2.0, 1.0, 0.0, -1.0, -1.5]]); pi = torch.tensor([[1.5, 1.5, 0.0, -1.0, -2.0]])
    >>> ids, lp, lq = trmath.topk_logprobs(mu, pi, 2, tokens=torch.tensor([3]))
    >>> ids
    tensor([[0, 1, 3]])
    >>> lp.exp()  # mu's probabilities of the kept tokens; the tail {2, 4} has the rest
    tensor([[0.6316, 0.2324, 0.0314]])
    >>> bool(trmath.binary_kl(lp[:, 2], lq[:, 2]) <= trmath.topk_kl(lp, lq) <= trmath.kl(mu, pi))
    True
    """
    z, back = as_tensor(p_logits, "p_logits")
    w, _ = as_tensor(q_logits, "q_logits")
    z, w = check_pair(z, w, "p_logits", "q_logits")
    T = check_temperature(temperature)
    V = z.shape[-1]
    k = _check_k(k, V)
    if slots not in SLOTS:
        raise ValueError(f"slots: expected one of {SLOTS}, got {slots!r}")
    tok = None
    if tokens is not None:
        tok = check_tokens(tokens, z, "tokens").to(torch.int64)
        _check_ids_range(tok, V, "tokens")
    # validate both rows (and get log p(argmax)) before the search
    top = _topk_ids(z.detach(), k)
    empty = None
    if tok is None:
        ids = top
    else:
        t1 = tok.unsqueeze(-1)
        in_top = (top == t1).any(-1, keepdim=True)
        if slots == "k_plus_1":
            ids = torch.cat([top, t1], dim=-1)
            empty = torch.cat([torch.zeros_like(top, dtype=torch.bool), in_top], dim=-1)
        else:
            last = torch.where(in_top, top[..., -1:], t1)
            ids = torch.cat([top[..., :-1], last], dim=-1)
    lp = _row_logprobs(z, ids, T, "p_logits", validate)
    lq = _row_logprobs(w, ids, T, "q_logits", validate)
    if empty is not None:
        ninf = torch.full_like(lp, float("-inf"))
        lp = torch.where(empty, ninf, lp)
        lq = torch.where(empty, ninf, lq)
    odt = torch.float64 if z.dtype == torch.float64 else torch.float32
    ids_out = ids if isinstance(p_logits, torch.Tensor) else ids.numpy()
    return ids_out, back(lp.to(odt)), back(lq.to(odt))
