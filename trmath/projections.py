r"""Differentiable trust-region projections of a policy onto a ball around an anchor policy.

Given the logits of a new policy :math:`\pi_{new}` and of an anchor :math:`\pi_{old}` (``[..., V]``
each), the projections return the log-probabilities ``[..., V]`` of the policy :math:`\tilde\pi`
of the ball closest to :math:`\pi_{new}`:

* :func:`~trmath.project_tv`: the TV ball, :math:`\tilde\pi = (1-\lambda)\pi_{old} + \lambda\pi_{new}`;
* :func:`~trmath.project_kl`: the KL ball of TROLL, a geometric interpolation whose multiplier
  :math:`\eta` is the root of :math:`\mathrm{KL}(\tilde\pi_\eta\|\pi_{old}) = \varepsilon`, with
  gradients by implicit differentiation;
* :func:`~trmath.project_kl_sparse`: the same on the top-K tokens plus a tail bucket (see the caveat
  there), with :func:`~trmath.sparse_support` to gather them;
* :func:`~trmath.troll_loss`: TROLL's per-token objective built on :func:`~trmath.project_kl`.

Outputs are float32 for 16/32-bit inputs and float64 for float64 inputs; every computation is
done in float64. The derivations and error analysis are in :doc:`/theory/projections`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from . import _project_torch as _pt
from ._validation import as_tensor, check_pair, check_temperature, check_tokens, raise_for_status, row_label

__all__ = ["project_tv", "project_kl", "project_kl_sparse", "sparse_support", "troll_loss"]

_NAMES = ("new_logits", "old_logits")

# Test hook: route CPU tensors to the pure-torch implementation (parity tests).
_FORCE_TORCH = [False]


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_radius(x: Any, name: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name}: must be finite and > 0, got {x!r}")
    return v


def _status(z: torch.Tensor, bits: int) -> torch.Tensor:
    zz = z.reshape(-1, z.shape[-1])
    nan = torch.isnan(zz).any(-1)
    pinf = torch.isposinf(zz).any(-1)
    allneg = torch.isneginf(zz).all(-1)
    st = nan.to(torch.int32) + pinf.to(torch.int32) * 2 + (allneg & ~nan & ~pinf).to(torch.int32) * 4
    return (st * bits).reshape(z.shape[:-1])


def _pair_args(new_logits, old_logits, temperature, validate, kernel_checks=False, names=_NAMES):
    z, back = as_tensor(new_logits, names[0])
    w, _ = as_tensor(old_logits, names[1])
    z, w = check_pair(z, w, *names)
    T = check_temperature(temperature)
    # The C++ path reports invalid rows from its first pass (no extra pass over the inputs).
    if validate and not (kernel_checks and _cpp_available(z)):
        raise_for_status((_status(z, 1) | _status(w, 8)).cpu(), tuple(z.shape[:-1]), names)
    return z, w, T, back


def project_tv(new_logits: Any, old_logits: Any, delta: float, *, temperature: float = 1.0,
               return_lambda: bool = False, validate: bool = True) -> Any:
    r"""Project :math:`\pi_{new}` onto the total-variation ball of radius :math:`\delta` around :math:`\pi_{old}`.

    .. math::

        \tilde\pi = (1-\lambda)\,\pi_{old} + \lambda\,\pi_{new}, \qquad
        \lambda = \min\Bigl(1, \frac{\delta}{\mathrm{TV}(\pi_{new}, \pi_{old})}\Bigr),
        \qquad \mathrm{TV}(\tilde\pi, \pi_{old}) = \min(\delta, \mathrm{TV}(\pi_{new}, \pi_{old})).

    The log-probabilities are formed as a stable log-mixture,
    :math:`\log\tilde\pi_i = \operatorname{logaddexp}(\log(1-\lambda) + \log\pi_{old,i},\
    \log\lambda + \log\pi_{new,i})`, and :math:`\mathrm{TV}` is the exact :func:`trmath.tv`
    evaluated in float64, so the constraint holds to float64 accuracy before the output rounding.
    On the CPU the rows are converted to float64 a block at a time and the mixture and its
    gradient are C++ passes (no ``[N, V]`` temporary besides the output); other devices (CUDA)
    evaluate the same mixture and gradient with float64 torch operations a block of rows at a
    time (see :doc:`/theory/projections`). A row that is invalid (NaN, ``+inf``, or entirely
    ``-inf`` in either input) comes back NaN throughout, with :math:`\lambda` NaN, when
    ``validate=False``.

    Parameters
    ----------
    new_logits, old_logits : torch.Tensor or numpy.ndarray, shape ``[..., V]``
        Logits of :math:`\pi_{new}` and of the anchor :math:`\pi_{old}`; ``-inf`` masks a token.
    delta : float
        Radius :math:`\delta > 0`.
    temperature : float, optional
        :math:`T > 0`: both rows are :math:`\operatorname{softmax}(z/T)`.
    return_lambda : bool, optional
        Also return :math:`\lambda` per row (float64).
    validate : bool, optional
        Raise :class:`ValueError` on NaN, ``+inf`` or all-``-inf`` rows (default).

    Returns
    -------
    log_probs : shape ``[..., V]``
        :math:`\log\tilde\pi`, float32 for 16/32-bit inputs, float64 for float64 inputs.
        Differentiable in both logits (through :func:`trmath.tv` when the ball is active).
    lam : shape ``[...]``, only if ``return_lambda``.

    Raises
    ------
    ValueError
        ``delta`` not finite and positive; shapes differ; invalid rows.

    Examples
    --------
    >>> import torch, trmath
    >>> new = torch.tensor([[2.0, 0.0, -1.0]]); old = torch.zeros(1, 3)
    >>> lp = trmath.project_tv(new, old, 0.1)
    >>> round(float(trmath.tv(lp, old)), 6)
    0.1
    """
    z, w, T, back = _pair_args(new_logits, old_logits, temperature, False)
    delta = _check_radius(delta, "delta")
    if _tv_cpp_available(z):
        # Invalid rows are reported by the TV kernel's first pass (no extra pass over the inputs).
        lead, V = tuple(z.shape[:-1]), z.shape[-1]
        z2, w2 = z.reshape(-1, V), w.reshape(-1, V)
        status = torch.zeros(z2.shape[0], dtype=torch.int32)
        if torch.is_grad_enabled() and (z.requires_grad or w.requires_grad):
            out, lam = _TVProjectCpp.apply(z2, w2, delta, T, status)
        else:  # no graph to record
            out, prm, _, _ = _tv_forward(z2, w2, delta, T, status)
            lam = prm[:, 4]
        bad = status & 127  # (128: some q_i = 0 < p_i, not an error)
        if validate and bool(bad.any()):
            raise_for_status(bad.reshape(lead), lead, _NAMES)
        out, lam = out.reshape(z.shape), lam.reshape(lead)
    else:
        if validate:
            raise_for_status((_status(z, 1) | _status(w, 8)).cpu(), tuple(z.shape[:-1]), _NAMES)
        out, lam = _pt.tv_project(z, w, delta, T)
    out = back(out)
    return (out, back(lam)) if return_lambda else out


# Rows of the TV projection are normalised in float64 (as the constraint and lambda must be exact
# to float64 accuracy) a block of rows at a time: at most this many elements of each input are
# converted at once (8 MiB each), so no [N, V] float64 copy of the inputs exists.
_TV_BLOCK = 1 << 20


def _tv_cpp_available(z: torch.Tensor) -> bool:
    if _FORCE_TORCH[0] or z.device.type != "cpu":
        return False
    from . import _backend

    return _backend.has_tv_projection()


def _tv_blocks(R: int, V: int):
    step = max(1, _TV_BLOCK // max(V, 1))
    return [slice(r, min(R, r + step)) for r in range(0, R, step)]


class _Blocks:
    """float64 buffers of one block of rows, reused from block to block (from the core's
    buffer cache, so a call does not map and fault in fresh pages for every block)."""

    def __init__(self, R: int, V: int, k: int):
        from . import _backend

        rows = min(R, max(1, _TV_BLOCK // max(V, 1)))
        self.bufs = [_backend._empty_large((rows, V), torch.float64) for _ in range(k)]

    def take(self, n: int, *srcs):
        """The first ``n`` rows of the buffers, filled from ``srcs`` (None: left unfilled)."""
        out = []
        for buf, src in zip(self.bufs, srcs):
            v = buf[:n]
            if src is not None:
                v.copy_(src)
            out.append(v)
        return out


def _tv_forward(z2: torch.Tensor, w2: torch.Tensor, delta: float, T: float, status: torch.Tensor):
    """The C++ TV projection of rows ``[R, V]``: exact float64 TV and normalisers per block of
    rows, then the log-mixture kernel over the inputs as stored. Returns ``(out [R, V], prm
    [R, 5], tv [R], stats [R, PAIR_STATS])`` (prm: see :func:`trmath._backend.project_tv_mix_forward`)
    and writes each row's status (the exact kernels' bits) into ``status`` ``[R]``."""
    from . import _backend

    R, V = z2.shape
    tv = torch.empty(R, dtype=torch.float64)
    stats = torch.empty((R, _backend.PAIR_STATS), dtype=torch.float64)
    buf = _Blocks(R, V, 2)
    for b in _tv_blocks(R, V):
        zb, wb = buf.take(b.stop - b.start, z2[b], w2[b])
        o, st, stt, _ = _backend.pair_forward(zb, wb, T, "tv")
        tv[b] = o
        stats[b] = st
        status[b] = stt
    del buf
    outside = tv > delta
    lam = _pt._tv_lambda(tv, delta)  # NaN for an invalid row, whose output is NaN throughout
    lse_p, lse_q = stats[:, 0], stats[:, 1]
    cb = torch.where(outside, lse_q - torch.log1p(-lam), torch.full_like(lam, math.inf))
    prm = torch.stack((lse_p - torch.log(lam), cb, lse_p, lse_q, lam), -1).contiguous()
    out = _backend._empty_large((R, V), _out_dtype(z2.dtype))
    _backend.project_tv_mix_forward(z2, w2, T, prm, out)
    return out, prm, tv, stats


class _TVProjectCpp(torch.autograd.Function):
    """C++ forward (:func:`_tv_forward`) and backward: the log-mixture's part of the gradient
    plus the exact TV kernel's backward scaled by dL/dTV = -dL/dlam * lam / TV (rows outside
    the ball), both in float64 per block of rows, rounded once to the inputs' dtype."""

    @staticmethod
    def forward(ctx, z2, w2, delta, T, status):
        out, prm, tv, stats = _tv_forward(z2, w2, delta, T, status)
        ctx.save_for_backward(z2, w2, prm, tv, stats)
        ctx.T = T
        return out, prm[:, 4].clone()

    @staticmethod
    def backward(ctx, g, glam):
        from . import _backend

        z2, w2, prm, tv, stats = ctx.saved_tensors
        need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        R, V = z2.shape
        dz = _backend._empty_like_input(z2) if need_z else None
        dw = _backend._empty_like_input(w2) if need_w else None
        buf = _Blocks(R, V, 5)
        for b in _tv_blocks(R, V):
            gsrc = None if g is None else g[b]
            zb, wb, gb, dzb, dwb = buf.take(b.stop - b.start, z2[b], w2[b], gsrc, None, None)
            if g is None:  # only lambda was used
                gb.zero_()
            dzb = dzb if need_z else None
            dwb = dwb if need_w else None
            dlam = torch.empty(zb.shape[0], dtype=torch.float64)
            _backend.project_tv_mix_backward(zb, wb, ctx.T, prm[b], gb, dzb, dwb, dlam)
            lam, tvb = prm[b, 4], tv[b]
            if glam is not None:
                dlam = dlam + glam[b].to(torch.float64)
            outside = lam < 1.0
            if bool(outside.any()):
                dtv = torch.where(outside, -dlam * lam / torch.where(outside, tvb, torch.ones_like(tvb)),
                                  torch.zeros_like(tvb))
                tz, tw = _backend.pair_backward(dtv, zb, wb, stats[b], ctx.T, "tv", need_z, need_w)
                if need_z:
                    dzb += tz
                if need_w:
                    dwb += tw
            bad = torch.isnan(lam)  # an invalid row (validate=False): NaN gradients, never a number
            if need_z:
                dzb[bad] = math.nan
                dz[b] = dzb
            if need_w:
                dwb[bad] = math.nan
                dw[b] = dwb
        return dz, dw, None, None, None


