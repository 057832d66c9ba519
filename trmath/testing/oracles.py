r"""High-precision reference values ("oracles") for trmath's exact reductions.

Every function here evaluates the *exact* quantity defined by the distributions that the inputs
represent, in multiple-precision arithmetic (:mod:`mpmath`), and is meant to be the ground truth
against which the compiled kernels, the pure-torch fallbacks and user code are compared.

For a row of logits :math:`z \in (\mathbb{R} \cup \{-\infty\})^V` and a temperature :math:`T > 0`

.. math::

    p_i = \frac{e^{z_i / T}}{\sum_j e^{z_j / T}}, \qquad e^{-\infty} = 0,
    \qquad 0 \log 0 = 0 .

Inputs
------
Rows may be NumPy arrays, :class:`torch.Tensor` objects of any floating dtype (``float16``,
``bfloat16``, ``float32``, ``float64``) or sequences of floats. They are first converted to
``float64`` — exact for all of these dtypes — and every element is then turned into an exact
binary multiple-precision number, so the oracle sees *exactly* the values the kernel sees. The
temperature is converted exactly in the same way (an :class:`mpmath.mpf` is used as given).

A row containing ``NaN`` or ``+inf``, or whose entries are all ``-inf``, has no distribution and
raises :class:`ValueError` (the batched helpers can return ``NaN`` for such rows instead).

Precision
---------
Results are returned as :class:`mpmath.mpf` numbers carrying ``dps`` decimal digits (50 by
default). Internally each quantity is computed with guard bits, its cancellation is measured (the
sum of the absolute values of the contributions against the result), and the computation is
repeated at a higher working precision until at least ``dps`` digits survive. Near-identical
rows — the regime of trust regions, where KL can be :math:`10^{-24}` in float64 — therefore get a
correct answer and not the rounding noise of the working precision. Rows that define the same
distribution (equal up to a constant shift, identical masks) give exactly zero for KL, TV and JS.

Cost
----
The dominant cost is one multiple-precision exponential per *distinct* logit value (distinct
values are exponentiated once and reused, so ``bfloat16``/``float16`` rows are cheap), plus for
pair divergences a few multiple-precision operations per element and, for TV and JS, an
``expm1`` or a logarithm per element. CPU seconds for one row of float32 standard-normal
logits (all values distinct), ``dps=50``, mpmath 1.3 with its pure-Python backend, measured on
this project's 2-core CPU machine while it was shared with other jobs (so treat them as rough;
on an idle core wall time is about the CPU time, sometimes less):

==========================================  ===============  ===============
oracle                                      V = 131072       V = 262144
==========================================  ===============  ===============
``mp_logsumexp``, ``mp_entropy``,           2.2 -- 3.0 s     4.4 s
``mp_token_logprob``
``mp_kl`` (T = 1; about 8 s at T = 0.7)     4.9 -- 6.4 s     11.5 s
``mp_tv``                                   6.1 -- 7.3 s
``mp_js``                                   8.6 -- 9.1 s     21.5 s
``mp_kl`` / ``mp_js``, bfloat16 rows        0.6 s / 4.2 s
==========================================  ===============  ===============

With ``gmpy2`` installed mpmath uses it automatically and the exponential-bound oracles run
about twice as fast (``mp_logsumexp`` 1.2 s, ``mp_kl`` 3.6 s at V = 131072). A handful of
full-vocabulary rows is practical; sweeps over many rows should use a small ``V``.

Gradients
---------
``mp_grad_*`` evaluate the analytic gradients (below, :math:`g` is the upstream gradient and all
gradients carry a factor :math:`1/T`)

.. math::

    \partial_{z_j} \operatorname{lse} &= g\, p_j / T, \\
    \partial_{z_j} H &= -g\, p_j (\log p_j + H) / T, \\
    \partial_{z_j} \log p_t &= g\, (\delta_{jt} - p_j) / T, \\
    \partial_{z_j} \mathrm{KL} &= g\, p_j (\varepsilon_j - \mathrm{KL}) / T, \quad
    \partial_{w_j} \mathrm{KL} = g\, (q_j - p_j) / T, \quad
    \varepsilon_j = \log p_j - \log q_j, \\
    \partial_{z_j} \mathrm{TV} &= \tfrac{g}{2}\, p_j (s_j - a) / T, \quad
    \partial_{w_j} \mathrm{TV} = -\tfrac{g}{2}\, q_j (s_j - b) / T, \quad
    s_j = \operatorname{sign}(p_j - q_j),\ a = \textstyle\sum_i p_i s_i,\ b = \sum_i q_i s_i, \\
    \partial_{z_j} \mathrm{JS} &= \tfrac{g}{2}\, p_j \bigl(\log\tfrac{p_j}{m_j} - a\bigr) / T, \quad
    \partial_{w_j} \mathrm{JS} = \tfrac{g}{2}\, q_j \bigl(\log\tfrac{q_j}{m_j} - b\bigr) / T,
    \quad a = \mathrm{KL}(p \| m),\ b = \mathrm{KL}(q \| m),

with :math:`\operatorname{sign}(0) = 0` (the TV subgradient on ties) and every term with a zero
probability factor equal to zero. They are evaluated with 64 guard bits and rounded to
``float64``.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Union, cast

import numpy as np

try:
    import mpmath
    from mpmath import libmp as _lm
except ImportError as exc:  # pragma: no cover - exercised only without the test extra
    raise ImportError(
        "trmath.testing.oracles needs mpmath; install the test extra: pip install 'trmath[test]'"
    ) from exc

__all__ = [
    "DEFAULT_DPS",
    "GRADIENT_ORACLES",
    "ORACLES",
    "as_float64",
    "mp_batch",
    "mp_entropy",
    "mp_grad_batch",
    "mp_grad_entropy",
    "mp_grad_js",
    "mp_grad_kl",
    "mp_grad_logsumexp",
    "mp_grad_token_logprob",
    "mp_grad_tv",
    "mp_js",
    "mp_kl",
    "mp_log_softmax",
    "mp_logsumexp",
    "mp_softmax",
    "mp_token_logprob",
    "mp_tv",
]

#: Default number of significant decimal digits of every oracle result.
DEFAULT_DPS = 50

ArrayLike = Any  # numpy array, torch tensor or a sequence of floats
Temperature = Union[float, int, "mpmath.mpf", Any]
_Raw = tuple  # an mpmath raw number: (sign, mantissa, exponent, bitcount)

_RN = _lm.round_nearest
_ZERO: _Raw = _lm.fzero
_ONE: _Raw = _lm.fone
_TWO: _Raw = _lm.from_int(2)
_INF: _Raw = _lm.finf
_NINF: _Raw = _lm.fninf
_NAN: _Raw = _lm.fnan

_GUARD_BITS = 128  # initial extra working precision
_SLACK_BITS = 8  # allowance for the small constant factors in the rounding-error bounds
_GRAD_GUARD_BITS = 64


# --------------------------------------------------------------------------------------------
# conversions and validation
# --------------------------------------------------------------------------------------------
def as_float64(x: ArrayLike) -> np.ndarray:
    """Convert an array-like to a ``float64`` NumPy array without changing any value.

    Parameters
    ----------
    x : array_like or torch.Tensor
        NumPy array (any real floating or integer dtype, including ``ml_dtypes.bfloat16``),
        :class:`torch.Tensor` of any floating dtype on any device, or a (nested) sequence.

    Returns
    -------
    numpy.ndarray
        ``float64`` array with the same shape. The conversion is exact for ``float16``,
        ``bfloat16``, ``float32`` and ``float64`` inputs.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError("complex tensors have no distribution")
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    a = np.asarray(x)
    if a.dtype.kind in "cOSUM":
        raise TypeError(f"cannot use an array of dtype {a.dtype} as logits")
    if a.dtype != np.float64:
        a = a.astype(np.float64)
    return a


