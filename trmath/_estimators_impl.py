"""Numerical kernels of the sampled KL estimators (private).

Everything here works on float64 tensors. The log-ratio of the caller's log-probabilities is
carried as an exact unevaluated sum ``hi + lo`` (a two-sum), so that the estimators are accurate
to a few float64 ulps on the exact values the inputs represent, even where ``lr = o - s`` itself
rounds (float64 inputs of different magnitudes). Float32 and narrower inputs convert to float64
exactly and their difference is exact in float64 whenever the exponents differ by at most 29,
i.e. always in practice.

Error argument for ``k3(x) = expm1(x) - x`` (relative error of the float64 result):

* ``-1.6 <= x <= 1``: the Taylor series ``x^2 * sum_{j>=0} x^j / (j+2)!`` by Horner, 23 terms
  (the first neglected term is below ``1.6^23 / 25! < 4e-21`` of the leading ``1/2``). All
  terms are positive for ``x > 0``; for ``x < 0`` they alternate and the rounding errors are
  amplified by at most ``sum |terms| / |sum| = (e^{|x|} - 1 - |x|) / (e^{-|x|} - 1 + |x|)``,
  which is ``<= 2.8`` on ``[-1.6, 0]``.
* otherwise ``expm1(x) - x``: for ``x > 1`` the amplification is
  ``expm1(x) / (expm1(x) - x) <= 2.4``; for ``x < -1.6`` it is
  ``(|expm1(x)| + |x|) / k3(x) <= 3.2``.

so a few float64 ulps everywhere; rounding to float32 then adds half a float32 ulp. The tail
``lo`` of the log-ratio enters at first order: ``k3(hi + lo) = k3(hi) + expm1(hi) lo + O(lo^2)``.

The operator ``trmath::k_fwd`` below computes an estimator and its slope in one pass: on CPU
tensors with the compiled element kernel (``cpp/src/estimator_kernels.cpp``: the same
quantities in double lanes -- the series up to ``x = 2``, ``2^n expm1(r) + (2^n - 1) - x`` with
``x = n ln2 + r`` above, ``(e^x - 1) - x`` below ``-1.6`` -- measured within 2 ulps; one read of
the inputs, no float64 temporaries), on other devices with the torch functions here. Being a
custom operator with a fake kernel and an autograd formula, it traces into ``torch.compile``
graphs, so a compiled call runs the very kernel an eager one does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# 1/(j+2)! for j = 0..22, highest degree first (Horner order).
_K3_COEFFS = [1.0 / math.factorial(j + 2) for j in range(23)][::-1]
_SERIES_LO, _SERIES_HI = -1.6, 1.0


def two_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a - b = hi + lo`` exactly (Knuth's two-sum, float64); ``lo = 0`` where ``hi`` is not
    finite."""
    hi = a - b
    bv = hi - a
    lo = (a - (hi - bv)) + ((-b) - bv)
    lo = torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))
    return hi, lo


