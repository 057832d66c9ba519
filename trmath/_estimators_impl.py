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
"""

from __future__ import annotations

import math

import torch

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


class KOfLogRatio(torch.autograd.Function):
    """``value_kind(x)`` forward, ``slope_kind(x) * grad`` backward, ``x = hi + lo`` (lo constant).

    The straight-through estimators use a value kind and a different slope kind.
    """

    @staticmethod
    def forward(ctx, hi, lo, value_kind: int, slope_kind: int):  # type: ignore[override]
        ctx.save_for_backward(hi, lo)
        ctx.slope_kind = slope_kind
        return k_value(value_kind, hi, lo)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        hi, lo = ctx.saved_tensors
        return g * k_slope(ctx.slope_kind, hi, lo), None, None, None