def _check_row(a: np.ndarray, name: str) -> None:
    if a.ndim != 1:
        raise ValueError(f"{name}: expected one row (a 1-D array), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name}: empty row (V = 0)")
    bad = np.isnan(a) | (a == np.inf)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{name}: invalid logit {a[i]!r} at index {i} (NaN and +inf are not allowed)"
        )
    if not np.isfinite(a).any():
        raise ValueError(f"{name}: every logit is -inf, so the row has no distribution")


def _row(x: ArrayLike, name: str) -> np.ndarray:
    a = as_float64(x)
    _check_row(a, name)
    return a


def _temperature(temperature: Temperature) -> _Raw:
    if isinstance(temperature, mpmath.mpf):
        raw = temperature._mpf_
    else:
        t = float(temperature)
        if not math.isfinite(t):
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
        raw = _lm.from_float(t)
    if _lm.mpf_sign(raw) <= 0 or raw in (_INF, _NINF, _NAN):
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return raw


def _target_prec(dps: int) -> int:
    if int(dps) < 1:
        raise ValueError(f"dps must be a positive integer, got {dps!r}")
    return _lm.dps_to_prec(int(dps))


def _finish(raw: _Raw, dps: int) -> mpmath.mpf:
    """Round a raw working-precision value to ``dps`` digits and wrap it as an ``mpf``."""
    return mpmath.mp.make_mpf(_lm.mpf_pos(raw, _target_prec(dps), _RN))


def _mag(x: _Raw) -> int:
    """An integer ``k`` with ``|x| < 2**k`` (x finite and nonzero)."""
    return int(x[2] + x[3])


def _is_special(x: _Raw) -> bool:
    return not x[1]  # zero, inf, -inf or nan (mantissa 0)


def _log1p(r: _Raw, wp: int) -> _Raw:
    """``log(1 + r)`` for ``r > -1`` with full relative precision also for tiny ``|r|``."""
    if r == _ZERO:
        return _ZERO
    if _mag(r) < -wp - _SLACK_BITS:
        return _lm.mpf_pos(r, wp, _RN)  # log1p(r) = r (1 - r/2 + ...)
    return _lm.mpf_log(_lm.mpf_add(_ONE, r, 0), wp, _RN)  # 1 + r is exact


_SERIES_EXP = -32  # below |x| < 2**-32 the small-argument series are used


def _expm1(x: _Raw, wp: int) -> _Raw:
    """``exp(x) - 1`` with full relative precision for every finite ``x``."""
    if x == _ZERO:
        return _ZERO
    m = _mag(x)
    if m < -wp - _SLACK_BITS:
        return _lm.mpf_pos(x, wp, _RN)
    if m < _SERIES_EXP:  # x + x^2/2! + ...: each term at least 2**32 times smaller
        p = wp + _SLACK_BITS
        total, term, k = x, x, 1
        while True:
            k += 1
            term = _lm.mpf_div(_lm.mpf_mul(term, x, p, _RN), _lm.from_int(k), p, _RN)
            if _mag(term) < m - p:
                break
            total = _lm.mpf_add(total, term, p, _RN)
        return _lm.mpf_pos(total, wp, _RN)
    # exp(x) - 1 cancels at most max(0, 1 - m) bits
    extra = max(0, 1 - m) + _SLACK_BITS
    return _lm.mpf_sub(_lm.mpf_exp(x, wp + extra, _RN), _ONE, wp, _RN)


def _tanh_half(eps: _Raw, wp: int) -> _Raw:
    """``tanh(eps / 2) = expm1(eps) / (expm1(eps) + 2)``, relatively precise for tiny ``eps``."""
    e = _expm1(eps, wp + _SLACK_BITS)
    return _lm.mpf_div(e, _lm.mpf_add(e, _TWO, wp + _SLACK_BITS, _RN), wp, _RN)


def _js_g_series(t: _Raw, wp: int) -> _Raw:
    """``g(t) = (1+t) log(1+t) + (1-t) log(1-t) = sum_k t^(2k) / (k (2k-1))`` for tiny ``t``."""
    p = wp + _SLACK_BITS
    t2 = _lm.mpf_mul(t, t, p, _RN)
    m2 = _mag(t2)
    total, power, k = t2, t2, 1
    while True:
        k += 1
        power = _lm.mpf_mul(power, t2, p, _RN)
        term = _lm.mpf_div(power, _lm.from_int(k * (2 * k - 1)), p, _RN)
        if _mag(term) < m2 - p:
            break
        total = _lm.mpf_add(total, term, p, _RN)
    return _lm.mpf_pos(total, wp, _RN)


def _adaptive(compute: Callable[[int], tuple[_Raw, _Raw]], prec: int) -> _Raw:
    """Evaluate ``compute(wp) -> (value, magnitude)`` at increasing working precision.

    The rounding error of ``value`` is a small multiple of ``2**-wp * magnitude``. The working
    precision is raised until at least ``prec`` bits of ``value`` are correct.
    """
    wp = prec + _GUARD_BITS
    cap = 16 * prec + 4096
    while True:
        value, magnitude = compute(wp)
        if magnitude == _ZERO or (_is_special(value) and value != _ZERO):
            return value  # no rounding happened, or an exact inf / nan
        lost = wp if value == _ZERO else _mag(magnitude) - _mag(value) + 1
        if lost <= wp - prec - _SLACK_BITS:
            return value
        if wp >= cap:
            warnings.warn(
                f"oracle precision capped at {wp} bits; the result may have fewer digits than "
                "requested",
                RuntimeWarning,
                stacklevel=4,
            )
            return value
        wp = min(cap, 2 * wp if value == _ZERO else prec + _SLACK_BITS + lost + 32)


def _add_abs(*xs: _Raw) -> _Raw:
    return _lm.mpf_sum(list(xs), 0, _RN, absolute=True)


