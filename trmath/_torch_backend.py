r"""Pure-PyTorch backend for the exact full-vocabulary reductions.

This module serves every device the compiled CPU kernels do not (CUDA, MPS, ...), and it is the
parity reference for those kernels.  It is written only with device-agnostic ``torch`` operations.

Conventions
-----------
Every function takes logits ``z`` of shape ``[N, V]`` (any strides; float16, bfloat16, float32 or
float64) and a temperature ``T > 0``; row ``n`` describes the distribution
:math:`p = \operatorname{softmax}(z_n / T)`.  A logit of ``-inf`` is a masked token (:math:`p_i = 0`
exactly).  A row that contains NaN or ``+inf``, or whose logits are all ``-inf``, is *invalid*: its
outputs and its stats are NaN, never a silent number.  Values are not validated with exceptions
(the public layer does that); wrong ranks, shapes and dtypes raise :class:`TypeError` /
:class:`ValueError`.

Results are float32 for 16/32-bit inputs and float64 when an input is float64.  All arithmetic is
done in float64, over blocks of rows holding at most :data:`_CHUNK_ELEMS` elements each, so no
``[N, V]`` float64 temporary is ever built.  Gradients come back in the dtype of the input they
belong to.

Each forward also returns float64 per-row *stats* that its backward consumes:

* single-input ops (``lse``, ``entropy``, ``token_logprobs``): ``[lse, H, m, L]`` with
  :math:`\mathrm{lse} = \log\sum_i e^{z_i/T}`, :math:`H` the entropy (0 when not computed),
  :math:`m` the row's largest logit and :math:`L = \log\sum_i e^{(z_i - m)/T}`: the backward
  forms :math:`\log p_i = (z_i - m)/T - L` (exact :math:`z_i - m`), which keeps its relative
  accuracy where :math:`p_i \to 1` (:math:`z_i/T - \mathrm{lse}` is rounded at the size of
  lse);
* pair ops (``kl``, ``tv``, ``js``): ``[lse_p, lse_q, a, b, c_hi, c_lo]`` where
  ``c_hi + c_lo`` (an unevaluated sum, logit units) is the accurate centre
  :math:`C = T(\mathrm{lse}_p - \mathrm{lse}_q)` that defines :math:`\varepsilon_i = \log p_i -
  \log q_i = (z_i - w_i - C)/T`; ``a = KL(p||q), b = 0`` for ``kl``; :math:`a = \sum_i p_i s_i`,
  :math:`b = \sum_i q_i s_i` with :math:`s_i = \operatorname{sign}(p_i - q_i)` for ``tv``;
  :math:`a = KL(p\|m)`, :math:`b = KL(q\|m)` for ``js``. The backward of ``kl`` and ``js`` takes
  a dominant token's entry (one holding more than half of ``p``, or of ``q``) as minus the sum
  of the row's other entries where that is the more accurate (the row sums to 0): formed
  directly it is a small difference of numbers of the size of the logits.

Numerical approach
------------------
The library exists because the textbook formulas cancel catastrophically where trust regions live
(:math:`p \approx q`).  Here every reduction is a sum of non-negative terms, each computed to a few
ulps, so that the *relative* error of the sum is a few ulps times a small factor:

* the normaliser is taken around the row maximum :math:`m`,
  :math:`\mathrm{lse} = m/T + \operatorname{log1p}(r)` with
  :math:`r = \sum_{i \ne \arg\max} e^{(z_i - m)/T}`, so that
  :math:`\log p_{\max} = -\operatorname{log1p}(r)` keeps full relative accuracy for peaked rows;
  where that sum cancels (:math:`|m/T| + |\operatorname{log1p}(r)| > 100\,|\mathrm{lse}|`, e.g.
  float64 log-probabilities passed as logits), ``lse_forward`` sums the row again in double-double;
* the entropy is :math:`H = \sum_i p_i (\operatorname{log1p}(r) - x_i)` with
  :math:`x_i = (z_i - m)/T \le 0`: two non-negative parts per term;
* the centred log-ratio :math:`\varepsilon_i` is formed from an error-free difference of the raw
  logits (TwoSum) and a double-double normaliser difference, refined once by
  :math:`c \leftarrow c +
  \operatorname{log1p}\bigl(\sum_i q_i\,\operatorname{expm1}(\varepsilon_i)\bigr)`;
* :math:`KL(p\|q) = \sum_i q_i\,\varphi(\varepsilon_i)` with
  :math:`\varphi(e) = e\,e^{e} - \operatorname{expm1}(e) \ge 0` (the identity uses
  :math:`\sum_i p_i = \sum_i q_i = 1`);
* :math:`TV = \sum_{\varepsilon_i > 0} q_i \operatorname{expm1}(\varepsilon_i)
  = -\sum_{\varepsilon_i < 0} q_i \operatorname{expm1}(\varepsilon_i)`, summed over the side that
  is insensitive to the resolution of :math:`c`;
* :math:`JS = \tfrac12\sum_i m_i\,[\varphi(\delta^p_i) + \varphi(\delta^q_i)]` with
  :math:`\delta^p = \log(p/m)`, :math:`\delta^q = \log(q/m)`, written through ``log1p``/``expm1`` of
  :math:`\varepsilon`.

Error.  The one rounding that is not removed is that of the scaled gaps :math:`x_i = (z_i - m)/T`,
which ``exp`` turns into a relative error of about :math:`2u|x_i|` (:math:`u = 2^{-53}`) in
:math:`p_i`.  The relative error of every result is therefore a few ulps times
:math:`1 + |x_i|` over the tokens that carry the value: about ``1e-15`` for ordinary rows and at
most about ``2e-13`` when the value is carried by probabilities near the float64 underflow threshold
(:math:`|x_i| \approx 700`) — below the ``1e-12`` target for float64 inputs, on random,
near-identical (KL down to ``1e-12`` and far below, with or without a constant offset between the
two rows), peaked (logit spread ``1e4``) and masked rows.  For 16/32-bit inputs the error is the
float32 rounding of the result.  (``lse`` itself has an absolute error of a few ulps of ``|m|/T``.)

Determinism.  A row's result does not depend on :data:`_CHUNK_ELEMS` or on the other rows, except
that PyTorch may split a long reduction across threads differently for different block shapes
(observed on CPU for ``V`` around ``1e5`` and several threads), which changes the last bits.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "lse_forward",
    "lse_backward",
    "entropy_forward",
    "entropy_backward",
    "token_logprobs_forward",
    "token_logprobs_backward",
    "kl_forward",
    "kl_backward",
    "tv_forward",
    "tv_backward",
    "js_forward",
    "js_backward",
]

#: Upper bound on the number of elements of one block of rows processed at a time.  Read at call
#: time, so it can be changed (tests use it to force many small blocks).
_CHUNK_ELEMS: int = 1 << 24

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INF = math.inf
_NAN = math.nan
_LN2 = math.log(2.0)

#: Below this magnitude, phi(e) is summed from its Taylor series (``1 + e^e (e - 1)`` cancels).
_PHI_SERIES_RADIUS = 0.5
#: Taylor coefficients of phi(e) = sum_{n >= 2} (n - 1) / n! e^n, n = 2 .. 18.  For |e| < 0.5 the
#: first omitted term is below 3e-21 times the leading one.
_PHI_COEFFS: tuple[float, ...] = tuple((n - 1) / math.factorial(n) for n in range(2, 19))
#: Above this centred log-ratio, ``q * expm1(eps)`` is replaced by ``p - q`` (no overflow of e^eps,
#: no cancellation since p > e q).
_EPS_SPLIT = 1.0


# ----------------------------------------------------------------------------------------------
# argument checks and small helpers
# ----------------------------------------------------------------------------------------------


def _check_logits(x: object, name: str) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, V], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _check_pair(z: object, w: object) -> tuple[Tensor, Tensor]:
    z = _check_logits(z, "z")
    w = _check_logits(w, "w")
    if z.shape != w.shape:
        raise ValueError(
            f"z and w must have the same shape, got {tuple(z.shape)} and {tuple(w.shape)}"
        )
    return z, w


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {t}")
    if t < 1e-30:
        raise ValueError(f"temperature must be >= 1e-30 (1/T overflows float arithmetic below it), got {t}")
    return t


def _check_rowvec(g: object, n: int, name: str) -> Tensor:
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(g).__name__}")
    if not g.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {g.dtype}")
    if g.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(g.shape)}")
    return g


def _check_stats(stats: object, n: int, s: int) -> Tensor:
    if not isinstance(stats, torch.Tensor):
        raise TypeError(f"stats must be a torch.Tensor, got {type(stats).__name__}")
    if not stats.is_floating_point():
        raise TypeError(f"stats must be a floating-point tensor, got {stats.dtype}")
    if stats.shape != (n, s):
        raise ValueError(f"stats must have shape ({n}, {s}), got {tuple(stats.shape)}")
    return stats


def _check_tokens(tokens: object, n: int) -> Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.shape != (n,):
        raise ValueError(f"tokens must have shape ({n},), got {tuple(tokens.shape)}")
    return tokens


def _result_dtype(*xs: Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _row_blocks(n: int, v: int) -> Iterator[slice]:
    """Slices of at most ``max(1, _CHUNK_ELEMS // v)`` rows covering ``range(n)``."""
    rows = max(1, int(_CHUNK_ELEMS) // max(v, 1))
    for r0 in range(0, n, rows):
        yield slice(r0, min(n, r0 + rows))


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Error-free sum: ``s + e == a + b`` exactly with ``s = fl(a + b)`` (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _phi(e: Tensor) -> Tensor:
    r""":math:`\varphi(e) = e\,e^{e} - \operatorname{expm1}(e) = 1 + e^{e}(e - 1) \ge 0`.

    A Taylor series :math:`\sum_{n\ge2} \frac{n-1}{n!} e^n` is used for :math:`|e| < 0.5`, where the
    closed form cancels; elsewhere the closed form loses at most a factor ~10 to cancellation.
    :math:`\varphi(-\infty) = 1`, :math:`\varphi(+\infty) = +\infty`.  Relative error: a few ulps.
    """
    small = e.abs() < _PHI_SERIES_RADIUS
    es = torch.where(small, e, torch.zeros_like(e))
    acc = torch.full_like(e, _PHI_COEFFS[-1])
    for c in reversed(_PHI_COEFFS[:-1]):
        acc.mul_(es).add_(c)
    series = acc.mul_(es).mul_(es)
    el = torch.where(small, torch.zeros_like(e), e)
    closed = 1.0 + torch.exp(el) * (el - 1.0)
    closed = torch.where(el == -_INF, torch.ones_like(e), closed)
    return torch.where(small, series, closed)


class _Norm(NamedTuple):
    """Normaliser of one block of rows (float64).

    ``x = (z - m)/T <= 0`` with ``max x = 0``; ``e = exp(x)``; ``rest`` the sum of ``e`` without one
    arg-max entry; ``L = log1p(rest)`` so that ``lse = m/T + L``; ``bad`` flags invalid rows.
    """

    m: Tensor
    x: Tensor
    e: Tensor
    rest: Tensor
    L: Tensor
    bad: Tensor


def _normaliser(z: Tensor, temperature: float) -> _Norm:
    m = torch.amax(z, dim=1)
    bad = torch.isnan(z).any(dim=1) | torch.isposinf(z).any(dim=1) | (m == -_INF)
    x = z - m[:, None]
    if temperature != 1.0:
        x = x / temperature
    e = torch.exp(x)
    idx = torch.argmax(x, dim=1, keepdim=True)
    e.scatter_(1, idx, 0.0)
    rest = e.sum(dim=1)
    e.scatter_(1, idx, 1.0)  # exp(0) of the arg-max entry (valid rows)
    return _Norm(m, x, e, rest, torch.log1p(rest), bad)


def _lse_of(norm: _Norm, temperature: float) -> Tensor:
    return norm.m / temperature + norm.L


_SINGLE_STATS = 4  # [lse, H, m, L] per row (the module notes)
_PAIR_STATS = 6  # [lse_p, lse_q, a, b, c_hi, c_lo] per row (the module notes)


def _single_stats(stats: Tensor, rows: slice, norm: _Norm, lse: Tensor, h: Tensor | None) -> None:
    """Fill ``stats[rows]`` = ``[lse, H, m, L]`` (``H = 0`` when ``h`` is None); NaN on invalid rows."""
    stats[rows, 0] = _nan_rows(lse, norm.bad)
    stats[rows, 1] = _nan_rows(h if h is not None else torch.zeros_like(lse), norm.bad)
    stats[rows, 2] = _nan_rows(norm.m, norm.bad)
    stats[rows, 3] = _nan_rows(norm.L, norm.bad)


def _logp_of(zc: Tensor, st: Tensor, temperature: float, centred: bool = False) -> Tensor:
    """``log p = (z - m)/T - L`` of a block of float64 rows from their stats (``z - m`` exact);
    ``centred``: ``(z - m)/T`` alone."""
    x = zc - st[:, 2:3]
    if temperature != 1.0:
        x = x / temperature
    return x if centred else x - st[:, 3:4]


def _dd_div(h: Tensor, lo: Tensor, d: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(h + lo) / d`` as a double-double (the remainder of the first quotient formed exactly);
    ``d`` a number or a tensor of the shape of ``h``."""
    from ._coarse_impl import _quick_two_sum, _split, _two_prod_split

    dt = d if isinstance(d, Tensor) else torch.full_like(h, d)
    q1 = h / dt
    dh, dl = _split(dt)
    p, e = _two_prod_split(q1, dt, dh, dl)
    return _quick_two_sum(q1, (((h - p) - e) + lo) / dt)


def _lse_dd(z: Tensor, m: Tensor, temperature: float) -> Tensor:
    r"""Row-wise logsumexp of valid float64 rows ``z`` (maxima ``m``) in double-double, for rows
    whose :math:`m/T + \operatorname{log1p}(r)` cancels (float64 log-probabilities summing to
    :math:`1 - 10^{-26}` have :math:`\mathrm{lse} \approx -10^{-26}` next to terms of
    :math:`10^{-9}`). Every :math:`z_i - m` is formed exactly, each :math:`e^{(z_i - m)/T}` to about
    :math:`10^{-30}`; the :math:`k` maxima are counted apart from the sum :math:`s` of the others,
    and :math:`\log(k + s) = \log k + \operatorname{log1p}(s/k)` with one Newton step whose
    residual is formed relative to :math:`s` (as the compiled kernels do)."""
    from ._coarse_impl import _dd_add, _dd_mul, _dd_sum_last, _quick_two_sum, _two_sum, dd_exp, dd_expm1

    mm = m[:, None].expand_as(z)
    live = ~torch.isneginf(z)
    top = (z == mm) & live
    xh, xl = _two_sum(torch.where(live, z, mm), -mm)  # exact; 0 on masked entries (dropped below)
    if temperature != 1.0:
        xh, xl = _dd_div(xh, xl, temperature)
    eh, el = dd_exp(xh)
    eh, el = _quick_two_sum(eh, el + eh * (xl + 0.5 * xl * xl))  # * e^xl, |xl| <= ulp(xh) / 2
    keep = live & ~top
    zero = torch.zeros_like(eh)
    sh, sl = _dd_sum_last(torch.where(keep, eh, zero), torch.where(keep, el, zero))
    k = top.sum(dim=1).to(z.dtype)
    one = torch.ones_like(k)
    uh, ul = sh, sl
    many = k > 1
    if bool(many.any()):  # u = s / k
        qh, ql = _dd_div(sh, sl, k)
        uh, ul = torch.where(many, qh, sh), torch.where(many, ql, sl)
    # log1p(u) = y + (u e^-y + expm1(-y)), y = log1p(u) in double
    y = torch.log1p(uh + ul)
    mh, ml = dd_expm1(-y)
    ah, al = _dd_add(mh, ml, one, torch.zeros_like(k))
    ph, pl = _dd_mul(uh, ul, ah, al)
    rh, rl = _dd_add(ph, pl, mh, ml)
    Lh, Ll = _two_sum(y, rh)
    Ll = Ll + rl
    if bool(many.any()):  # + log k = y0 + (k e^-y0 - 1)
        y0 = torch.log(k)
        gh, gl = dd_exp(-y0)
        th, tl = _dd_mul(gh, gl, k, torch.zeros_like(k))
        th, tl = _dd_add(th, tl, -one, torch.zeros_like(k))
        kh, kl = _two_sum(y0, th)
        kh, kl = _dd_add(kh, kl + tl, Lh, Ll)
        Lh, Ll = torch.where(many, kh, Lh), torch.where(many, kl, Ll)
    Mh, Ml = (m, torch.zeros_like(m)) if temperature == 1.0 else _dd_div(m, torch.zeros_like(m), temperature)
    oh, ol = _dd_add(Mh, Ml, Lh, Ll)
    return oh + ol


def _entropy_of(norm: _Norm) -> Tensor:
    """:math:`H = \\sum_i e_i (L - x_i) / (1 + r)`: non-negative terms only."""
    term = norm.e * (norm.L[:, None] - norm.x)
    term = torch.where(norm.x == -_INF, torch.zeros_like(term), term)
    return term.sum(dim=1) / (1.0 + norm.rest)


def _nan_rows(t: Tensor, bad: Tensor) -> Tensor:
    """Set the rows (first axis) flagged by ``bad`` to NaN."""
    if t.dim() == 1:
        return torch.where(bad, torch.full_like(t, _NAN), t)
    return torch.where(bad[:, None], torch.full_like(t, _NAN), t)


def _zero_masked(grad: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, torch.zeros_like(grad), grad)


def _empty_vocab_forward(
    n: int, s: int, device: torch.device, dtype: torch.dtype, k: int
) -> tuple[Tensor, ...]:
    """Outputs for ``V = 0``: no distribution, every row invalid."""
    outs = tuple(torch.full((n,), _NAN, dtype=dtype, device=device) for _ in range(k))
    return outs + (torch.full((n, s), _NAN, dtype=torch.float64, device=device),)


# ----------------------------------------------------------------------------------------------
# single-input reductions
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def lse_forward(z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    r"""Row-wise log-sum-exp at a temperature.

    .. math::

        \mathrm{lse}(z) = \log \sum_i e^{z_i / T}
            = \frac{m}{T} + \operatorname{log1p}\Bigl(\sum_{i \ne i^*} e^{(z_i - m)/T}\Bigr),
        \qquad m = z_{i^*} = \max_i z_i .

    Parameters
    ----------
    z : Tensor
        Logits ``[N, V]``, any float dtype and strides.
    temperature : float
        ``T > 0``.

    Returns
    -------
    out : Tensor
        ``[N]``, float32 (float64 for float64 input).
    stats : Tensor
        ``[N, 4]`` float64, ``[lse, 0, m, L]`` (the module notes).

    Notes
    -----
    Every summand lies in ``[0, 1]``; the absolute error is a few ulps of ``|m|/T`` plus a few ulps
    of the ``log1p`` term, and where that would be more than ``100 * 2^-53`` of the result (the
    sum cancels) the row is summed again in double-double (:func:`_lse_dd`), which keeps about
    ``1e-30`` of its terms.  Invalid rows give NaN.
    """
    z = _check_logits(z, "z")
    t = _check_temperature(temperature)
    n, v = z.shape
    dtype = _result_dtype(z)
    if v == 0:
        return _empty_vocab_forward(n, _SINGLE_STATS, z.device, dtype, 1)  # type: ignore[return-value]
    out = torch.empty(n, dtype=dtype, device=z.device)
    stats = torch.zeros(n, _SINGLE_STATS, dtype=torch.float64, device=z.device)
    for rows in _row_blocks(n, v):
        zb = z[rows].to(torch.float64)
        norm = _normaliser(zb, t)
        lse = _lse_of(norm, t)
        # m/T + log1p(r) cancels for log-probabilities passed as logits: where the absolute
        # error (a few ulps of |m/T| + |log1p r|) would be a large relative one, double-double.
        need = ~norm.bad & ((norm.m.abs() / t + norm.L.abs()) > 100.0 * lse.abs())
        if bool(need.any()):
            idx = need.nonzero(as_tuple=True)[0]
            lse = lse.clone()
            lse[idx] = _lse_dd(zb[idx], norm.m[idx], t)
        lse = _nan_rows(lse, norm.bad)
        out[rows] = lse.to(dtype)
        _single_stats(stats, rows, norm, lse, None)
    return out, stats


@torch.no_grad()
def lse_backward(g: Tensor, z: Tensor, stats: Tensor, temperature: float) -> Tensor:
    r"""Gradient of :func:`lse_forward`: :math:`\partial/\partial z_j = g\,p_j / T`.

    Parameters
    ----------
    g : Tensor
        Upstream gradient ``[N]``.
    z : Tensor
        Logits ``[N, V]`` given to the forward.
    stats : Tensor
        ``[N, 4]`` from the forward.
    temperature : float
        ``T > 0``.

    Returns
    -------
    Tensor
        ``dz`` ``[N, V]`` in ``z.dtype``; zero where ``z = -inf``, NaN on rows with NaN stats.
    """
    z = _check_logits(z, "z")
    t = _check_temperature(temperature)
    n, v = z.shape
    g = _check_rowvec(g, n, "g")
    stats = _check_stats(stats, n, _SINGLE_STATS)
    dz = torch.empty(n, v, dtype=z.dtype, device=z.device)
    for rows in _row_blocks(n, v):
        zc = z[rows].to(torch.float64)
        st = stats[rows].to(torch.float64)
        gc = g[rows].to(torch.float64)
        p = torch.exp(_logp_of(zc, st, t))
        grad = _zero_masked(gc[:, None] * p / t, zc == -_INF)
        dz[rows] = _nan_rows(grad, st.isnan().any(dim=1)).to(z.dtype)
    return dz


@torch.no_grad()
def entropy_forward(z: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    r"""Row-wise Shannon entropy at a temperature.

    .. math::

        H(p) = -\sum_i p_i \log p_i = \sum_i p_i\,(\mathrm{lse} - z_i/T)
             = \frac{1}{1 + r}\sum_i e^{x_i}\,\bigl(\operatorname{log1p}(r) - x_i\bigr),

    with :math:`x_i = (z_i - m)/T \le 0` and :math:`r = \sum_{i \ne i^*} e^{x_i}`;
    :math:`0 \log 0 = 0` at masked tokens.

    Parameters
    ----------
    z : Tensor
        Logits ``[N, V]``.
    temperature : float
        ``T > 0``.

    Returns
    -------
    out : Tensor
        ``[N]`` entropies, float32 (float64 for float64 input).
    stats : Tensor
        ``[N, 4]`` float64, ``[lse, H, m, L]``.

    Notes
    -----
    Both factors of every term are non-negative, so the relative error is a few ulps times
    ``1 + max |x_i|`` over the tokens that carry the entropy, also for peaked rows where
    ``H`` is tiny.  Invalid rows give NaN.
    """
    z = _check_logits(z, "z")
    t = _check_temperature(temperature)
    n, v = z.shape
    dtype = _result_dtype(z)
    if v == 0:
        return _empty_vocab_forward(n, _SINGLE_STATS, z.device, dtype, 1)  # type: ignore[return-value]
    out = torch.empty(n, dtype=dtype, device=z.device)
    stats = torch.empty(n, _SINGLE_STATS, dtype=torch.float64, device=z.device)
    for rows in _row_blocks(n, v):
        norm = _normaliser(z[rows].to(torch.float64), t)
        h = _nan_rows(_entropy_of(norm), norm.bad)
        out[rows] = h.to(dtype)
        _single_stats(stats, rows, norm, _lse_of(norm, t), h)
    return out, stats


@torch.no_grad()
def entropy_backward(g: Tensor, z: Tensor, stats: Tensor, temperature: float) -> Tensor:
    r"""Gradient of :func:`entropy_forward`: :math:`\partial H/\partial z_j = -p_j(\log p_j + H)/T`.

    Parameters
    ----------
    g : Tensor
        Upstream gradient ``[N]``.
    z : Tensor
        Logits ``[N, V]``.
    stats : Tensor
        ``[N, 4]`` from the forward (``[lse, H, m, L]``).
    temperature : float
        ``T > 0``.

    Returns
    -------
    Tensor
        ``dz = -g p (log p + H) / T`` in ``z.dtype``; zero where ``z = -inf``; NaN on rows with NaN
        stats.
    """
    z = _check_logits(z, "z")
    t = _check_temperature(temperature)
    n, v = z.shape
    g = _check_rowvec(g, n, "g")
    stats = _check_stats(stats, n, _SINGLE_STATS)
    dz = torch.empty(n, v, dtype=z.dtype, device=z.device)
    for rows in _row_blocks(n, v):
        zc = z[rows].to(torch.float64)
        st = stats[rows].to(torch.float64)
        gc = g[rows].to(torch.float64)
        x = _logp_of(zc, st, t, centred=True)
        # log p + H as (z - m)/T + (H - L): the row constant H - L is formed apart, so neither
        # near-uniform rows (log p ~ -H) nor peaked ones (H ~ 1e-11 next to lse ~ 30) cancel
        grad = -gc[:, None] * torch.exp(x - st[:, 3:4]) * (x + (st[:, 1:2] - st[:, 3:4])) / t
        grad = _zero_masked(grad, zc == -_INF)
        dz[rows] = _nan_rows(grad, st.isnan().any(dim=1)).to(z.dtype)
    return dz


@torch.no_grad()
def token_logprobs_forward(
    z: Tensor, tokens: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Log-probability of one token per row, optionally with the row's entropy.

    .. math::

        \log p_{t} = z_t/T - \mathrm{lse}(z/T) = x_t - \operatorname{log1p}(r),

    a sum of two non-positive numbers (:math:`x_t = (z_t - m)/T \le 0`, see :func:`lse_forward`), so
    :math:`\log p_t` keeps full relative accuracy even when :math:`p_t \to 1`.

    Parameters
    ----------
    z : Tensor
        Logits ``[N, V]``.
    tokens : Tensor
        ``[N]`` integer token ids.  An id outside ``[0, V)`` gives a NaN log-probability (the ids
        are validated by the public layer).
    temperature : float
        ``T > 0``.
    with_entropy : bool
        Also compute the entropy (see :func:`entropy_forward`); otherwise ``H`` is zeros.

    Returns
    -------
    lp : Tensor
        ``[N]`` log-probabilities (``-inf`` for a masked token), float32 or float64.
    H : Tensor
        ``[N]`` entropies, or zeros.
    stats : Tensor
        ``[N, 4]`` float64, ``[lse, H, m, L]`` (``H = 0`` when not computed).
    """
    z = _check_logits(z, "z")
    t = _check_temperature(temperature)
    n, v = z.shape
    tokens = _check_tokens(tokens, n)
    dtype = _result_dtype(z)
    if v == 0:
        lp, h, stats = _empty_vocab_forward(n, _SINGLE_STATS, z.device, dtype, 2)
        if not with_entropy:
            h.zero_()
        return lp, h, stats
    lp_out = torch.empty(n, dtype=dtype, device=z.device)
    h_out = torch.zeros(n, dtype=dtype, device=z.device)
    stats = torch.zeros(n, _SINGLE_STATS, dtype=torch.float64, device=z.device)
    for rows in _row_blocks(n, v):
        norm = _normaliser(z[rows].to(torch.float64), t)
        tok = tokens[rows].to(torch.int64)
        ok = (tok >= 0) & (tok < v)
        safe = torch.where(ok, tok, torch.zeros_like(tok))
        lp = norm.x.gather(1, safe[:, None]).squeeze(1) - norm.L
        lp = torch.where(ok, lp, torch.full_like(lp, _NAN))
        lp_out[rows] = _nan_rows(lp, norm.bad).to(dtype)
        h = None
        if with_entropy:
            h = _nan_rows(_entropy_of(norm), norm.bad)
            h_out[rows] = h.to(dtype)
        _single_stats(stats, rows, norm, _lse_of(norm, t), h)
    return lp_out, h_out, stats


@torch.no_grad()
def token_logprobs_backward(
    g_lp: Tensor | None,
    g_h: Tensor | None,
    z: Tensor,
    tokens: Tensor,
    stats: Tensor,
    temperature: float,
) -> Tensor:
    r"""Gradient of :func:`token_logprobs_forward`.

    .. math::

        \frac{\partial}{\partial z_j} = \frac{g_1(\delta_{jt} - p_j) - g_2\,p_j(\log p_j + H)}{T},

    the token's own :math:`1 - p_t` as :math:`-\operatorname{expm1}(\log p_t)` (no cancellation as
    :math:`p_t \to 1`).

    Parameters
    ----------
    g_lp : Tensor or None
        Upstream gradient of the log-probabilities ``[N]`` (None: zero).
    g_h : Tensor or None
        Upstream gradient of the entropies ``[N]`` (None: zero).  Requires ``stats[:, 1]`` to hold
        the entropy, i.e. a forward with ``with_entropy=True``.
    z : Tensor
        Logits ``[N, V]``.
    tokens : Tensor
        ``[N]`` token ids.
    stats : Tensor
        ``[N, 4]`` from the forward.
    temperature : float
        ``T > 0``.

    Returns
    -------
    Tensor
        ``dz`` in ``z.dtype``; zero where ``z = -inf``; NaN on rows with NaN stats and, when
        ``g_lp`` is given, on rows whose token id is outside ``[0, V)``.
    """
    z = _check_logits(z, "z")
    t = _check_temperature(temperature)
    n, v = z.shape
    tokens = _check_tokens(tokens, n)
    stats = _check_stats(stats, n, _SINGLE_STATS)
    if g_lp is not None:
        g_lp = _check_rowvec(g_lp, n, "g_lp")
    if g_h is not None:
        g_h = _check_rowvec(g_h, n, "g_h")
    dz = torch.empty(n, v, dtype=z.dtype, device=z.device)
    for rows in _row_blocks(n, v):
        zc = z[rows].to(torch.float64)
        st = stats[rows].to(torch.float64)
        x = _logp_of(zc, st, t, centred=True)
        p = torch.exp(x - st[:, 3:4])
        grad = torch.zeros_like(zc)
        bad = st.isnan().any(dim=1)
        if g_lp is not None:
            g1 = g_lp[rows].to(torch.float64)
            tok = tokens[rows].to(torch.int64)
            ok = (tok >= 0) & (tok < v)
            safe = torch.where(ok, tok, torch.zeros_like(tok))[:, None]
            # delta_jt - p_j, with the token's own 1 - p_t = -expm1(log p_t): 1 - p_t cancels
            # as p_t -> 1 (1e-16 absolute next to 1 - p_t ~ 1e-11 for a confident token)
            one_minus = -torch.expm1(x.gather(1, safe) - st[:, 3:4])
            grad = grad + g1[:, None] * (-p).scatter_(1, safe, one_minus)
            bad = bad | ~ok
        if g_h is not None:
            g2 = g_h[rows].to(torch.float64)
            grad = grad - g2[:, None] * p * (x + (st[:, 1:2] - st[:, 3:4]))
        grad = _zero_masked(grad / t, zc == -_INF)
        dz[rows] = _nan_rows(grad, bad).to(z.dtype)
    return dz


# ----------------------------------------------------------------------------------------------
# pair reductions: kl, tv, js
# ----------------------------------------------------------------------------------------------


class _Pair(NamedTuple):
    r"""Block of two rows aligned token by token (float64).

    ``eps = log p - log q`` (``0`` where both are masked, ``-inf`` where only ``p`` is, ``+inf``
    where only ``q`` is); ``p``, ``q`` the probabilities; ``zmask``, ``wmask`` the masked tokens;
    ``lse_p``, ``lse_q`` the normalisers; ``c_hi + c_lo`` the centre :math:`T(\mathrm{lse}_p -
    \mathrm{lse}_q)` of ``eps`` (logit units) as an unevaluated sum; ``bad`` the invalid rows.
    """

    eps: Tensor
    p: Tensor
    q: Tensor
    zmask: Tensor
    wmask: Tensor
    lse_p: Tensor
    lse_q: Tensor
    c_hi: Tensor
    c_lo: Tensor
    bad: Tensor


def _centred_log_ratio(
    diff: tuple[Tensor, Tensor],
    c_hi: Tensor,
    c_lo: Tensor,
    temperature: float,
    zmask: Tensor,
    wmask: Tensor,
) -> Tensor:
    r""":math:`\varepsilon_i = ((z_i - w_i) - C)/T` with :math:`C = C_{hi} + C_{lo}` in logit units.

    ``diff = (s, err)`` is ``z - w`` split exactly by TwoSum; ``s - C_hi`` is exact when the two are
    within a factor 2 (Sterbenz), which is the near-identical case that needs it, so
    :math:`\varepsilon` carries a relative error of a couple of ulps even when ``|z - w|`` is a
    large constant offset and :math:`|\varepsilon|` is ``1e-6``.  Masked tokens get ``0`` (both),
    ``-inf`` (``z`` only) or ``+inf`` (``w`` only).
    """
    s, err = diff
    eps = (s - c_hi[:, None]) + (err - c_lo[:, None])
    if temperature != 1.0:
        eps = eps / temperature
    eps = torch.where(wmask, torch.full_like(eps, _INF), eps)
    eps = torch.where(
        zmask, torch.where(wmask, torch.zeros_like(eps), torch.full_like(eps, -_INF)), eps
    )
    return eps


def _pair_block(zc: Tensor, wc: Tensor, temperature: float) -> _Pair:
    """Normalise both rows and form an accurate centred log-ratio (see module notes)."""
    t = temperature
    z = zc.to(torch.float64)
    w = wc.to(torch.float64)
    nz = _normaliser(z, t)
    nw = _normaliser(w, t)
    zmask = z == -_INF
    wmask = w == -_INF
    # p and q straight from their own logits (relative error: a few ulps times |log p|, |log q|).
    # q weights every term; p enters only where nothing cancels (eps > 1, masked q, TV/JS stats).
    p = nz.e / (1.0 + nz.rest)[:, None]
    q = nw.e / (1.0 + nw.rest)[:, None]
    # C = T (lse_p - lse_q) = (m_z - m_w) + T (L_z - L_w), kept as an unevaluated sum hi + lo.
    hi, lo = _two_sum(nz.m, -nw.m)
    c_hi, c_lo = _two_sum(hi, lo + t * (nz.L - nw.L))
    diff = _two_sum(z, -w)
    eps = _centred_log_ratio(diff, c_hi, c_lo, t, zmask, wmask)
    # One refinement: sum_i p_i(c) - 1 = exp(c_true - c) - 1, summed without cancellation.
    z1 = torch.where(eps > _EPS_SPLIT, p - q, q * torch.expm1(eps)).sum(dim=1)
    c_hi, c_lo = _two_sum(c_hi, c_lo + t * torch.log1p(z1))
    eps = _centred_log_ratio(diff, c_hi, c_lo, t, zmask, wmask)
    lse_q = nw.m / t + nw.L
    lse_p = lse_q + (c_hi + c_lo) / t
    return _Pair(eps, p, q, zmask, wmask, lse_p, lse_q, c_hi, c_lo, nz.bad | nw.bad)


def _pair_block_from_stats(zc: Tensor, wc: Tensor, st: Tensor, temperature: float) -> _Pair:
    """Recompute ``eps, p, q`` of a block from the stored normalisers and centre (backward
    pass; the centre kept as the forward's unevaluated sum, not re-formed as the difference of
    the rounded normalisers, which lost 1e-16 |lse| of it: 2e-12 of a near-identical row's
    gradient)."""
    t = temperature
    z = zc.to(torch.float64)
    w = wc.to(torch.float64)
    zmask = z == -_INF
    wmask = w == -_INF
    lse_p = st[:, 0]
    lse_q = st[:, 1]
    c_hi, c_lo = st[:, 4], st[:, 5]
    eps = _centred_log_ratio(_two_sum(z, -w), c_hi, c_lo, t, zmask, wmask)
    q = torch.exp(w / t - lse_q[:, None])
    p = torch.exp(z / t - lse_p[:, None])
    return _Pair(eps, p, q, zmask, wmask, lse_p, lse_q, c_hi, c_lo, st.isnan().any(dim=1))


def _kl_terms(b: _Pair) -> Tensor:
    r"""Terms of :math:`KL(p\|q) = \sum_i q_i\varphi(\varepsilon_i)`, each ``>= 0``.

    For :math:`\varepsilon > 1`, :math:`q\varphi(\varepsilon) = p(\varepsilon - 1) + q` (no
    overflow); masked ``p`` gives :math:`q\varphi(-\infty) = q`; masked ``q`` with ``p > 0`` gives
    ``+inf``.
    """
    big = b.eps > _EPS_SPLIT
    term = torch.where(
        big, b.p * (b.eps - 1.0) + b.q, b.q * _phi(torch.where(big, torch.zeros_like(b.eps), b.eps))
    )
    return torch.where(b.wmask & ~b.zmask, torch.full_like(term, _INF), term)


def _js_parts(eps: Tensor, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Mixture mass and log-ratios to it: :math:`m = (p+q)/2`, :math:`\delta^p = \log(p/m)`,
    :math:`\delta^q = \log(q/m)`.

    For :math:`|\varepsilon| \le 1`:
    :math:`\delta^p = -\operatorname{log1p}(\operatorname{expm1}(-\varepsilon)/2)`,
    :math:`\delta^q = -\operatorname{log1p}(\operatorname{expm1}(\varepsilon)/2)`,
    :math:`m = q(1 + \operatorname{expm1}(\varepsilon)/2)`; otherwise, with
    :math:`\tau = e^{-|\varepsilon|}`, :math:`\delta = \log 2 - \operatorname{log1p}(\tau)` for the
    larger of the two and that minus :math:`|\varepsilon|` for the smaller, and
    :math:`m = \max(p, q)(1 + \tau)/2`.  Masked tokens (:math:`\varepsilon = \pm\infty`) give
    :math:`\delta = -\infty` on the masked side and :math:`\log 2` on the other.
    """
    mid = eps.abs() <= _EPS_SPLIT
    em = torch.expm1(eps)
    emn = torch.expm1(-eps)
    dp_mid = -torch.log1p(emn / 2.0)
    dq_mid = -torch.log1p(em / 2.0)
    m_mid = q * (1.0 + em / 2.0)
    a = eps.abs()
    tau = torch.exp(-a)
    l1 = torch.log1p(tau)
    d_big = _LN2 - l1
    d_small = d_big - a
    pos = eps > 0
    dp_far = torch.where(pos, d_big, d_small)
    dq_far = torch.where(pos, d_small, d_big)
    m_far = torch.where(pos, p, q) * (1.0 + tau) / 2.0
    m = torch.where(mid, m_mid, m_far)
    dp = torch.where(mid, dp_mid, dp_far)
    dq = torch.where(mid, dq_mid, dq_far)
    return m, dp, dq


def _tv_parts(b: _Pair) -> tuple[Tensor, Tensor, Tensor]:
    r"""TV and its stats :math:`a = \sum_i p_i s_i`, :math:`b = \sum_i q_i s_i`.

    :math:`|p_i - q_i| = q_i |\operatorname{expm1}(\varepsilon_i)|` for
    :math:`|\varepsilon_i| \le 1` and is taken directly otherwise.  Both
    :math:`\sum_{\varepsilon > 0}` and :math:`\sum_{\varepsilon < 0}` of it equal TV; an error
    :math:`\gamma` in the normaliser difference moves them by :math:`\gamma P(\varepsilon > 0)` and
    :math:`\gamma P(\varepsilon < 0)` respectively, so the side with the smaller ``p``-mass is
    returned (for a peaked row the other side would need :math:`\varepsilon` of the dominant token
    to an absolute precision far below one ulp of the logits).  When the tokens whose computed
    :math:`\varepsilon` is exactly 0 carry more mass than either side (a dominant token whose tiny
    log-ratio is below that resolution), the larger of the two sums is returned: such a token
    belongs to the side whose sum it would complete.
    """
    eps = b.eps
    zero = torch.zeros_like(eps)
    diff = torch.where(eps.abs() <= _EPS_SPLIT, b.q * torch.expm1(eps).abs(), (b.p - b.q).abs())
    pos = eps > 0
    neg = eps < 0
    tv_pos = torch.where(pos, diff, zero).sum(dim=1)
    tv_neg = torch.where(neg, diff, zero).sum(dim=1)
    p_pos = torch.where(pos, b.p, zero).sum(dim=1)
    p_neg = torch.where(neg, b.p, zero).sum(dim=1)
    q_pos = torch.where(pos, b.q, zero).sum(dim=1)
    q_neg = torch.where(neg, b.q, zero).sum(dim=1)
    p_tie = (torch.where(eps == 0, b.p, zero)).sum(dim=1)
    tv = torch.where(p_pos <= p_neg, tv_pos, tv_neg)
    tv = torch.where(p_tie > torch.maximum(p_pos, p_neg), torch.maximum(tv_pos, tv_neg), tv)
    tv = tv.clamp(max=1.0)
    return tv, p_pos - p_neg, q_pos - q_neg


def _pair_forward(z: Tensor, w: Tensor, temperature: float, op: str) -> tuple[Tensor, Tensor]:
    z, w = _check_pair(z, w)
    t = _check_temperature(temperature)
    n, v = z.shape
    dtype = _result_dtype(z, w)
    if v == 0:
        return _empty_vocab_forward(n, _PAIR_STATS, z.device, dtype, 1)  # type: ignore[return-value]
    out = torch.empty(n, dtype=dtype, device=z.device)
    stats = torch.empty(n, _PAIR_STATS, dtype=torch.float64, device=z.device)
    for rows in _row_blocks(n, v):
        b = _pair_block(z[rows], w[rows], t)
        if op == "kl":
            a = _kl_terms(b).sum(dim=1)
            bb = torch.zeros_like(a)
            val = a
        elif op == "tv":
            val, a, bb = _tv_parts(b)
        else:  # js
            m, dp, dq = _js_parts(b.eps, b.p, b.q)
            a = (m * _phi(dp)).sum(dim=1)
            bb = (m * _phi(dq)).sum(dim=1)
            val = (0.5 * (a + bb)).clamp(max=_LN2)
        out[rows] = _nan_rows(val, b.bad).to(dtype)
        st = torch.stack((b.lse_p, b.lse_q, a, bb, b.c_hi, b.c_lo), dim=1)
        stats[rows] = _nan_rows(st, b.bad)
    return out, stats


def _pair_backward(
    g: Tensor,
    z: Tensor,
    w: Tensor,
    stats: Tensor,
    temperature: float,
    need_z: bool,
    need_w: bool,
    op: str,
) -> tuple[Tensor | None, Tensor | None]:
    z, w = _check_pair(z, w)
    t = _check_temperature(temperature)
    n, v = z.shape
    g = _check_rowvec(g, n, "g")
    stats = _check_stats(stats, n, _PAIR_STATS)
    dz = torch.empty(n, v, dtype=z.dtype, device=z.device) if need_z else None
    dw = torch.empty(n, v, dtype=w.dtype, device=w.device) if need_w else None
    if not (need_z or need_w):
        return dz, dw
    for rows in _row_blocks(n, v):
        st = stats[rows].to(torch.float64)
        b = _pair_block_from_stats(z[rows], w[rows], st, t)
        gc = g[rows].to(torch.float64)[:, None] / t
        a = st[:, 2:3]
        bb = st[:, 3:4]
        if op == "kl":
            gz = gc * b.p * (b.eps - a) if need_z else None
            if need_w:  # q - p as -q expm1(eps) where |eps| <= 1 (no cancellation as p -> q)
                small = b.eps.abs() <= _EPS_SPLIT
                em = torch.where(small, -b.q * torch.expm1(torch.where(small, b.eps, 0.0)), b.q - b.p)
                gw = gc * em
            else:
                gw = None
            # KL = +inf (some q_i = 0 < p_i): d/dz undefined, NaN wherever p_j > 0; d/dw keeps
            # its formula; a row whose upstream gradient is 0 gets 0 (no 0 * NaN reaching the
            # gradients of the rows a loss keeps).
            inf_row = torch.isinf(a)
            if bool(inf_row.any()):
                zero_g = inf_row & (gc == 0)
                if gz is not None:
                    gz = torch.where(inf_row, torch.where(b.p > 0, math.nan, 0.0), gz)
                    gz = torch.where(zero_g, 0.0, gz)
                if gw is not None:
                    gw = torch.where(zero_g, 0.0, gw)
        elif op == "tv":
            # s_j - sum_i p_i s_i from the side masses of this very classification: consistent
            # with s_j (so ties and V = 1 give 0) and never formed as 1 - (P+ - P-).
            sgn = torch.sign(b.eps)
            gz = 0.5 * gc * b.p * _side_gap(sgn, b.p) if need_z else None
            gw = -0.5 * gc * b.q * _side_gap(sgn, b.q) if need_w else None
        else:  # js
            _, dp, dq = _js_parts(b.eps, b.p, b.q)
            gz = 0.5 * gc * b.p * (dp - a) if need_z else None
            gw = 0.5 * gc * b.q * (dq - bb) if need_w else None
        if dz is not None and gz is not None:
            gz = _zero_masked(gz, b.zmask)
            if op != "tv":
                gz = _dominant_from_rest(gz, b.p, z[rows], w[rows], b, t, gc, a)
            dz[rows] = _nan_rows(gz, b.bad).to(z.dtype)
        if dw is not None and gw is not None:
            # (KL: where q_j = 0 < p_j -- KL = +inf -- d/dw keeps its formula -g p_j / T)
            gw = _zero_masked(gw, b.wmask & ~(b.p > 0) if op == "kl" else b.wmask)
            if op != "tv":
                gw = _dominant_from_rest(gw, b.q, z[rows], w[rows], b, t, gc, bb)
            dw[rows] = _nan_rows(gw, b.bad).to(w.dtype)
    return dz, dw


def _dominant_from_rest(grad: Tensor, prob: Tensor, z: Tensor, w: Tensor, b: _Pair,
                        temperature: float, gc: Tensor, row_scalar: Tensor) -> Tensor:
    r"""Rows where one token holds more than half of ``prob``: its gradient entry as minus the
    sum of the others, where that is the more accurate.

    KL and JS are invariant to a shift of either row of logits, so each gradient row sums to 0.
    At a dominant token :math:`j` the direct formula (e.g. :math:`p_j(\varepsilon_j -
    \mathrm{KL})`) is a small difference of numbers of the size
    :math:`|g/T|\,\mathrm{prob}_j\,(|z_j - w_j|/T + |\mathrm{lse}_p| + |\mathrm{lse}_q| +
    |\text{row scalar}|)` (the rounding of :math:`\varepsilon_j`; a few ulps of it is all of the
    entry on a peaked row, whose gradient is of the order of the mass left to the other
    tokens); the sum of the other entries has an absolute error of a few ulps of their absolute
    sum, and that sum is taken when it is the smaller.
    """
    pm, idx = prob.max(dim=1, keepdim=True)
    rest_terms = grad.scatter(1, idx, 0.0)
    rest = rest_terms.sum(dim=1, keepdim=True)
    size = rest_terms.abs().sum(dim=1, keepdim=True)
    zj = z.gather(1, idx).to(torch.float64)
    wj = w.gather(1, idx).to(torch.float64)
    eps_size = (zj - wj).abs() / temperature + (b.lse_p.abs() + b.lse_q.abs())[:, None]
    direct_size = (gc * pm * (eps_size + row_scalar.abs())).abs()
    use = (pm > 0.5) & torch.isfinite(rest) & torch.isfinite(grad.gather(1, idx)) & (size < direct_size)
    if not bool(use.any()):
        return grad
    return grad.scatter(1, idx, torch.where(use, -rest, grad.gather(1, idx)))


def _side_gap(sgn: Tensor, p: Tensor) -> Tensor:
    """``s_j - sum_i p_i s_i`` per entry: ``2P- + P0``, ``-(2P+ + P0)`` or ``P- - P+``."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    pp = torch.where(sgn > 0, p, zero).sum(-1, keepdim=True)
    pm = torch.where(sgn < 0, p, zero).sum(-1, keepdim=True)
    p0 = torch.where(sgn == 0, p, zero).sum(-1, keepdim=True)
    return torch.where(sgn > 0, 2 * pm + p0, torch.where(sgn < 0, -(2 * pp + p0), pm - pp))


@torch.no_grad()
def kl_forward(z: Tensor, w: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    r"""Exact Kullback–Leibler divergence :math:`KL(p\|q)` per row.

    .. math::

        KL(p\|q) = \sum_i p_i \log\frac{p_i}{q_i} = \sum_i q_i\,\varphi(\varepsilon_i),
        \qquad \varphi(e) = e\,e^{e} - \operatorname{expm1}(e) \ge 0,

    with :math:`p = \operatorname{softmax}(z/T)`, :math:`q = \operatorname{softmax}(w/T)`,
    :math:`\varepsilon_i = \log p_i - \log q_i`.  Masked tokens: :math:`p_i = q_i = 0` contributes
    0, :math:`p_i = 0 < q_i` contributes :math:`q_i`, :math:`q_i = 0 < p_i` makes the result
    ``+inf``.

    Parameters
    ----------
    z, w : Tensor
        Logits of ``p`` and ``q``, ``[N, V]`` each.
    temperature : float
        ``T > 0``.

    Returns
    -------
    out : Tensor
        ``[N]``, float32 (float64 if an input is float64).
    stats : Tensor
        ``[N, 6]`` float64, ``[lse_p, lse_q, KL, 0, c_hi, c_lo]``.

    Notes
    -----
    Every term is non-negative and computed to a few ulps; :math:`\varepsilon` is accurate to a
    couple of ulps of itself (TwoSum of the logits and a refined normaliser difference), and the
    first-order sensitivity of the sum to an error :math:`\gamma` in :math:`\varepsilon` is
    :math:`\gamma \cdot KL`.  The relative error therefore stays at a few ulps also for
    :math:`KL \approx 10^{-12}`, where :math:`\sum p(\log p - \log q)` returns noise.
    """
    return _pair_forward(z, w, temperature, "kl")


@torch.no_grad()
def kl_backward(
    g: Tensor, z: Tensor, w: Tensor, stats: Tensor, temperature: float, need_z: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of :func:`kl_forward`.

    .. math::

        \frac{\partial KL}{\partial z_j} = \frac{p_j(\varepsilon_j - KL)}{T}, \qquad
        \frac{\partial KL}{\partial w_j} = \frac{q_j - p_j}{T}.

    Parameters
    ----------
    g : Tensor
        Upstream gradient ``[N]``.
    z, w : Tensor
        Logits ``[N, V]`` given to the forward.
    stats : Tensor
        ``[N, 6]`` from the forward.
    temperature : float
        ``T > 0``.
    need_z, need_w : bool
        Which gradients to compute.

    Returns
    -------
    dz, dw : Tensor or None
        In the dtypes of ``z`` and ``w``; zero where the corresponding logit is ``-inf``; NaN on
        rows with NaN stats.  A row with :math:`KL = +\infty` has no finite gradient with respect
        to ``z`` (its entries are ``-inf`` or NaN).
    """
    return _pair_backward(g, z, w, stats, temperature, need_z, need_w, "kl")


@torch.no_grad()
def tv_forward(z: Tensor, w: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    r"""Exact total-variation distance per row.

    .. math::

        TV(p, q) = \tfrac12\sum_i |p_i - q_i| = \sum_{i:\,\varepsilon_i > 0} (p_i - q_i)
                 = \sum_{i:\,\varepsilon_i > 0} q_i \operatorname{expm1}(\varepsilon_i)
                 = -\sum_{i:\,\varepsilon_i < 0} q_i \operatorname{expm1}(\varepsilon_i)
                 \in [0, 1].

    Parameters
    ----------
    z, w : Tensor
        Logits of ``p`` and ``q``, ``[N, V]`` each.
    temperature : float
        ``T > 0``.

    Returns
    -------
    out : Tensor
        ``[N]``, float32 (float64 if an input is float64), clamped to ``<= 1``.
    stats : Tensor
        ``[N, 6]`` float64, ``[lse_p, lse_q, sum_i p_i s_i, sum_i q_i s_i, c_hi, c_lo]`` with
        :math:`s_i = \operatorname{sign}(p_i - q_i)`.

    Notes
    -----
    The terms are non-negative, each with a relative error of a few ulps (``|p - q|`` is used only
    for :math:`|\varepsilon| > 1`, where one of ``p, q`` exceeds the other by a factor ``e``).  Of
    the two one-sided sums, the one over the side with the smaller ``p``-mass is returned: it is the
    one least sensitive to the rounding of the normaliser difference, which matters for peaked rows
    (e.g. ``TV = 1e-26`` under a logit offset of ``1e4``).  The relative error is a few ulps.
    """
    return _pair_forward(z, w, temperature, "tv")


@torch.no_grad()
def tv_backward(
    g: Tensor, z: Tensor, w: Tensor, stats: Tensor, temperature: float, need_z: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of :func:`tv_forward` (sub-gradient with :math:`s_i = 0` on ties).

    .. math::

        \frac{\partial TV}{\partial z_j} = \frac{p_j (s_j - a)}{2T}, \qquad
        \frac{\partial TV}{\partial w_j} = -\frac{q_j (s_j - b)}{2T},

    with ``a, b`` from the stats.

    Parameters
    ----------
    g : Tensor
        Upstream gradient ``[N]``.
    z, w : Tensor
        Logits ``[N, V]`` given to the forward.
    stats : Tensor
        ``[N, 6]`` from the forward.
    temperature : float
        ``T > 0``.
    need_z, need_w : bool
        Which gradients to compute.

    Returns
    -------
    dz, dw : Tensor or None
        In the dtypes of ``z`` and ``w``; zero where the corresponding logit is ``-inf``.
    """
    return _pair_backward(g, z, w, stats, temperature, need_z, need_w, "tv")


@torch.no_grad()
def js_forward(z: Tensor, w: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    r"""Exact Jensen–Shannon divergence per row.

    .. math::

        JS(p, q) = \tfrac12 KL(p\|m) + \tfrac12 KL(q\|m)
                 = \tfrac12 \sum_i m_i \bigl[\varphi(\delta^p_i) + \varphi(\delta^q_i)\bigr]
                 \in [0, \log 2],

    with :math:`m = (p + q)/2`,
    :math:`\delta^p_i = \log(p_i/m_i) =
    -\operatorname{log1p}(\operatorname{expm1}(-\varepsilon_i)/2)`,
    :math:`\delta^q_i = \log(q_i/m_i) =
    -\operatorname{log1p}(\operatorname{expm1}(\varepsilon_i)/2)`
    and :math:`\varphi` as in :func:`kl_forward`.  A token with :math:`p_i = 0 < q_i` contributes
    :math:`\tfrac12 q_i \log 2` (symmetrically for ``q``).

    Parameters
    ----------
    z, w : Tensor
        Logits of ``p`` and ``q``, ``[N, V]`` each.
    temperature : float
        ``T > 0``.

    Returns
    -------
    out : Tensor
        ``[N]``, float32 (float64 if an input is float64), clamped to ``<= log 2``.
    stats : Tensor
        ``[N, 6]`` float64, ``[lse_p, lse_q, KL(p||m), KL(q||m), c_hi, c_lo]``.

    Notes
    -----
    All terms are non-negative; for :math:`|\varepsilon| > 1` the log-ratios are rewritten around
    :math:`\log 2 - \operatorname{log1p}(e^{-|\varepsilon|})` so that nothing overflows.  The
    relative error is a few ulps, also for near-identical rows (:math:`JS \approx KL/4`).
    """
    return _pair_forward(z, w, temperature, "js")


@torch.no_grad()
def js_backward(
    g: Tensor, z: Tensor, w: Tensor, stats: Tensor, temperature: float, need_z: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradients of :func:`js_forward`.

    .. math::

        \frac{\partial JS}{\partial z_j} = \frac{p_j(\delta^p_j - a)}{2T}, \qquad
        \frac{\partial JS}{\partial w_j} = \frac{q_j(\delta^q_j - b)}{2T},

    with :math:`a = KL(p\|m)`, :math:`b = KL(q\|m)` from the stats.

    Parameters
    ----------
    g : Tensor
        Upstream gradient ``[N]``.
    z, w : Tensor
        Logits ``[N, V]`` given to the forward.
    stats : Tensor
        ``[N, 6]`` from the forward.
    temperature : float
        ``T > 0``.
    need_z, need_w : bool
        Which gradients to compute.

    Returns
    -------
    dz, dw : Tensor or None
        In the dtypes of ``z`` and ``w``; zero where the corresponding logit is ``-inf``.
    """
    return _pair_backward(g, z, w, stats, temperature, need_z, need_w, "js")