# ---------------------------------------------------------------------------------------------
# KL ball
# ---------------------------------------------------------------------------------------------
def _cpp_available(z: torch.Tensor) -> bool:
    if _FORCE_TORCH[0] or z.device.type not in ("cpu", "cuda"):
        return False
    try:
        from . import _backend
    except ImportError:  # pragma: no cover - the extension is always built with the package
        return False
    if z.device.type == "cuda":
        return _backend.has_cuda_projection()
    return _backend.has_projection()


class _KLProjectCpp(torch.autograd.Function):
    """Compiled forward (per-row safeguarded Newton) and backward (implicit gradient): the CPU
    kernels, or the CUDA kernels for CUDA tensors (the same solver)."""

    @staticmethod
    def forward(ctx, z, w, eps, T):
        from . import _backend

        fwd = _backend.cuda_project_kl_forward if z.is_cuda else _backend.project_kl_forward
        out, stats, status = fwd(z, w, eps, T)
        ctx.save_for_backward(z, w, stats)
        ctx.T = T
        ctx.mark_non_differentiable(stats, status)
        return out, stats, status

    @staticmethod
    def backward(ctx, g, gstats, gstatus):
        from . import _backend

        z, w, stats = ctx.saved_tensors
        bwd = _backend.cuda_project_kl_backward if z.is_cuda else _backend.project_kl_backward
        dz, dw = bwd(g, z, w, stats, ctx.T, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dz, dw, None, None


_STATUS_INFEASIBLE = 256


def _raise_infeasible(bad: torch.Tensor, lead: tuple[int, ...], eps: float, names=_NAMES) -> None:
    from ._validation import row_label

    idx = torch.nonzero(bad.reshape(-1)).reshape(-1)
    if idx.numel():
        raise ValueError(
            f"{names[1]}: {row_label(int(idx[0]), lead)} puts mass e^-epsilon or more outside the "
            f"support of {names[0]} (epsilon={eps!r}): every distribution in the KL ball has "
            "KL(q || pi_new) = +inf")


def _project_kl(z, w, eps, T, validate, names=_NAMES):
    lead = tuple(z.shape[:-1])
    V = z.shape[-1]
    if _cpp_available(z):
        if torch.is_grad_enabled() and (z.requires_grad or w.requires_grad):
            out, stats, status = _KLProjectCpp.apply(z, w, eps, T)
        else:  # no graph to record: the kernel alone (the autograd wrapper costs ~50 us)
            from . import _backend

            fwd = _backend.cuda_project_kl_forward if z.is_cuda else _backend.project_kl_forward
            out, stats, status = fwd(z, w, eps, T)
        if validate and bool(status.any()):  # one reduction when every row is valid
            raise_for_status((status & 127).cpu(), lead, names)
            _raise_infeasible((status & _STATUS_INFEASIBLE) != 0, lead, eps, names)
        return out, stats[..., 0]
    lp, eta = _pt.kl_project(z.reshape(-1, V), w.reshape(-1, V), eps, T)
    eta = eta.reshape(lead)
    if validate:
        _raise_infeasible(torch.isnan(eta).cpu(), lead, eps, names)
    return lp.reshape(z.shape).to(_out_dtype(z.dtype)), eta


def project_kl(new_logits: Any, old_logits: Any, epsilon: float, *, temperature: float = 1.0,
               return_eta: bool = False, validate: bool = True) -> Any:
    r"""Project :math:`\pi_{new}` onto the KL ball :math:`\mathrm{KL}(q\|\pi_{old}) \le \varepsilon` (TROLL).

    Solves :math:`\min_q \mathrm{KL}(q\|\pi_{new})` subject to
    :math:`\mathrm{KL}(q\|\pi_{old}) \le \varepsilon`. The solution is the geometric interpolation

    .. math::

        \log\tilde\pi = \frac{\log\pi_{new} + \eta\log\pi_{old}}{1+\eta} - \log Z(\eta),
        \qquad \mathrm{KL}(\tilde\pi_\eta\|\pi_{old}) = \varepsilon,

    with :math:`\eta = 0` (:math:`\tilde\pi = \pi_{new}`) when
    :math:`\mathrm{KL}(\pi_{new}\|\pi_{old}) \le \varepsilon`. The support of :math:`\tilde\pi` is
    the common support of both policies.

    Parameters
    ----------
    new_logits, old_logits : torch.Tensor or numpy.ndarray, shape ``[..., V]``
        Logits of :math:`\pi_{new}` and of the anchor :math:`\pi_{old}` (any float dtype).
    epsilon : float
        Radius :math:`\varepsilon > 0` of the ball.
    temperature : float, optional
        :math:`T > 0`: both policies are :math:`\operatorname{softmax}(z/T)`.
    return_eta : bool, optional
        Also return the multiplier :math:`\eta \ge 0` of each row (float64; not differentiable).
        Within :math:`10^{-6}` of the root for :math:`\varepsilon \ge 10^{-30}`. Below that
        (:math:`\eta > 10^{14}`, where :math:`\tilde\pi` equals :math:`\pi_{old}` to float64
        rounding) the root finder stops at the absolute resolution of the KL it evaluates, and
        :math:`\eta` can come out too small: by :math:`4\cdot 10^{-5}` relative at
        :math:`\varepsilon = 10^{-50}`, by orders of magnitude at :math:`10^{-80}` (the
        projected log-probabilities are unaffected).
    validate : bool, optional
        Raise :class:`ValueError` on NaN, ``+inf`` or all-``-inf`` rows, and on infeasible rows
        (default). With ``validate=False`` such rows come back as NaN.

    Returns
    -------
    log_probs : shape ``[..., V]``
        :math:`\log\tilde\pi`: float32 for 16/32-bit inputs, float64 for float64 inputs.
        Differentiable in both logits; the gradient includes the dependence of :math:`\eta` on
        the logits (implicit function theorem), see :doc:`/theory/projections`.
    eta : shape ``[...]``, only if ``return_eta``.

    Raises
    ------
    ValueError
        ``epsilon`` not finite and positive; shapes differ; invalid rows; a row where
        :math:`\pi_{old}` puts mass :math:`\ge 1 - e^{-\varepsilon}` outside the support of
        :math:`\pi_{new}` (no distribution of the ball is at finite KL from :math:`\pi_{new}`).

    Notes
    -----
    CPU tensors run in C++, and CUDA tensors in CUDA kernels when the extension was built with
    them (one block per row, the same solver): the exact :func:`trmath.kl` pass decides which
    rows are active, a pass per row takes its float64 normaliser and the moments of the log-ratio,
    from which a model of the row gives the first trial; each active row's multiplier is then
    found by a safeguarded Newton / Halley iteration in :math:`\log\eta` (one pass over the row
    per step: one exponential per element; typically one step, see
    :doc:`/theory/projections`), and a last pass writes the output; no ``[N, V]`` temporary
    besides the output. Other devices (and
    CUDA tensors without the CUDA kernels) use a chunked float64 torch implementation with the
    same algorithm. The constraint is met to an absolute error of a
    few :math:`10^{-16}` (the float64 rounding of :math:`\log Z`), i.e. to :math:`10^{-6}`
    relative for :math:`\varepsilon \gtrsim 10^{-9}` (measured: :math:`10^{-12}` at
    :math:`\varepsilon = 0.05`, :math:`10^{-8}` at :math:`10^{-8}`). For 16/32-bit inputs the returned log-probabilities are
    rounded to float32, which perturbs the KL of the *returned* row by about
    :math:`2^{-24}\max_i|\log\tilde\pi_i|\sqrt{2\varepsilon}`.

    Examples
    --------
    >>> import torch, trmath
    >>> new = torch.tensor([[3.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    >>> old = torch.zeros(1, 4, dtype=torch.float64)
    >>> lp, eta = trmath.project_kl(new, old, 0.05, return_eta=True)
    >>> round(float(trmath.kl(lp, old)), 12)
    0.05
    >>> bool(eta > 0)
    True
    """
    z, w, T, back = _pair_args(new_logits, old_logits, temperature, validate, kernel_checks=True)
    eps = _check_radius(epsilon, "epsilon")
    out, eta = _project_kl(z, w, eps, T, validate)
    out = back(out)
    return (out, back(eta)) if return_eta else out


# ---------------------------------------------------------------------------------------------
# sparse variant
# ---------------------------------------------------------------------------------------------
def _lse64(z: torch.Tensor, T: float) -> torch.Tensor:
    """Exact float64 log-partition ``[..., 1]`` from the fused kernels, differentiable in ``z``."""
    from . import _ops
    from .exact import logsumexp as _lse

    stats = _ops.single_fwd(z.detach(), None, T, "logsumexp", False)[2]
    val = stats[..., :1]  # float64 even for 16/32-bit inputs
    if not z.requires_grad:
        return val
    lf = _lse(z, temperature=T, validate=False).to(torch.float64).unsqueeze(-1)
    return val + (lf - lf.detach())  # the value of val, the gradient of the lse


def sparse_support(new_logits: Any, old_logits: Any, k: int, tokens: Any = None, *,
                   temperature: float = 1.0) -> tuple[Any, Any, Any]:
    r"""Gather the top-``k`` tokens of each policy (and the sampled token) for :func:`project_kl_sparse`.

    The support of row :math:`n` is :math:`\mathrm{top}_k(\pi_{new}) \cup \mathrm{top}_k(\pi_{old})
    \cup \{a_n\}`, stored in ``2k + 1`` slots (``2k`` without ``tokens``); a token that appears
    twice keeps its first slot and the other slots get log-probability ``-inf`` in both policies,
    so that each token is counted once.

    Parameters
    ----------
    new_logits, old_logits : shape ``[..., V]``
    k : int
        Tokens taken from each policy, ``1 <= k <= V``.
    tokens : integer tensor, shape ``[...]``, optional
        The sampled tokens, always included.
    temperature : float, optional

    Returns
    -------
    index : int64, shape ``[..., S]``
        Token ids of the slots.
    new_logprobs, old_logprobs : shape ``[..., S]``
        :math:`\log\pi(i)` (normalised over the full vocabulary, float64 internally, returned in
        the projection's output dtype), ``-inf`` in duplicate slots. Differentiable in
        ``new_logits``.

    Examples
    --------
    >>> import torch, trmath
    >>> new = torch.tensor([[2.0, 1.0, 0.0, -1.0]]); old = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    >>> idx, lpn, lpo = trmath.sparse_support(new, old, 1, torch.tensor([3]))
    >>> idx.tolist()
    [[0, 2, 3]]
    """
    z, back = as_tensor(new_logits, "new_logits")
    w, _ = as_tensor(old_logits, "old_logits")
    z, w = check_pair(z, w, "new_logits", "old_logits")
    T = check_temperature(temperature)
    V = z.shape[-1]
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 1 <= k <= V:
        raise ValueError(f"k: expected an integer in [1, {V}], got {k!r}")
    k = int(k)
    # A row with NaN or +inf, or entirely -inf, has no log-probabilities to gather (they would
    # come back NaN, and the projection would then blame its own arguments).
    raise_for_status((_status(z, 1) | _status(w, 8)).cpu(), tuple(z.shape[:-1]), ("new_logits", "old_logits"))
    parts = [torch.topk(z, k, dim=-1).indices, torch.topk(w, k, dim=-1).indices]
    if tokens is not None:
        tok = check_tokens(tokens, z)
        if bool(((tok < 0) | (tok >= V)).any()):
            raise ValueError(f"tokens: ids must lie in [0, {V})")
        parts.append(tok.to(torch.int64).unsqueeze(-1))
    idx = torch.cat(parts, dim=-1)
    # First occurrence of each id keeps its slot: sort stably, flag repeats, scatter back.
    srt, order = torch.sort(idx, dim=-1, stable=True)
    rep = torch.zeros_like(srt, dtype=torch.bool)
    rep[..., 1:] = srt[..., 1:] == srt[..., :-1]
    dup = torch.zeros_like(rep).scatter(-1, order, rep)
    lse_z, lse_w = _lse64(z, T), _lse64(w, T)
    lpn = torch.gather(z, -1, idx).to(torch.float64) / T - lse_z
    lpo = torch.gather(w, -1, idx).to(torch.float64) / T - lse_w
    ninf = torch.full((), -math.inf, dtype=torch.float64)
    lpn, lpo = torch.where(dup, ninf, lpn), torch.where(dup, ninf, lpo)
    odt = _out_dtype(z.dtype)
    return back(idx), back(lpn.to(odt)), back(lpo.to(odt))


def _mass_slack(z: torch.Tensor) -> float:
    """The largest log-mass of a row of listed log-probabilities that still passes as a
    sub-distribution: a sum above 1 beyond rounding is not one. The rule of the Top-K
    divergences (``coarse._mass_tol``): 4 eps (1 + ln S) -- log-probs rounded to the dtype give a
    log-mass of at most eps / 2 ln S; growing with S itself, it let a bfloat16 row of 20
    tokens through at mass 1.8."""
    return 4.0 * torch.finfo(z.dtype).eps * (1.0 + math.log(max(z.shape[-1], 1)))


def _tail_checks(s: torch.Tensor, z: torch.Tensor, w: torch.Tensor, names: tuple[str, str],
                 validate: bool) -> None:
    """Raise for the first invalid row given the log-masses ``s`` ``[2, ..., 1]`` of both inputs
    (NaN for a NaN entry, ``+inf`` for a ``+inf`` one, ``-inf`` for an all ``-inf`` row; a mass
    above 1 beyond rounding always raises, the rest only if ``validate``)."""
    slack = _mass_slack(z)
    ok = (s <= slack) & (s > -math.inf) if validate else ~(s > slack)
    if bool(ok.all()):
        return
    for k, (t, name) in enumerate(zip((z, w), names)):
        sk = s[k].reshape(-1)
        if validate:
            status = (torch.isnan(sk).to(torch.int32) + 2 * torch.isposinf(sk).to(torch.int32)
                      + 4 * torch.isneginf(sk).to(torch.int32))
            raise_for_status(status, tuple(t.shape[:-1]), (name,))
        over = torch.nonzero(sk > slack).reshape(-1)
        if over.numel():
            r = int(over[0])
            raise ValueError(f"{name}: {row_label(r, tuple(t.shape[:-1]))} has probabilities "
                             f"summing to more than 1 ({math.exp(float(sk[r]))!r})")


def _tails_torch(z: torch.Tensor, w: torch.Tensor):
    """``[2, ..., S + 1]`` float64: both inputs with their tail buckets, and the log-masses
    ``[2, ..., 1]`` (differentiable; the reference for the compiled :class:`_TailsCpp`)."""
    both = torch.stack([z.to(torch.float64), w.to(torch.float64)])
    s = torch.logsumexp(both, dim=-1, keepdim=True)
    c = torch.clamp(s, max=0.0)
    # log(1 - e^s), accurate both for s -> 0 and s -> -inf.
    tail = torch.where(c > -math.log(2.0), torch.log(-torch.expm1(c)), torch.log1p(-torch.exp(c)))
    return torch.cat([both, tail], dim=-1), s


class _TailsCpp(torch.autograd.Function):
    r""":func:`_tails_torch` in one compiled pass per row. Backward: the tail
    :math:`t = \log(1 - \sum_i e^{x_i})` has :math:`\partial t / \partial x_i = -e^{x_i - t}`
    (0 where the mass is clamped at 1)."""

    @staticmethod
    def forward(ctx, z, w):
        from . import _backend

        out, s = _backend.sparse_tails(z, w)
        ctx.save_for_backward(out, s)
        ctx.dtypes = (z.dtype, w.dtype)
        ctx.mark_non_differentiable(s)
        return out, s

    @staticmethod
    def backward(ctx, g, gs):
        out, s = ctx.saved_tensors
        x, tail = out[..., :-1], out[..., -1:]
        dt = torch.where(s.unsqueeze(-1) > 0.0, 0.0, -torch.exp(x - tail))
        d = g[..., :-1] + g[..., -1:] * dt
        return d[0].to(ctx.dtypes[0]), d[1].to(ctx.dtypes[1])


def _with_tails(z: torch.Tensor, w: torch.Tensor, names: tuple[str, str], validate: bool):
    """Both sub-distributions in float64 with their tail buckets appended, validated from the
    log-mass of each row: one log-sum-exp per row serves every check (NaN gives NaN, ``+inf``
    gives ``+inf``, an all ``-inf`` row gives ``-inf``) and the tails."""
    if _cpp_available(z) and z.device.type == "cpu":
        from . import _backend

        if torch.is_grad_enabled() and (z.requires_grad or w.requires_grad):
            both, s = _TailsCpp.apply(z, w)
        else:
            both, s = _backend.sparse_tails(z, w)
        s = s.unsqueeze(-1)
    else:
        both, s = _tails_torch(z, w)
    _tail_checks(s, z, w, names, validate)
    return both[0], both[1], s


def project_kl_sparse(new_logprobs: Any, old_logprobs: Any, epsilon: float, *,
                      return_eta: bool = False, validate: bool = True) -> Any:
    r"""KL projection restricted to a sparse support plus a tail bucket (TROLL's sparse variant).

    The inputs are the log-probabilities of the same ``S`` tokens under each policy (typically
    from :func:`sparse_support`), normalised over the *full* vocabulary. A tail bucket
    :math:`\log(1 - \sum_{i \le S} \pi(i))` is appended to each, and :func:`project_kl` is
    applied to the resulting ``S + 1`` categories.

    .. warning::

       The constraint holds on the coarse distribution (``S`` tokens and one tail), not on the
       full vocabulary. By the data-processing inequality any full-vocabulary policy that agrees
       with :math:`\tilde\pi` on the support and the tail mass has
       :math:`\mathrm{KL}_{full}(\cdot\|\pi_{old}) \ge \varepsilon`, with equality only if its
       tail is shaped like :math:`\pi_{old}`'s; a bound met on the sparse set can be exceeded
       on the full vocabulary.

    Parameters
    ----------
    new_logprobs, old_logprobs : shape ``[..., S]``
        Log-probabilities (``-inf`` allowed) whose exponentials sum to at most 1 per row.
    epsilon : float
        Radius :math:`\varepsilon > 0`.
    return_eta : bool, optional
    validate : bool, optional
        Raise :class:`ValueError` for a row with NaN or ``+inf``, or entirely ``-inf``
        (default); if false such rows come back NaN (with :math:`\eta` NaN). Kept probabilities
        summing to more than 1 beyond rounding always raise.

    Returns
    -------
    log_probs : shape ``[..., S + 1]``
        Projected log-probabilities of the ``S`` tokens and, last, of the tail. Differentiable.
    eta : shape ``[...]``, only if ``return_eta``.

    Examples
    --------
    >>> import torch, trmath
    >>> new = torch.log(torch.tensor([[0.7, 0.2]], dtype=torch.float64))
    >>> old = torch.log(torch.tensor([[0.3, 0.4]], dtype=torch.float64))
    >>> lp = trmath.project_kl_sparse(new, old, 0.02)
    >>> lp.shape, round(float(lp.exp().sum()), 12)
    (torch.Size([1, 3]), 1.0)
    """
    z, back = as_tensor(new_logprobs, "new_logprobs")
    w, _ = as_tensor(old_logprobs, "old_logprobs")
    z, w = check_pair(z, w, "new_logprobs", "old_logprobs")
    eps = _check_radius(epsilon, "epsilon")
    if (z.device.type == "cpu" and not (torch.is_grad_enabled() and (z.requires_grad or w.requires_grad))
            and _cpp_available(z)):
        from . import _backend

        if _backend.has_sparse_projection():
            # No graph to record: one core call (the same kernels, so the same bits as below);
            # a row that is not valid sends the call down the general path for its errors.
            res = _backend.project_kl_sparse_forward(z, w, eps, _mass_slack(z))
            if res is not None:
                out, eta = res
                return (back(out), back(eta)) if return_eta else back(out)
    names = ("new_logprobs", "old_logprobs")
    zt, wt, s = _with_tails(z, w, names, validate)
    out, eta = _project_kl(zt, wt, eps, 1.0, validate, names)
    out = out.to(_out_dtype(z.dtype))
    if not validate:
        # A row entirely -inf (which validation rejects) is NaN, value and gradient, not a
        # distribution put wholly in its tail.
        bad = torch.isneginf(s.detach()).any(0)
        if bool(bad.any()):
            out = out * torch.where(bad, math.nan, 1.0).to(out.dtype)
            eta = torch.where(bad.squeeze(-1), math.nan, eta)
    return (back(out), back(eta)) if return_eta else back(out)


# ---------------------------------------------------------------------------------------------
# TROLL's objective
# ---------------------------------------------------------------------------------------------
def troll_loss(logprob: Any, rollout_logprob: Any, advantages: Any, mask: Any = None, *,
               logits: torch.Tensor, rollout_logits: torch.Tensor, tokens: Any,
               epsilon: float = 0.05, alpha: float = 1.0, temperature: float = 1.0,
               aggregation: str | None = "token-mean", normalizer: Any = None,
               max_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""TROLL's trust-region objective on the KL projection of the policy.

    .. math::

        \ell_t = -A_t\,\frac{\tilde\pi(a_t)}{\mu(a_t)}
        + \alpha\,\mathrm{KL}\bigl(\pi\,\|\,\mathrm{sg}[\tilde\pi]\bigr), \qquad
        \tilde\pi = \mathrm{project\_kl}(\pi, \mu, \varepsilon),

    per token, with :math:`\pi` the policy being trained (``logits``) and :math:`\mu` the rollout
    policy (``rollout_logits``; the anchor of the ball and of the ratio). The surrogate's gradient
    reaches ``logits`` through the projection (its implicit gradient); the regulariser pulls the
    policy itself towards the detached projection. The calling convention is that of the
    policy losses of :mod:`trmath.objectives` (log-prob inputs first, full logits as keywords).

    Parameters
    ----------
    logprob : torch.Tensor, shape ``[B, T]``
        :math:`\log\pi(a_t)`, used for the metrics (``ratio_mean``); the gradient flows through
        ``logits``.
    rollout_logprob : shape ``[B, T]``
        :math:`\log\mu(a_t)` from the rollout engine: the denominator of the ratio.
    advantages : shape ``[B, T]`` or ``[B]``
    mask : shape ``[B, T]``, optional
        Valid tokens (bool or 0/1); all valid by default. At excluded positions the per-token
        inputs (``logprob``, ``rollout_logprob``, ``advantages``) may hold anything (they are
        selected out); the logits of every position are projected and must be valid rows.
    logits : torch.Tensor, shape ``[B, T, V]``
        Logits of :math:`\pi` (carry the gradient).
    rollout_logits : shape ``[B, T, V]``
        Logits of :math:`\mu` (treated as constants).
    tokens : integer tensor, shape ``[B, T]``
        The sampled tokens :math:`a_t`.
    epsilon : float, optional
        KL radius :math:`\varepsilon > 0`.
    alpha : float, optional
        Weight :math:`\alpha \ge 0` of the regulariser.
    temperature : float, optional
        Sampling temperature of the rollouts (both policies are scored at it).
    aggregation : str or None, optional
        One of ``trmath.AGGREGATIONS`` (default ``"token-mean"``), or ``None`` for the per-token
        loss matrix (0 at excluded positions).
    normalizer, max_length : optional
        As :func:`trmath.aggregate_loss` (a global normaliser under gradient accumulation).

    Returns
    -------
    loss : torch.Tensor
        0-d, or ``[B, T]`` with ``aggregation=None``.
    metrics : dict of 0-d tensors
        Over valid tokens only (0 when there are none): ``kl_new_old`` (mean
        :math:`\mathrm{KL}(\pi\|\mu)`), ``kl_new_proj`` (mean regulariser),
        ``projected_frac`` (fraction of tokens with :math:`\eta > 0`), ``eta_mean``,
        ``proj_ratio_mean`` (mean :math:`\tilde\pi(a)/\mu(a)`), ``ratio_mean`` (mean
        :math:`\pi(a)/\mu(a)`), ``n_tokens``.

    Examples
    --------
    >>> import torch, trmath
    >>> g = torch.Generator().manual_seed(0)
    >>> logits = torch.randn(2, 3, 8, generator=g).requires_grad_()
    >>> mu_logits = torch.randn(2, 3, 8, generator=g)
    >>> tok = torch.randint(0, 8, (2, 3), generator=g)
    >>> lp = torch.log_softmax(logits, -1).gather(-1, tok[..., None])[..., 0]
    >>> mu = torch.log_softmax(mu_logits, -1).gather(-1, tok[..., None])[..., 0]
    >>> loss, metrics = trmath.troll_loss(lp, mu, torch.randn(2, 3, generator=g),
    ...                                   logits=logits, rollout_logits=mu_logits, tokens=tok)
    >>> loss.backward(); sorted(metrics)[:3]
    ['eta_mean', 'kl_new_old', 'kl_new_proj']
    """
    from .exact import kl as _kl

    if not isinstance(logits, torch.Tensor) or not isinstance(rollout_logits, torch.Tensor):
        raise TypeError("logits, rollout_logits: expected torch.Tensor")
    T = check_temperature(temperature)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha: must be finite and >= 0, got {alpha!r}")
    names = ("logits", "rollout_logits")
    z, w, T, _ = _pair_args(logits, rollout_logits.detach(), T, True, kernel_checks=True, names=names)
    lead = tuple(z.shape[:-1])
    tok = check_tokens(tokens, z)
    if bool(((tok < 0) | (tok >= z.shape[-1])).any()):
        raise ValueError(f"tokens: ids must lie in [0, {z.shape[-1]})")

    def lead_tensor(x, name):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor")
        if tuple(x.shape) != lead:
            raise ValueError(f"{name}: expected shape {lead}, got {tuple(x.shape)}")
        return x

    lp_pi = lead_tensor(logprob, "logprob").detach().to(torch.float64)
    lp_mu = lead_tensor(rollout_logprob, "rollout_logprob").detach().to(torch.float64)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError("advantages: expected a torch.Tensor")
    A = advantages.detach().to(torch.float64)
    if A.dim() == len(lead) - 1 and tuple(A.shape) == lead[:-1]:
        A = A.unsqueeze(-1).expand(lead)
    lead_tensor(A, "advantages")
    from .objectives import _as_mask, _check_finite_where

    # Bool or 0/1, as every objective takes it (another value is an error, never "valid").
    valid = _as_mask(mask, lead, z.device)

    for x, name in ((lp_pi, "logprob"), (lp_mu, "rollout_logprob"), (A, "advantages")):
        _check_finite_where(x, valid, name)
    # (invalid rows of either logits are reported by the projection's first pass, named as here)
    lp_t, eta = _project_kl(z, w, _check_radius(epsilon, "epsilon"), T, True, names)
    lp_t_a = torch.gather(lp_t, -1, tok.to(torch.int64).unsqueeze(-1)).squeeze(-1).to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=z.device)
    # Selected out (never 0 * inf): padding may hold anything.
    proj_ratio = torch.exp(torch.where(valid, lp_t_a - lp_mu, zero))
    # KL(pi || sg pi~): pi~ passed as logits at temperature T (log-probs times T; at T = 1 the
    # projected log-probs themselves, no [B, T, V] temporary; otherwise one, in their dtype: the
    # product's rounding, 6e-8 relative, is far below that of the log-probs' own float32).
    w_t = lp_t.detach() if T == 1.0 else lp_t.detach() * T
    reg = _kl(z, w_t, temperature=T).to(torch.float64)
    token_loss = torch.where(valid, -torch.where(valid, A, zero) * proj_ratio + alpha * reg, zero)
    odt = _out_dtype(z.dtype)
    with torch.no_grad():
        n = valid.sum()

        def mean(x):
            return (torch.where(valid, x.to(torch.float64), zero).sum() / n.clamp(min=1)).to(odt)

        metrics = {
            "kl_new_old": mean(_kl(z.detach(), w, temperature=T)),
            "kl_new_proj": mean(reg),
            "projected_frac": mean((eta > 0).to(torch.float64)),
            "eta_mean": mean(eta),
            "proj_ratio_mean": mean(proj_ratio),
            "ratio_mean": mean(torch.exp(torch.where(valid, lp_pi - lp_mu, zero))),
            "n_tokens": n,
        }
    if aggregation is None:
        return token_loss.to(odt), metrics
    from .objectives import aggregate_loss

    loss = aggregate_loss(token_loss, valid, aggregation, normalizer=normalizer, max_length=max_length)
    return loss.to(odt), metrics