class _Side:
    """Per-row precomputation at working precision ``wp``.

    With ``m = max_i z_i`` the shifted logits ``s_i = z_i - m`` are exact, ``x_i = s_i / T``
    (computed with enough extra bits that ``e_i = exp(x_i)`` is relatively accurate to ``wp``
    bits) and ``e_i = exp(x_i)``. Distinct values are exponentiated once. ``S = sum_i e_i >= 1``
    is stored as ``1 + rest`` so that ``log S = log1p(rest)`` keeps full relative precision.
    """

    __slots__ = (
        "S",
        "_p",
        "_wp",
        "counts",
        "e",
        "finite",
        "inv",
        "logS",
        "rest",
        "shifted",
        "top_scaled",
        "x",
    )

    def __init__(self, z: np.ndarray, temp: _Raw, wp: int) -> None:
        finite = np.isfinite(z)
        uniq, inv, counts = np.unique(z[finite], return_inverse=True, return_counts=True)
        top = _lm.from_float(float(uniq[-1]))
        from_float, sub, div, exp = _lm.from_float, _lm.mpf_sub, _lm.mpf_div, _lm.mpf_exp
        shifted = [sub(from_float(u), top, 0) for u in uniq.tolist()]
        if temp == _ONE:
            x = shifted
            self.top_scaled = top
        else:
            mt = _mag(temp)
            x = [s if s == _ZERO else div(s, temp, wp + max(0, _mag(s) - mt + 2), _RN)
                 for s in shifted]
            self.top_scaled = div(top, temp, wp, _RN)
        e = [exp(v, wp, _RN) for v in x]
        cl = counts.tolist()
        mul, from_int = _lm.mpf_mul, _lm.from_int
        weights = [ev if c == 1 else mul(ev, from_int(c), 0) for ev, c in zip(e[:-1], cl[:-1])]
        if cl[-1] > 1:
            weights.append(from_int(cl[-1] - 1))
        self.rest = _lm.mpf_sum(weights, wp, _RN)
        self.S = _lm.mpf_add(_ONE, self.rest, wp, _RN)
        self.logS = _log1p(self.rest, wp)
        self._p: list[_Raw] | None = None
        self._wp = wp
        full = np.full(z.shape, -1, dtype=np.intp)
        full[finite] = inv.reshape(-1)
        self.inv = full
        self.finite = finite
        self.shifted = shifted
        self.x = x
        self.e = e
        self.counts = cl

    @property
    def p(self) -> list[_Raw]:
        """Probability of each distinct value, ``e_u / S``."""
        if self._p is None:
            div, S, wp = _lm.mpf_div, self.S, self._wp
            self._p = [div(ev, S, wp, _RN) for ev in self.e]
        return self._p

    def entropy(self, wp: int) -> _Raw:
        """``H = log S - (sum_i e_i x_i) / S`` (both parts non-negative: no cancellation)."""
        mul, fi = _lm.mpf_mul, _lm.from_int
        terms = [
            mul(ev, xv, wp, _RN) if c == 1 else mul(mul(ev, xv, wp, _RN), fi(c), wp, _RN)
            for ev, xv, c in zip(self.e, self.x, self.counts)
        ]
        ex = _lm.mpf_sum(terms, wp, _RN)  # <= 0
        return _lm.mpf_sub(self.logS, _lm.mpf_div(ex, self.S, wp, _RN), wp, _RN)

    def probs(self, wp: int) -> tuple[list[_Raw], list[_Raw]]:
        """Per-element ``p_i`` and ``log p_i`` (``0`` and ``-inf`` where masked)."""
        sub = _lm.mpf_sub
        lu = [sub(xv, self.logS, wp, _RN) for xv in self.x]
        inv = cast(list[int], self.inv.tolist())
        pu = self.p
        p = [pu[k] if k >= 0 else _ZERO for k in inv]
        lp = [lu[k] if k >= 0 else _NINF for k in inv]
        return p, lp