def _tail(a: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """``a * lo`` with ``0`` where ``lo == 0`` (so that ``inf * 0`` never makes a NaN)."""
    return torch.where(lo == 0, torch.zeros_like(a), a * lo)


def k3_value(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """``expm1(x) - x`` at ``x = hi + lo``: a few ulps everywhere, never negative.

    Both branches are non-negative by construction (series: ``x^2`` times a positive sum;
    direct: ``expm1(x) > x`` with a margin far above the rounding). The tail correction is
    ``|expm1(hi) lo| <= |expm1(hi)| ulp(hi) / 2``, far below ``k3(hi)``; no clamp is applied.
    """
    xs = hi.clamp(_SERIES_LO, _SERIES_HI)  # only keeps the unused lanes of the series finite
    acc = torch.full_like(xs, _K3_COEFFS[0])
    for c in _K3_COEFFS[1:]:
        acc = acc * xs + c
    series = xs * xs * acc
    with torch.no_grad():
        direct = torch.where(hi == math.inf, hi, torch.expm1(hi) - hi)
    base = torch.where((hi >= _SERIES_LO) & (hi <= _SERIES_HI), series, direct)
    return base + _tail(torch.expm1(hi), lo)


def k3_slope(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """``d k3 / d x = expm1(x)`` at ``x = hi + lo`` (``expm1`` is well conditioned)."""
    e = torch.expm1(hi)
    return e + _tail(e + 1.0, lo)


def k_value(kind: int, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    if kind == 1:
        return -(hi + lo)
    if kind == 2:
        return 0.5 * hi * hi + _tail(hi, lo)
    return k3_value(hi, lo)


def k_slope(kind: int, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    if kind == 1:
        return torch.full_like(hi, -1.0)
    if kind == 2:
        return hi + lo
    return k3_slope(hi, lo)


# ---------------------------------------------------------------------------------------------
# the operators: the estimate in one pass, its gradients in another (recomputed)
# ---------------------------------------------------------------------------------------------
def _torch_lanes(s: Tensor, o: Tensor) -> tuple[Tensor, Tensor]:
    """The log-ratio ``o - s`` as an exact float64 two-sum, ``s = +-inf`` and ``o = +inf``
    made NaN (the element kernel's rules, for the torch path)."""
    f64 = torch.float64
    xs, xo = s.to(f64), o.to(f64)
    xs = xs + torch.where(torch.isinf(xs), math.nan, 0.0).to(f64)
    xo = xo + torch.where(xo == math.inf, math.nan, 0.0).to(f64)
    return two_diff(xo, xs)


def _torch_weight(s: Tensor, b: Tensor) -> Tensor:
    """``exp(s - b)`` in float64 from the exact two-sum ``s - b = hi + lo`` (``e^hi (1 + lo)``),
    ``s`` or ``b = +-inf`` made NaN (the kernel's rules)."""
    f64 = torch.float64
    xs, xb = s.to(f64), b.to(f64)
    xs = xs + torch.where(torch.isinf(xs), math.nan, 0.0).to(f64)
    xb = xb + torch.where(torch.isinf(xb), math.nan, 0.0).to(f64)
    hi, lo = two_diff(xs, xb)
    e = torch.exp(hi)
    return torch.where((lo != 0) & torch.isfinite(e), e + e * lo, e)


def _wmul(w: Tensor, k: Tensor) -> Tensor:
    """``w k`` for a weight of :func:`_torch_weight` that under- or overflowed: 0 where ``k = 0``
    and ``k`` where ``k`` is infinite and ``w = 0`` (the exact product; never ``0 * inf``)."""
    r = w * k
    r = torch.where((k == 0) & ~torch.isnan(w), torch.zeros_like(r), r)
    return torch.where(torch.isinf(k) & (w == 0), k, r)


def k_fwd_impl(s: Tensor, o: Tensor, b: Optional[Tensor], valid: Optional[Tensor], value_kind: int,
               value64: bool, check: bool = False,
               tols: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> tuple[Tensor, bool]:
    """``k_{value_kind}(o - s)``, times ``exp(s - b)`` if ``b`` is given; float64 if
    ``value64``, else float32. ``s``, ``o`` (``b``) share shape and dtype; ``valid`` is a bool
    tensor of that shape or None. ``s = +-inf``, ``o = +inf`` and ``b = +-inf`` count as NaN;
    NaN gives NaN; entries where ``valid`` is False give 0. The second result (with ``check``):
    whether the caller's validation must look for a bad entry -- on CPU, whether the kernel saw
    one (``s``, ``b`` NaN, -inf or above their tolerance in ``tols``; ``o`` NaN or above its
    own); elsewhere always."""
    from . import _ops

    if _ops.use_cpp(s):
        return _ops._cpp().k_estimate(s.contiguous(), o.contiguous(),
                                      b.contiguous() if b is not None else None,
                                      valid.contiguous() if valid is not None else None,
                                      value_kind, value64, check, tols)
    hi, lo = _torch_lanes(s, o)
    val = k_value(value_kind, hi, lo)
    if b is not None:
        val = _wmul(_torch_weight(s, b), val)
    if valid is not None:
        val = torch.where(valid, val, torch.zeros((), dtype=val.dtype, device=s.device))
    return (val if value64 else val.to(torch.float32)), check


def k_bwd_impl(g: Tensor, s: Tensor, o: Tensor, b: Optional[Tensor], valid: Optional[Tensor],
               value_kind: int, slope_kind: int, need: tuple[bool, bool, bool]) -> tuple:
    """Gradients ``(gs, go, gb)`` of :func:`k_fwd_impl` with the slope of ``slope_kind``, in the
    inputs' dtype, recomputed (NaN where the value was NaN, 0 where ``valid`` is False); None
    where not needed."""
    from . import _ops

    if _ops.use_cpp(s):
        return _ops._cpp().k_estimate_backward(g, s.contiguous(), o.contiguous(),
                                               b.contiguous() if b is not None else None,
                                               valid.contiguous() if valid is not None else None,
                                               value_kind, slope_kind, need)
    hi, lo = _torch_lanes(s, o)
    f64 = torch.float64
    gd = g.to(f64)
    slope = torch.where(torch.isnan(hi), math.nan, k_slope(slope_kind, hi, lo))
    if b is None:
        go_, gs_, gb_ = gd * slope, -(gd * slope), None
    else:
        w = _torch_weight(s, b)
        gwk, gws = gd * _wmul(w, k_value(value_kind, hi, lo)), gd * _wmul(w, slope)
        go_, gs_, gb_ = gws, gwk - gws, -gwk
    outs = []
    for x, t, want in ((gs_, s, need[0]), (go_, o, need[1]), (gb_, b, need[2])):
        if not want or x is None:
            outs.append(None)
            continue
        if valid is not None:
            x = torch.where(valid, x, torch.zeros((), dtype=f64, device=x.device))
        outs.append(x.to(t.dtype))
    return tuple(outs)


@torch.library.custom_op("trmath::k_fwd", mutates_args=())
def k_fwd(s: Tensor, o: Tensor, b: Optional[Tensor], valid: Optional[Tensor], value_kind: int,
          slope_kind: int, value64: bool, check: bool, tols: list[float]) -> tuple[Tensor, Tensor]:
    val, bad = k_fwd_impl(s, o, b, valid, value_kind, value64, check, tuple(tols))
    return val, torch.tensor([int(bad)] if check else [], dtype=torch.int32)


@k_fwd.register_fake
def _(s, o, b, valid, value_kind, slope_kind, value64, check, tols):
    val = s.new_empty(s.shape, dtype=torch.float64 if value64 else torch.float32)
    return val, torch.empty((1,) if check else (0,), dtype=torch.int32)


@torch.library.custom_op("trmath::k_bwd", mutates_args=())
def k_bwd(g: Tensor, s: Tensor, o: Tensor, b: Optional[Tensor], valid: Optional[Tensor], value_kind: int,
          slope_kind: int, need: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    outs = k_bwd_impl(g, s, o, b, valid, value_kind, slope_kind, tuple(need))
    return tuple(x if x is not None else s.new_empty(0) for x in outs)  # distinct empties


@k_bwd.register_fake
def _(g, s, o, b, valid, value_kind, slope_kind, need):
    return tuple(torch.empty_like(s, memory_format=torch.contiguous_format) if (need[i] and (i < 2 or b is not None))
                 else s.new_empty(0) for i in range(3))


def _k_setup(ctx, inputs, output):
    s, o, b, valid, value_kind, slope_kind, value64, check, tols = inputs
    ctx.save_for_backward(s, o, b, valid)
    ctx.kinds = (value_kind, slope_kind)


def _k_backward(ctx, g, gflag):
    s, o, b, valid = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]),
            bool(b is not None and ctx.needs_input_grad[2])]
    if not any(need):
        return (None,) * 9
    outs = k_bwd(g, s, o, b, valid, ctx.kinds[0], ctx.kinds[1], need)
    return (*(x if want else None for x, want in zip(outs, need)), *([None] * 6))


k_fwd.register_autograd(_k_backward, setup_context=_k_setup)


def mismatch_sums_impl(s: Tensor, o: Tensor, valid: Tensor) -> Tensor:
    """float64 ``[6]``: sum lr, sum k3(lr), M = max lr, max |lr|, sum e^(lr - M),
    sum e^(2 (lr - M)) over the valid entries, ``lr = o - s`` (``s``, ``o`` of one dtype and
    shape, ``valid`` a bool tensor of that shape). A NaN at a valid entry (or ``s = +-inf``,
    ``o = +inf``) makes every value NaN; no valid entry gives M = -inf and 0 for the others. On
    CPU the element kernel's one pass (chunked sums, combined in a fixed order); elsewhere the
    torch functions of this module."""
    from . import _ops

    if _ops.use_cpp(s):
        return _ops._cpp().mismatch_sums(s.contiguous(), o.contiguous(), valid.contiguous())
    f64 = torch.float64
    zero = torch.zeros((), dtype=f64, device=s.device)
    ninf = torch.full((), -math.inf, dtype=f64, device=s.device)
    hi, lo = _torch_lanes(s, o)
    k3 = torch.where(valid, k_value(3, hi, lo), zero)
    nan = (valid & torch.isnan(hi)).any()
    x = torch.where(valid, hi, ninf)
    top = x.max() if x.numel() else ninf
    w = torch.exp(x - torch.where(torch.isfinite(top), top, zero))
    sums = torch.stack([torch.where(valid, hi, zero).sum() + torch.where(valid, lo, zero).sum(), k3.sum(), top,
                        torch.where(valid, hi.abs(), zero).max() if x.numel() else zero, w.sum(), (w * w).sum()])
    return torch.where(nan, torch.full_like(sums, math.nan), sums)


@torch.library.custom_op("trmath::mismatch_sums", mutates_args=())
def mismatch_sums_op(s: Tensor, o: Tensor, valid: Tensor) -> Tensor:
    return mismatch_sums_impl(s, o, valid)


@mismatch_sums_op.register_fake
def _(s, o, valid):
    return s.new_empty((6,), dtype=torch.float64)


def mismatch_sums(s: Tensor, o: Tensor, valid: Tensor) -> Tensor:
    """:func:`mismatch_sums_impl` (no gradient), through the custom operator when tracing."""
    from . import _ops

    if _ops.direct_call(s, o, valid):
        return mismatch_sums_impl(s, o, valid)
    return mismatch_sums_op(s, o, valid)


def k_estimate(s: Tensor, o: Tensor, b: Optional[Tensor], valid: Optional[Tensor], value_kind: int,
               slope_kind: int, value64: bool,
               check: Optional[tuple[float, float, float]] = None) -> tuple[Tensor, bool]:
    """The estimator of ``lr = o - s`` (importance weighted by ``exp(s - b)`` if ``b`` is
    given) with autograd (slope ``slope_kind``, recomputed in the backward from the inputs:
    nothing else is kept); the direct body when no gradient is wanted and nothing traces (see
    ``trmath._ops.direct_call``). ``check``: the tolerances of ``s``, ``o``, ``b`` to validate
    in the same pass; the second result is then whether the caller must run its own validation
    (which finds and names the bad entry), else False."""
    from . import _ops

    ts = [s, o] + ([b] if b is not None else [])
    if any(t.dtype != s.dtype for t in ts):  # all exact in float64
        ts = [t.to(torch.float64) for t in ts]
    s, o = ts[0], ts[1]
    b = ts[2] if b is not None else None
    tols = tuple(check) if check is not None else (0.0, 0.0, 0.0)
    if _ops.direct_call(s, o, b, valid):
        val, bad = k_fwd_impl(s, o, b, valid, value_kind, value64, check is not None, tols)
        return val, bool(bad)
    val, flag = k_fwd(s, o, b, valid, value_kind, slope_kind, value64, check is not None, list(tols))
    return val, (check is not None and bool(flag[0]))