def _same_distribution(z: np.ndarray, w: np.ndarray) -> bool:
    """True when ``z`` and ``w`` differ by an exact constant on identical supports."""
    fz, fw = np.isfinite(z), np.isfinite(w)
    if not np.array_equal(fz, fw):
        return False
    a, b = z[fz], w[fw]

    def two_diff(v: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
        # v - c as an unevaluated exact pair (s, err) (Knuth's TwoSum)
        s = v - c
        bb = s - v
        err = (v - (s - bb)) + (-c - bb)
        return s, err

    with np.errstate(all="ignore"):
        sa, ea = two_diff(a, float(a.max()))
        sb, eb = two_diff(b, float(b.max()))
    return bool(np.array_equal(sa, sb) and np.array_equal(ea, eb))


def _scaled_diff(sp: _Raw, sq: _Raw, temp: _Raw, wp: int) -> _Raw:
    d = _lm.mpf_sub(sp, sq, 0)
    return d if temp == _ONE else _lm.mpf_div(d, temp, wp, _RN)


class _Pair:
    """Both sides of a pair divergence plus the log-ratio machinery.

    ``eps_i = log p_i - log q_i = u_i - C`` with ``u_i = (s^p_i - s^q_i) / T`` (exact shifted
    logits, one rounding) and ``C = log S_p - log S_q``. ``K`` bounds ``|C|`` plus its
    absolute error in units of ``2**-wp``, so the error of ``eps_i`` is about
    ``2**-wp (|u_i| + K)``.
    """

    __slots__ = ("C", "K", "KU", "P", "Q", "temp", "wp")

    def __init__(self, z: np.ndarray, w: np.ndarray, temp: _Raw, wp: int) -> None:
        self.P, self.Q = _Side(z, temp, wp), _Side(w, temp, wp)
        self.temp, self.wp = temp, wp
        self.C = _lm.mpf_sub(self.P.logS, self.Q.logS, wp, _RN)
        # C is exactly zero when both rows hold the same multiset of shifted logits (the sums
        # are then formed from identical terms); otherwise it carries the rounding errors of
        # log S_p and log S_q
        same = self.P.counts == self.Q.counts and self.P.shifted == self.Q.shifted
        err = _ZERO if same else _add_abs(self.P.logS, self.Q.logS)
        self.K = _add_abs(self.C, err)
        # KU >= max_i |u_i| + K, from a float64 estimate of u with a generous rounding allowance
        both = self.P.finite & self.Q.finite
        with np.errstate(all="ignore"):
            zb, wb = z[both], w[both]
            zm, wm = float(np.max(z[self.P.finite])), float(np.max(w[self.Q.finite]))
            est = float(np.max(np.abs((zb - wb) - (zm - wm)), initial=0.0))
            est += 8 * np.finfo(np.float64).eps * (float(np.max(np.abs(zb) + np.abs(wb),
                                                                   initial=0.0))
                                                   + abs(zm) + abs(wm))
            est = est * 1.0001 / _lm.to_float(temp) + 1e-300
        if not np.isfinite(est):
            est = 1e300
        self.KU = _lm.mpf_add(_lm.from_float(est), self.K, _LOW, _lm.round_up)

    def both(self) -> tuple[list[int], list[int], list[int]]:
        """Element indices finite in both rows and their distinct-value indices."""
        idx = np.flatnonzero(self.P.finite & self.Q.finite)
        return idx.tolist(), self.P.inv[idx].tolist(), self.Q.inv[idx].tolist()

    def u_eps(self, a: int, b: int) -> tuple[_Raw, _Raw]:
        u = _scaled_diff(self.P.shifted[a], self.Q.shifted[b], self.temp, self.wp)
        return u, _lm.mpf_sub(u, self.C, self.wp, _RN)


_LOW = 30  # precision (bits) used for error magnitudes


# --------------------------------------------------------------------------------------------
# raw (working-precision) evaluations
# --------------------------------------------------------------------------------------------
def _raw_logsumexp(z: np.ndarray, temp: _Raw, prec: int) -> _Raw:
    def compute(wp: int) -> tuple[_Raw, _Raw]:
        s = _Side(z, temp, wp)
        return _lm.mpf_add(s.top_scaled, s.logS, wp, _RN), _add_abs(s.top_scaled, s.logS)

    return _adaptive(compute, prec)


def _raw_entropy(z: np.ndarray, temp: _Raw, prec: int) -> _Raw:
    def compute(wp: int) -> tuple[_Raw, _Raw]:
        h = _Side(z, temp, wp).entropy(wp)
        return h, _lm.mpf_abs(h)

    return _adaptive(compute, prec)


def _raw_token_logprob(z: np.ndarray, token: int, temp: _Raw, prec: int) -> _Raw:
    if not np.isfinite(z[token]):
        return _NINF

    def compute(wp: int) -> tuple[_Raw, _Raw]:
        s = _Side(z, temp, wp)
        xt = s.x[int(s.inv[token])]
        return _lm.mpf_sub(xt, s.logS, wp, _RN), _add_abs(xt, s.logS)

    return _adaptive(compute, prec)


def _raw_kl(z: np.ndarray, w: np.ndarray, temp: _Raw, prec: int) -> _Raw:
    if np.any(np.isfinite(z) & ~np.isfinite(w)):
        return _INF
    if _same_distribution(z, w):
        return _ZERO

    def compute(wp: int) -> tuple[_Raw, _Raw]:
        pr = _Pair(z, w, temp, wp)
        P, Q = pr.P, pr.Q
        idx = np.flatnonzero(P.finite)
        ip, iq = P.inv[idx].tolist(), Q.inv[idx].tolist()
        sp, sq, ep = P.shifted, Q.shifted, P.e
        mul, sub, div = _lm.mpf_mul, _lm.mpf_sub, _lm.mpf_div
        if temp == _ONE:
            terms = [mul(ep[a], sub(sp[a], sq[b], 0), wp, _RN) for a, b in zip(ip, iq)]
        else:
            terms = [mul(ep[a], div(sub(sp[a], sq[b], 0), temp, wp, _RN), wp, _RN)
                     for a, b in zip(ip, iq)]
        # KL = sum_i p_i (u_i - C) = (sum_i e_i u_i) / S_p - C   (sum_i p_i = 1)
        A = div(_lm.mpf_sum(terms, wp, _RN), P.S, wp, _RN)
        A_abs = div(_lm.mpf_sum(terms, wp, _RN, absolute=True), P.S, wp, _RN)
        return sub(A, pr.C, wp, _RN), _add_abs(A_abs, pr.K)

    return _adaptive(compute, prec)


def _raw_tv(z: np.ndarray, w: np.ndarray, temp: _Raw, prec: int) -> _Raw:
    if _same_distribution(z, w):
        return _ZERO

    def compute(wp: int) -> tuple[_Raw, _Raw]:
        # TV = sum_{p_i > q_i} (p_i - q_i): a sum of positive terms. Each term is p_i - q_i when
        # the log-ratio eps_i is not tiny (the rounding of p_i, q_i then costs (p_i + q_i)
        # 2**-wp), else p_i * (-expm1(-eps_i)), whose error comes from eps_i alone.
        pr = _Pair(z, w, temp, wp)
        P, Q = pr.P, pr.Q
        Pp, Qp = P.p, Q.p
        sub, mul, add, neg = _lm.mpf_sub, _lm.mpf_mul, _lm.mpf_add, _lm.mpf_neg
        terms: list[_Raw] = []
        direct: list[_Raw] = []
        mags: list[_Raw] = []
        for _, a, b in zip(*pr.both()):
            u, eps = pr.u_eps(a, b)
            if eps[0] or eps == _ZERO:  # eps <= 0
                continue
            p = Pp[a]
            if _mag(eps) >= _SERIES_EXP:
                q = Qp[b]
                terms.append(sub(p, q, wp, _RN))
                direct.append(p)
                direct.append(q)
            else:
                d = mul(p, neg(_expm1(neg(eps), wp)), wp, _RN)
                terms.append(d)
                mags.append(add(d, mul(p, add(_lm.mpf_abs(u), pr.K, _LOW), _LOW), _LOW))
        only_p = [Pp[a] for a in P.inv[P.finite & ~Q.finite].tolist()]
        terms.extend(only_p)
        mags.extend(only_p)
        mags.append(_lm.mpf_sum(direct, _LOW, _RN))
        return _lm.mpf_sum(terms, wp, _RN), _lm.mpf_sum(mags, _LOW, _RN)

    return _adaptive(compute, prec)


_LOG2_CACHE: dict[int, _Raw] = {}


def _log2(wp: int) -> _Raw:
    if wp not in _LOG2_CACHE:
        _LOG2_CACHE[wp] = _lm.mpf_log(_TWO, wp, _RN)
    return _LOG2_CACHE[wp]


def _raw_js(z: np.ndarray, w: np.ndarray, temp: _Raw, prec: int) -> _Raw:
    if _same_distribution(z, w):
        return _ZERO

    def compute(wp: int) -> tuple[_Raw, _Raw]:
        # JS = 1/2 sum_i m_i g(t_i) with g(t) = (1+t) log(1+t) + (1-t) log(1-t) >= 0,
        # t_i = (p_i - q_i)/(p_i + q_i) = tanh(eps_i / 2); single-support elements contribute
        # (1/2) p_i log 2. Twice a two-sided term is n_i L_i - q_i eps_i with n = p + q and
        # L = log(2p/n) (since log(1-t) = log(1+t) - eps); its parts cancel from ~ n t to
        # ~ n t^2, so they are formed with extra bits, and the rounding of the inputs p, q, eps
        # costs about n (1 + |u| + K) 2**-wp. For tiny eps, t and g(t) come from series.
        pr = _Pair(z, w, temp, wp)
        P, Q = pr.P, pr.Q
        Pp, Qp = P.p, Q.p
        mul, add, sub, div, log = _lm.mpf_mul, _lm.mpf_add, _lm.mpf_sub, _lm.mpf_div, _lm.mpf_log
        shift, absf = _lm.mpf_shift, _lm.mpf_abs
        terms: list[_Raw] = []
        direct: list[_Raw] = []
        mags: list[_Raw] = []
        for _, a, b in zip(*pr.both()):
            u, eps = pr.u_eps(a, b)
            p, q = Pp[a], Qp[b]
            if eps == _ZERO:
                mags.append(mul(add(p, q, _LOW), add(absf(u), pr.K, _LOW), _LOW))
                continue
            me = _mag(eps)
            if me >= _SERIES_EXP:
                xp = wp + 2 * max(0, 2 - me) + _SLACK_BITS
                n = add(p, q, xp, _RN)
                L = log(div(shift(p, 1), n, xp, _RN), xp, _RN)
                terms.append(sub(mul(n, L, xp, _RN), mul(q, eps, xp, _RN), wp, _RN))
                direct.append(n)
            else:
                m = shift(add(p, q, wp, _RN), -1)
                term = mul(m, _js_g_series(_tanh_half(eps, wp), wp), wp, _RN)
                terms.append(term)
                # an error d(eps) changes m g(t) by about m |eps| d(eps)
                err = mul(mul(m, absf(eps), _LOW), add(absf(u), pr.K, _LOW), _LOW)
                mags.append(add(term, err, _LOW))
        mags.append(mul(_lm.mpf_sum(direct, _LOW, _RN), add(_ONE, pr.KU, _LOW), _LOW))
        single = [Pp[a] for a in P.inv[P.finite & ~Q.finite].tolist()]
        single.extend(Qp[b] for b in Q.inv[Q.finite & ~P.finite].tolist())
        if single:
            s = mul(_lm.mpf_sum(single, wp, _RN), _log2(wp), wp, _RN)
            terms.append(s)
            mags.append(s)
        value = shift(_lm.mpf_sum(terms, wp, _RN), -1)
        return value, shift(_lm.mpf_sum(mags, _LOW, _RN), -1)

    return _adaptive(compute, prec)


# --------------------------------------------------------------------------------------------
# public scalar oracles
# --------------------------------------------------------------------------------------------
def mp_logsumexp(
    z: ArrayLike, temperature: Temperature = 1.0, *, dps: int = DEFAULT_DPS
) -> mpmath.mpf:
    r"""Exact log-sum-exp of one row at temperature ``T``.

    .. math::

        \operatorname{lse}_T(z) = \log \sum_{i=1}^{V} e^{z_i / T}

    with :math:`e^{-\infty} = 0`.

    Parameters
    ----------
    z : array_like or torch.Tensor, shape (V,)
        Logits; ``-inf`` entries are masked (zero probability).
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`, converted exactly.
    dps : int, optional
        Significant decimal digits of the result.

    Returns
    -------
    mpmath.mpf

    Raises
    ------
    ValueError
        If the row contains ``NaN`` or ``+inf``, or is entirely ``-inf``.

    Examples
    --------
    >>> import numpy as np
    >>> from trmath.testing import mp_logsumexp
    >>> float(mp_logsumexp(np.zeros(4)))  # log 4
    1.3862943611198906
    """
    return _finish(
        _raw_logsumexp(_row(z, "z"), _temperature(temperature), _target_prec(dps) + 2), dps
    )


def mp_entropy(
    z: ArrayLike, temperature: Temperature = 1.0, *, dps: int = DEFAULT_DPS
) -> mpmath.mpf:
    r"""Exact Shannon entropy (nats) of ``softmax(z / T)``.

    .. math::

        H(p) = -\sum_i p_i \log p_i, \qquad 0 \log 0 = 0 .

    Parameters
    ----------
    z : array_like or torch.Tensor, shape (V,)
        Logits; ``-inf`` entries are masked.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`, converted exactly.
    dps : int, optional
        Significant decimal digits of the result.

    Returns
    -------
    mpmath.mpf
        :math:`0 \le H \le \log V`.

    Raises
    ------
    ValueError
        If the row contains ``NaN`` or ``+inf``, or is entirely ``-inf``.
    """
    return _finish(
        _raw_entropy(_row(z, "z"), _temperature(temperature), _target_prec(dps) + 2), dps
    )


def _token_index(token: Any, V: int) -> int:
    t = int(token)
    if t != token or not 0 <= t < V:
        raise ValueError(f"token {token!r} is not an index in [0, {V})")
    return t


def mp_token_logprob(
    z: ArrayLike, token: int, temperature: Temperature = 1.0, *, dps: int = DEFAULT_DPS
) -> mpmath.mpf:
    r"""Exact log-probability of one token.

    .. math::

        \log p_t = z_t / T - \operatorname{lse}_T(z),

    which is :math:`-\infty` when :math:`z_t = -\infty`.

    Parameters
    ----------
    z : array_like or torch.Tensor, shape (V,)
        Logits; ``-inf`` entries are masked.
    token : int
        Index in ``[0, V)``.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`, converted exactly.
    dps : int, optional
        Significant decimal digits of the result.

    Returns
    -------
    mpmath.mpf
        :math:`\log p_t \le 0`.

    Raises
    ------
    ValueError
        If the row is invalid or ``token`` is out of range.
    """
    a = _row(z, "z")
    t = _token_index(token, a.size)
    return _finish(_raw_token_logprob(a, t, _temperature(temperature), _target_prec(dps) + 2), dps)


def _pair(z: ArrayLike, w: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _row(z, "z"), _row(w, "w")
    if a.shape != b.shape:
        raise ValueError(f"z and w must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def mp_kl(
    z: ArrayLike, w: ArrayLike, temperature: Temperature = 1.0, *, dps: int = DEFAULT_DPS
) -> mpmath.mpf:
    r"""Exact Kullback–Leibler divergence :math:`\mathrm{KL}(p \| q)`.

    .. math::

        \mathrm{KL}(p \| q) = \sum_i p_i (\log p_i - \log q_i),
        \quad p = \operatorname{softmax}(z / T),\ q = \operatorname{softmax}(w / T),

    with terms where :math:`p_i = 0` equal to zero and the value :math:`+\infty` exactly when
    some :math:`q_i = 0 < p_i`.

    Parameters
    ----------
    z, w : array_like or torch.Tensor, shape (V,)
        Logits of :math:`p` and :math:`q`; ``-inf`` entries are masked.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`, converted exactly; applied to both rows.
    dps : int, optional
        Significant decimal digits of the result.

    Returns
    -------
    mpmath.mpf
        :math:`\mathrm{KL} \ge 0`, exactly zero when the rows define the same distribution.

    Raises
    ------
    ValueError
        If a row is invalid or the shapes differ.
    """
    a, b = _pair(z, w)
    return _finish(_raw_kl(a, b, _temperature(temperature), _target_prec(dps) + 2), dps)


def mp_tv(
    z: ArrayLike, w: ArrayLike, temperature: Temperature = 1.0, *, dps: int = DEFAULT_DPS
) -> mpmath.mpf:
    r"""Exact total-variation distance.

    .. math::

        \mathrm{TV}(p, q) = \tfrac12 \sum_i |p_i - q_i| = \sum_i \max(p_i - q_i, 0)
        \in [0, 1] .

    Parameters
    ----------
    z, w : array_like or torch.Tensor, shape (V,)
        Logits of :math:`p` and :math:`q`; ``-inf`` entries are masked.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`, converted exactly; applied to both rows.
    dps : int, optional
        Significant decimal digits of the result.

    Returns
    -------
    mpmath.mpf

    Raises
    ------
    ValueError
        If a row is invalid or the shapes differ.
    """
    a, b = _pair(z, w)
    return _finish(_raw_tv(a, b, _temperature(temperature), _target_prec(dps) + 2), dps)


def mp_js(
    z: ArrayLike, w: ArrayLike, temperature: Temperature = 1.0, *, dps: int = DEFAULT_DPS
) -> mpmath.mpf:
    r"""Exact Jensen–Shannon divergence (nats).

    .. math::

        \mathrm{JS}(p, q) = \tfrac12 \mathrm{KL}(p \| m) + \tfrac12 \mathrm{KL}(q \| m),
        \quad m = \tfrac12 (p + q), \qquad 0 \le \mathrm{JS} \le \log 2 .

    Parameters
    ----------
    z, w : array_like or torch.Tensor, shape (V,)
        Logits of :math:`p` and :math:`q`; ``-inf`` entries are masked.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`, converted exactly; applied to both rows.
    dps : int, optional
        Significant decimal digits of the result.

    Returns
    -------
    mpmath.mpf

    Raises
    ------
    ValueError
        If a row is invalid or the shapes differ.
    """
    a, b = _pair(z, w)
    return _finish(_raw_js(a, b, _temperature(temperature), _target_prec(dps) + 2), dps)


def mp_softmax(
    z: ArrayLike, temperature: Temperature = 1.0, *, dps: int = DEFAULT_DPS
) -> np.ndarray:
    r"""Probabilities :math:`p = \operatorname{softmax}(z / T)`, correctly rounded to ``float64``.

    Parameters
    ----------
    z : array_like or torch.Tensor, shape (V,)
        Logits; ``-inf`` entries get probability exactly 0.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    numpy.ndarray of float64, shape (V,)
    """
    a = _row(z, "z")
    wp = _target_prec(dps) + _GRAD_GUARD_BITS
    p, _ = _Side(a, _temperature(temperature), wp).probs(wp)
    return _to_f64(p)


def mp_log_softmax(
    z: ArrayLike, temperature: Temperature = 1.0, *, dps: int = DEFAULT_DPS
) -> np.ndarray:
    r"""Log-probabilities :math:`\log p_i = z_i / T - \operatorname{lse}_T(z)` in ``float64``.

    Parameters
    ----------
    z : array_like or torch.Tensor, shape (V,)
        Logits; ``-inf`` entries give ``-inf``.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    numpy.ndarray of float64, shape (V,)
    """
    a = _row(z, "z")
    wp = _target_prec(dps) + _GRAD_GUARD_BITS
    _, lp = _Side(a, _temperature(temperature), wp).probs(wp)
    return _to_f64(lp)


# --------------------------------------------------------------------------------------------
# gradient oracles
# --------------------------------------------------------------------------------------------
def _to_f64(xs: Sequence[_Raw]) -> np.ndarray:
    to_float = _lm.to_float
    return np.array([to_float(x, rnd=_RN) for x in xs], dtype=np.float64)


def _grad_scale(grad_output: Any, temp: _Raw, wp: int) -> _Raw:
    g = grad_output._mpf_ if isinstance(grad_output, mpmath.mpf) else _lm.from_float(
        float(grad_output))
    return _lm.mpf_div(g, temp, wp, _RN)


def mp_grad_logsumexp(
    z: ArrayLike,
    temperature: Temperature = 1.0,
    *,
    grad_output: float = 1.0,
    dps: int = DEFAULT_DPS,
) -> np.ndarray:
    r"""Gradient of :func:`mp_logsumexp`: :math:`\partial_{z_j} = g\, p_j / T`.

    Parameters
    ----------
    z : array_like or torch.Tensor, shape (V,)
        Logits.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    grad_output : float, optional
        Upstream gradient :math:`g`.
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    numpy.ndarray of float64, shape (V,)
    """
    a = _row(z, "z")
    temp = _temperature(temperature)
    wp = _target_prec(dps) + _GRAD_GUARD_BITS
    g = _grad_scale(grad_output, temp, wp)
    p, _ = _Side(a, temp, wp).probs(wp)
    return _to_f64([_lm.mpf_mul(g, pj, wp, _RN) for pj in p])


def mp_grad_entropy(
    z: ArrayLike,
    temperature: Temperature = 1.0,
    *,
    grad_output: float = 1.0,
    dps: int = DEFAULT_DPS,
) -> np.ndarray:
    r"""Gradient of :func:`mp_entropy`: :math:`\partial_{z_j} H = -g\, p_j (\log p_j + H) / T`.

    Parameters
    ----------
    z : array_like or torch.Tensor, shape (V,)
        Logits; masked entries get gradient 0.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    grad_output : float, optional
        Upstream gradient :math:`g`.
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    numpy.ndarray of float64, shape (V,)
    """
    a = _row(z, "z")
    temp = _temperature(temperature)
    wp = _target_prec(dps) + _GRAD_GUARD_BITS
    g = _lm.mpf_neg(_grad_scale(grad_output, temp, wp))
    side = _Side(a, temp, wp)
    H = side.entropy(wp)
    p, lp = side.probs(wp)
    mul, add = _lm.mpf_mul, _lm.mpf_add
    out = [
        _ZERO if pj == _ZERO else mul(g, mul(pj, add(lj, H, wp, _RN), wp, _RN), wp, _RN)
        for pj, lj in zip(p, lp)
    ]
    return _to_f64(out)


def mp_grad_token_logprob(
    z: ArrayLike,
    token: int,
    temperature: Temperature = 1.0,
    *,
    grad_output: float = 1.0,
    dps: int = DEFAULT_DPS,
) -> np.ndarray:
    r"""Gradient of :func:`mp_token_logprob`: :math:`g\,(\delta_{jt} - p_j) / T`.

    Parameters
    ----------
    z : array_like or torch.Tensor, shape (V,)
        Logits.
    token : int
        Index in ``[0, V)``.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    grad_output : float, optional
        Upstream gradient :math:`g`.
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    numpy.ndarray of float64, shape (V,)

    Notes
    -----
    Combine with :func:`mp_grad_entropy` for ``token_logprobs(..., return_entropy=True)``: the
    gradient is linear in the two upstream gradients.
    """
    a = _row(z, "z")
    t = _token_index(token, a.size)
    temp = _temperature(temperature)
    wp = _target_prec(dps) + _GRAD_GUARD_BITS
    g = _grad_scale(grad_output, temp, wp)
    p, _ = _Side(a, temp, wp).probs(wp)
    d = [_lm.mpf_neg(pj) for pj in p]
    # 1 - p_t as the sum of the other probabilities (positive terms): as a difference it was 0
    # once 1 - p_t fell below the working precision (z = [300, 0.3]: 1 - p_t = 7e-131).
    rest = _ZERO
    for j, pj in enumerate(p):
        if j != t:
            rest = _lm.mpf_add(rest, pj, wp, _RN)
    d[t] = rest
    return _to_f64([_lm.mpf_mul(g, v, wp, _RN) for v in d])


def mp_grad_kl(
    z: ArrayLike,
    w: ArrayLike,
    temperature: Temperature = 1.0,
    *,
    grad_output: float = 1.0,
    dps: int = DEFAULT_DPS,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Gradients of :func:`mp_kl` with respect to both logit rows.

    .. math::

        \partial_{z_j} \mathrm{KL} = g\, p_j (\varepsilon_j - \mathrm{KL}) / T, \qquad
        \partial_{w_j} \mathrm{KL} = g\, (q_j - p_j) / T,

    with :math:`\varepsilon_j = \log p_j - \log q_j`.

    Parameters
    ----------
    z, w : array_like or torch.Tensor, shape (V,)
        Logits of :math:`p` and :math:`q`.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    grad_output : float, optional
        Upstream gradient :math:`g`.
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    dz, dw : numpy.ndarray of float64, shape (V,)
        When :math:`\mathrm{KL} = +\infty` (some :math:`q_i = 0 < p_i`) the gradient with respect
        to ``z`` is undefined: ``dz`` is ``NaN`` wherever :math:`p_j > 0` (0 elsewhere), while
        ``dw`` still follows the formula.
    """
    a, b = _pair(z, w)
    temp = _temperature(temperature)
    wp = _target_prec(dps) + _GRAD_GUARD_BITS
    g = _grad_scale(grad_output, temp, wp)
    pr = _Pair(a, b, temp, wp)
    P, Q = pr.P, pr.Q
    p, _ = P.probs(wp)
    q, _ = Q.probs(wp)
    mul, sub = _lm.mpf_mul, _lm.mpf_sub
    diff = [sub(qj, pj, wp, _RN) for pj, qj in zip(p, q)]  # q - p
    eps_of: dict[int, _Raw] = {}
    for j, ja, jb in zip(*pr.both()):
        _, eps = pr.u_eps(ja, jb)
        eps_of[j] = eps
        if _mag(eps) < _SERIES_EXP and eps != _ZERO:  # q - p = p expm1(-eps) without cancellation
            diff[j] = mul(p[j], _expm1(_lm.mpf_neg(eps), wp), wp, _RN)
    dw = [mul(g, d, wp, _RN) for d in diff]
    kl = _raw_kl(a, b, temp, wp)
    if kl == _INF:
        return np.where(np.isfinite(a), np.nan, 0.0), _to_f64(dw)
    dz = [_ZERO] * a.size
    for j, eps in eps_of.items():
        dz[j] = mul(g, mul(p[j], sub(eps, kl, wp, _RN), wp, _RN), wp, _RN)
    return _to_f64(dz), _to_f64(dw)


def mp_grad_tv(
    z: ArrayLike,
    w: ArrayLike,
    temperature: Temperature = 1.0,
    *,
    grad_output: float = 1.0,
    dps: int = DEFAULT_DPS,
) -> tuple[np.ndarray, np.ndarray]:
    r"""(Sub)gradients of :func:`mp_tv` with respect to both logit rows.

    .. math::

        \partial_{z_j} \mathrm{TV} = \tfrac{g}{2}\, p_j (s_j - a) / T, \qquad
        \partial_{w_j} \mathrm{TV} = -\tfrac{g}{2}\, q_j (s_j - b) / T,

    with :math:`s_j = \operatorname{sign}(p_j - q_j)`, :math:`\operatorname{sign}(0) = 0`,
    :math:`a = \sum_i p_i s_i` and :math:`b = \sum_i q_i s_i`.

    Parameters
    ----------
    z, w : array_like or torch.Tensor, shape (V,)
        Logits of :math:`p` and :math:`q`.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    grad_output : float, optional
        Upstream gradient :math:`g`.
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    dz, dw : numpy.ndarray of float64, shape (V,)
    """
    a, b = _pair(z, w)
    temp = _temperature(temperature)
    wp = _target_prec(dps) + _GRAD_GUARD_BITS
    g = _lm.mpf_shift(_grad_scale(grad_output, temp, wp), -1)
    pr = _Pair(a, b, temp, wp)
    P, Q = pr.P, pr.Q
    p, _ = P.probs(wp)
    q, _ = Q.probs(wp)
    s = np.zeros(a.shape, dtype=np.int64)  # sign(p - q), sign(0) = 0
    s[P.finite & ~Q.finite] = 1
    s[~P.finite & Q.finite] = -1
    if not _same_distribution(a, b):
        for j, ja, jb in zip(*pr.both()):
            _, eps = pr.u_eps(ja, jb)
            s[j] = _lm.mpf_sign(eps)
    sl = cast(list[int], s.tolist())
    mul, sub, neg = _lm.mpf_mul, _lm.mpf_sub, _lm.mpf_neg

    def centred(r: list[_Raw]) -> list[_Raw]:
        # s_j - sum_i r_i s_i, written as sums of same-sign terms for the s_j = +-1 cases
        plus = _lm.mpf_sum([x for x, v in zip(r, sl) if v > 0], wp, _RN)
        minus = _lm.mpf_sum([x for x, v in zip(r, sl) if v < 0], wp, _RN)
        zero = _lm.mpf_sum([x for x, v in zip(r, sl) if v == 0], wp, _RN)
        c = {
            1: _lm.mpf_add(_lm.mpf_shift(minus, 1), zero, wp, _RN),
            -1: neg(_lm.mpf_add(_lm.mpf_shift(plus, 1), zero, wp, _RN)),
            0: sub(minus, plus, wp, _RN),
        }
        return [c[v] for v in sl]

    dz = [mul(g, mul(pj, cj, wp, _RN), wp, _RN) for pj, cj in zip(p, centred(p))]
    ng = neg(g)
    dw = [mul(ng, mul(qj, cj, wp, _RN), wp, _RN) for qj, cj in zip(q, centred(q))]
    return _to_f64(dz), _to_f64(dw)


def mp_grad_js(
    z: ArrayLike,
    w: ArrayLike,
    temperature: Temperature = 1.0,
    *,
    grad_output: float = 1.0,
    dps: int = DEFAULT_DPS,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Gradients of :func:`mp_js` with respect to both logit rows.

    .. math::

        \partial_{z_j} \mathrm{JS} = \tfrac{g}{2}\, p_j \bigl(\log\tfrac{p_j}{m_j} - a\bigr) / T,
        \qquad
        \partial_{w_j} \mathrm{JS} = \tfrac{g}{2}\, q_j \bigl(\log\tfrac{q_j}{m_j} - b\bigr) / T,

    with :math:`m = (p + q)/2`, :math:`a = \mathrm{KL}(p \| m)`, :math:`b = \mathrm{KL}(q \| m)`.

    Parameters
    ----------
    z, w : array_like or torch.Tensor, shape (V,)
        Logits of :math:`p` and :math:`q`.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    grad_output : float, optional
        Upstream gradient :math:`g`.
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    dz, dw : numpy.ndarray of float64, shape (V,)
    """
    a, b = _pair(z, w)
    temp = _temperature(temperature)
    wp = _target_prec(dps) + _GRAD_GUARD_BITS
    g = _lm.mpf_shift(_grad_scale(grad_output, temp, wp), -1)
    pr = _Pair(a, b, temp, wp)
    P, Q = pr.P, pr.Q
    p, _ = P.probs(wp)
    q, _ = Q.probs(wp)
    mul, sub, add, div = _lm.mpf_mul, _lm.mpf_sub, _lm.mpf_add, _lm.mpf_div
    log2 = _log2(wp)
    # log(p/m) = log1p(t), log(q/m) = log1p(-t), t = (p - q)/(p + q) = tanh(eps/2)
    rp = [log2 if pj != _ZERO else _ZERO for pj in p]
    rq = [log2 if qj != _ZERO else _ZERO for qj in q]
    for j, ja, jb in zip(*pr.both()):
        _, eps = pr.u_eps(ja, jb)
        if _mag(eps) >= _SERIES_EXP:
            xp = wp + _SLACK_BITS
            t = div(sub(p[j], q[j], xp, _RN), add(p[j], q[j], xp, _RN), xp, _RN)
        else:
            t = _tanh_half(eps, wp + _SLACK_BITS)
        rp[j] = _log1p(t, wp)
        rq[j] = _log1p(_lm.mpf_neg(t), wp)
    A = _lm.mpf_sum([mul(pj, r, wp, _RN) for pj, r in zip(p, rp)], wp, _RN)
    B = _lm.mpf_sum([mul(qj, r, wp, _RN) for qj, r in zip(q, rq)], wp, _RN)
    dz = [mul(g, mul(pj, sub(r, A, wp, _RN), wp, _RN), wp, _RN) for pj, r in zip(p, rp)]
    dw = [mul(g, mul(qj, sub(r, B, wp, _RN), wp, _RN), wp, _RN) for qj, r in zip(q, rq)]
    return _to_f64(dz), _to_f64(dw)


# --------------------------------------------------------------------------------------------
# registries and batched helpers
# --------------------------------------------------------------------------------------------
#: Value oracles by the name of the trmath function they check.
ORACLES: dict[str, Callable[..., mpmath.mpf]] = {
    "logsumexp": mp_logsumexp,
    "entropy": mp_entropy,
    "token_logprobs": mp_token_logprob,
    "kl": mp_kl,
    "tv": mp_tv,
    "js": mp_js,
}

#: Gradient oracles by the name of the trmath function whose backward they check.
GRADIENT_ORACLES: dict[str, Callable[..., Any]] = {
    "logsumexp": mp_grad_logsumexp,
    "entropy": mp_grad_entropy,
    "token_logprobs": mp_grad_token_logprob,
    "kl": mp_grad_kl,
    "tv": mp_grad_tv,
    "js": mp_grad_js,
}

_TOKEN_ORACLES = {mp_token_logprob, mp_grad_token_logprob}


def _resolve(
    fn: str | Callable[..., Any], registry: dict[str, Callable[..., Any]]
) -> Callable[..., Any]:
    if callable(fn):
        return fn
    try:
        return registry[fn]
    except KeyError:
        raise ValueError(
            f"unknown oracle {fn!r}; valid names are {', '.join(sorted(registry))}"
        ) from None


def _batch_inputs(
    arrays: Sequence[ArrayLike], tokens: ArrayLike | None, uses_tokens: bool
) -> tuple[list[np.ndarray], np.ndarray | None, tuple[int, ...]]:
    if not arrays:
        raise ValueError("at least one logits array is required")
    arrs = [as_float64(x) for x in arrays]
    shape = arrs[0].shape
    if len(shape) < 1:
        raise ValueError("logits must have at least one axis (the vocabulary)")
    for x in arrs[1:]:
        if x.shape != shape:
            raise ValueError(f"all logits must have the same shape, got {shape} and {x.shape}")
    lead = shape[:-1]
    tok = None
    if uses_tokens:
        if tokens is None:
            raise ValueError("this oracle needs tokens")
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        tok = np.asarray(tokens)
        if tok.shape != lead:
            raise ValueError(f"tokens must have shape {lead}, got {tok.shape}")
    return arrs, tok, lead


def mp_batch(
    fn: str | Callable[..., mpmath.mpf],
    *arrays: ArrayLike,
    tokens: ArrayLike | None = None,
    temperature: Temperature = 1.0,
    dps: int = DEFAULT_DPS,
    invalid: str = "raise",
    return_mpf: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    r"""Apply a value oracle to every row of ``[..., V]`` inputs.

    Parameters
    ----------
    fn : str or callable
        A name in :data:`ORACLES` (``"logsumexp"``, ``"entropy"``, ``"token_logprobs"``,
        ``"kl"``, ``"tv"``, ``"js"``) or one of the ``mp_*`` functions.
    *arrays : array_like or torch.Tensor, shape (..., V)
        One logits array for single-row oracles, two (same shape) for divergences.
    tokens : array_like of int, shape (...), optional
        Token indices, required by ``token_logprobs``.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`, shared by all rows.
    dps : int, optional
        Significant decimal digits of each result.
    invalid : {"raise", "nan"}, optional
        What to do with a row that has no distribution: raise :class:`ValueError` naming the
        argument and the row, or give ``NaN`` for it (the raw kernels' convention).
    return_mpf : bool, optional
        Also return the :class:`mpmath.mpf` values.

    Returns
    -------
    values : numpy.ndarray of float64, shape (...)
        The results correctly rounded (from the working precision) to ``float64``.
    mpf_values : numpy.ndarray of object, shape (...)
        Only when ``return_mpf`` is true.

    Examples
    --------
    >>> import numpy as np
    >>> from trmath.testing import mp_batch
    >>> mp_batch("kl", np.zeros((2, 3)), np.zeros((2, 3)))
    array([0., 0.])
    """
    if invalid not in ("raise", "nan"):
        raise ValueError(f"invalid must be 'raise' or 'nan', got {invalid!r}")
    f = _resolve(fn, ORACLES)
    arrs, tok, lead = _batch_inputs(arrays, tokens, f in _TOKEN_ORACLES)
    temp = _temperature(temperature)
    prec = _target_prec(dps) + 2
    names = ("z", "w") if len(arrs) == 2 else ("logits",)
    out = np.empty(lead, dtype=np.float64)
    objs = np.empty(lead, dtype=object)
    raw_fns: dict[Callable[..., Any], Callable[..., _Raw]] = {
        mp_logsumexp: _raw_logsumexp,
        mp_entropy: _raw_entropy,
        mp_kl: _raw_kl,
        mp_tv: _raw_tv,
        mp_js: _raw_js,
    }
    for idx in np.ndindex(*lead):
        rows = [x[idx] for x in arrs]
        try:
            for r, nm in zip(rows, names):
                _check_row(r, f"{nm}{list(idx)}")
        except ValueError:
            if invalid == "raise":
                raise
            out[idx] = np.nan
            objs[idx] = mpmath.mpf("nan")
            continue
        if f is mp_token_logprob:
            assert tok is not None
            t = _token_index(tok[idx], rows[0].size)
            raw = _raw_token_logprob(rows[0], t, temp, prec)
        elif f in raw_fns:
            raw = raw_fns[f](*rows, temp, prec)
        else:  # a user callable with the oracle signature
            val = f(*rows, temperature, dps=dps)
            raw = val._mpf_ if isinstance(val, mpmath.mpf) else _lm.from_float(float(val))
        out[idx] = _lm.to_float(raw, rnd=_RN)
        if return_mpf:
            objs[idx] = _finish(raw, dps)
    return (out, objs) if return_mpf else out


def mp_grad_batch(
    fn: str | Callable[..., Any],
    *arrays: ArrayLike,
    tokens: ArrayLike | None = None,
    temperature: Temperature = 1.0,
    grad_output: ArrayLike | None = None,
    dps: int = DEFAULT_DPS,
) -> np.ndarray | tuple[np.ndarray, ...]:
    r"""Apply a gradient oracle to every row of ``[..., V]`` inputs.

    Parameters
    ----------
    fn : str or callable
        A name in :data:`GRADIENT_ORACLES` or one of the ``mp_grad_*`` functions.
    *arrays : array_like or torch.Tensor, shape (..., V)
        One logits array for single-row functions, two for divergences.
    tokens : array_like of int, shape (...), optional
        Token indices, required by ``token_logprobs``.
    temperature : float or mpmath.mpf, optional
        :math:`T > 0`.
    grad_output : array_like, shape (...), optional
        Upstream gradient per row (ones by default).
    dps : int, optional
        Working digits (before the guard bits).

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray, float64, shape (..., V)
        One gradient per logits argument, as returned by the row function.
    """
    f = _resolve(fn, GRADIENT_ORACLES)
    arrs, tok, lead = _batch_inputs(arrays, tokens, f is mp_grad_token_logprob)
    g = np.ones(lead) if grad_output is None else as_float64(grad_output)
    if g.shape != lead:
        raise ValueError(f"grad_output must have shape {lead}, got {g.shape}")
    outs = [np.empty(arrs[0].shape, dtype=np.float64) for _ in arrs]
    for idx in np.ndindex(*lead):
        rows = [x[idx] for x in arrs]
        if f is mp_grad_token_logprob:
            assert tok is not None
            res = f(rows[0], tok[idx], temperature, grad_output=float(g[idx]), dps=dps)
        else:
            res = f(*rows, temperature, grad_output=float(g[idx]), dps=dps)
        res_t = res if isinstance(res, tuple) else (res,)
        for o, r in zip(outs, res_t):
            o[idx] = r
    return tuple(outs) if len(outs) > 1 else outs[0]
