r"""Multiple-precision references of the coarse-grained (Binary / Top-K) divergences.

Each oracle evaluates the *definition* on the exact values the float inputs represent
(every float16/bfloat16/float32/float64 number converts to :class:`mpmath.mpf` exactly):

.. math::

    \mathrm{TV}_{\mathrm{bin}} = |p - q|,\qquad
    \mathrm{KL}_{\mathrm{bin}} = p\log\frac pq + (1-p)\log\frac{1-p}{1-q},\qquad
    p = e^{\ell_p},\ q = e^{\ell_q},

.. math::

    \mathrm{TV}_S = \tfrac12\Big(\sum_{i\in S}|p_i - q_i| + |R_p - R_q|\Big),\qquad
    \mathrm{KL}_S = \sum_{i\in S} p_i\log\frac{p_i}{q_i} + R_p\log\frac{R_p}{R_q},\qquad
    R = 1 - \sum_{i\in S} p_i,

with :math:`0\log(0/x) = 0` and :math:`x\log(x/0) = +\infty` for :math:`x > 0`. The subtractions
``1 - sum`` is done literally, at a working precision that is raised until it is resolved and
two successive evaluations agree to the requested number of digits. Four exact identities
replace subtractions that would otherwise need thousands of digits: ``log(p/q) = lp - lq``
(the inputs are exact), ``1 - p = -expm1(lp)`` for the binary rest, ``R_q - R_p =
sum (p_i - q_i)``, and ``log(R_q/R_p) = log1p((R_q - R_p)/R_p)`` when that ratio is within
``[1/2, 3/2]``; mpmath evaluates each to full relative precision.
A row whose kept probabilities sum to more than 1 is rejected with :class:`ValueError`
(its tail would be negative); the functions under test clamp such rows only within rounding,
so tests feed rows with a non-negative exact tail.

Examples
--------
>>> import mpmath
>>> from trmath.testing import mp_binary_kl, mp_topk_tv
>>> mpmath.nstr(mp_binary_kl(-1e-12, -2e-12), 12)  # p, q -> 1
'3.0685281944e-13'
>>> float(mp_topk_tv([-0.5], [-0.5]))
0.0
"""

from __future__ import annotations

from typing import Any

import mpmath
import numpy as np

__all__ = ["mp_binary_tv", "mp_binary_kl", "mp_topk_tv", "mp_topk_kl", "mp_coarse_batch"]

#: Digits the oracles guarantee by default.
DEFAULT_DPS = 50
_MAX_DPS = 5000


def _exact(x: Any, name: str) -> mpmath.mpf:
    """The exact value of one float (any precision) as an mpf."""
    if hasattr(x, "item"):
        x = x.item()
    x = float(x)  # exact for float16/bfloat16/float32/float64 values
    if np.isnan(x):
        raise ValueError(f"{name}: NaN has no reference value")
    if x > 0:
        raise ValueError(f"{name}: a log-probability must be <= 0, got {x!r}")
    return mpmath.mpf(x)


def _vec(x: Any, name: str) -> list:
    a = np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name}: empty")
    return [_exact(v, name) for v in a]


def _xlogy_ratio(x, y):
    """``x log(x/y)`` with 0 log 0 = 0 and ``+inf`` for y = 0 < x."""
    if x == 0:
        return mpmath.mpf(0)
    if y == 0:
        return mpmath.inf
    return x * mpmath.log(x / y)


class _MorePrecision(Exception):
    """Raised inside an evaluation whose working precision cannot resolve a cancellation."""


def _digits(xs) -> int:
    """Decimal digits needed below 1 by the smallest non-zero magnitude among ``xs``."""
    m = 0
    for x in xs:
        if x != 0 and mpmath.isfinite(x):
            m = max(m, int(-mpmath.floor(mpmath.log10(abs(x)))))
    return m


def _start(lps, lqs) -> int:
    # near-equal pairs cancel twice digits(lp - lq) in the sums (KL ~ d^2)
    diffs = [a - b for a, b in zip(lps, lqs) if mpmath.isfinite(a) and mpmath.isfinite(b)]
    return 2 * _digits(diffs)


def _tail_term(Rp, Rq, diff):
    """``R_p log(R_p / R_q)`` with ``diff = R_q - R_p`` computed by the caller.

    ``log(R_q/R_p)`` is ``log1p(diff / R_p)`` when ``|diff / R_p| <= 1/2`` (an exact identity:
    the literal ratio would need as many extra digits as ``diff / R_p`` is small), else the
    literal logarithm of the ratio.
    """
    if Rp == 0:
        return mpmath.mpf(0)
    if Rq == 0:
        return mpmath.inf
    x = diff / Rp
    return -Rp * (mpmath.log1p(x) if abs(x) <= 0.5 else mpmath.log(Rq / Rp))


def _one_minus(s, genuine_zero: bool, dps: int):
    """``1 - s`` at the working precision; asks for more precision when it cannot resolve it."""
    r = 1 - s
    if genuine_zero:
        return r
    if r == 0 or abs(r) < mpmath.mpf(10) ** (-(mpmath.mp.dps - dps - 10)):
        raise _MorePrecision
    return r


def _adaptive(f, dps: int, extra: int = 0):
    """Evaluate ``f(dps)`` at increasing precision until two results agree to ``dps`` digits."""
    prev = None
    work = dps + 20 + extra
    while work <= _MAX_DPS:
        try:
            with mpmath.workdps(work):
                cur = f(dps)
        except _MorePrecision:
            work *= 2
            continue
        if prev is not None:
            if cur == prev or (mpmath.isinf(cur) and mpmath.isinf(prev)):
                break
            if cur != 0 and abs(cur - prev) <= abs(cur) * mpmath.mpf(10) ** (-dps - 2):
                break
        prev = cur
        work *= 2
    else:
        raise ArithmeticError("reference did not converge (increase _MAX_DPS)")
    with mpmath.workdps(dps):
        return +cur


def _genuine_one(ls) -> bool:
    """Whether ``sum exp(l_i)`` is exactly 1: only one 0 and the rest ``-inf`` (the exponential
    of a non-zero rational is transcendental, Lindemann--Weierstrass)."""
    return sum(1 for v in ls if v == 0) == 1 and all(v == 0 or mpmath.isinf(v) for v in ls)


def _kept(lps, lqs, name_p, name_q, dps):
    p = [mpmath.exp(v) for v in lps]
    q = [mpmath.exp(v) for v in lqs]
    Rp = _one_minus(mpmath.fsum(p), _genuine_one(lps), dps)
    Rq = _one_minus(mpmath.fsum(q), _genuine_one(lqs), dps)
    if Rp < 0:
        raise ValueError(f"{name_p}: kept probabilities sum to more than 1 (1 - sum = {mpmath.nstr(Rp, 5)})")
    if Rq < 0:
        raise ValueError(f"{name_q}: kept probabilities sum to more than 1 (1 - sum = {mpmath.nstr(Rq, 5)})")
    return p, q, Rp, Rq


def mp_binary_tv(p_logprob: Any, q_logprob: Any, dps: int = DEFAULT_DPS) -> mpmath.mpf:
    r"""Reference :math:`|e^{\ell_p} - e^{\ell_q}|` of two scalar log-probabilities.

    Examples
    --------
    >>> from trmath.testing import mp_binary_tv
    >>> mp_binary_tv(-1e-12, -2e-12) > 0
    True
    """
    a, b = _exact(p_logprob, "p_logprob"), _exact(q_logprob, "q_logprob")
    return _adaptive(lambda d: abs(mpmath.exp(a) - mpmath.exp(b)), dps, _start([a], [b]))


def mp_binary_kl(p_logprob: Any, q_logprob: Any, dps: int = DEFAULT_DPS) -> mpmath.mpf:
    r"""Reference :math:`\mathrm{KL}(\mathrm{Bern}(e^{\ell_p})\,\|\,\mathrm{Bern}(e^{\ell_q}))`.

    Examples
    --------
    >>> from trmath.testing import mp_binary_kl
    >>> mp_binary_kl(-0.5, -0.5)
    mpf('0.0')
    >>> mp_binary_kl(-1e-3, 0.0)  # q = 1 > p: the rest has mass under p only
    mpf('+inf')
    """
    a, b = _exact(p_logprob, "p_logprob"), _exact(q_logprob, "q_logprob")

    def f(d):
        p, q = mpmath.exp(a), mpmath.exp(b)
        kept = mpmath.mpf(0) if p == 0 else (mpmath.inf if q == 0 else p * (a - b))
        # 1 - p as -expm1(l) (exact identity; the literal 1 - e^l needs |log10 l| extra digits)
        return kept + _tail_term(-mpmath.expm1(a), -mpmath.expm1(b), p - q)

    return _adaptive(f, dps, _start([a], [b]))


def mp_topk_tv(p_logprobs: Any, q_logprobs: Any, dps: int = DEFAULT_DPS) -> mpmath.mpf:
    r"""Reference Top-K TV of one kept set (``[K]`` log-probabilities under each policy).

    Examples
    --------
    >>> import math
    >>> from trmath.testing import mp_topk_tv
    >>> round(float(mp_topk_tv([math.log(0.5), math.log(0.3)], [math.log(0.4), math.log(0.4)])), 12)
    0.1
    """
    lps, lqs = _vec(p_logprobs, "p_logprobs"), _vec(q_logprobs, "q_logprobs")
    if len(lps) != len(lqs):
        raise ValueError(f"p_logprobs and q_logprobs: K differs ({len(lps)} vs {len(lqs)})")

    def f(d):
        p, q, Rp, Rq = _kept(lps, lqs, "p_logprobs", "q_logprobs", d)
        # |R_p - R_q| = |sum (q_i - p_i)|: exact identity; the literal difference of the two
        # tails would need as many extra digits as the kept masses are small
        return (mpmath.fsum(abs(x - y) for x, y in zip(p, q)) + abs(mpmath.fsum(y - x for x, y in zip(p, q)))) / 2

    return _adaptive(f, dps, _start(lps, lqs))


def mp_topk_kl(p_logprobs: Any, q_logprobs: Any, dps: int = DEFAULT_DPS) -> mpmath.mpf:
    r"""Reference Top-K KL (kept tokens plus the tail bucket) of one kept set.

    Examples
    --------
    >>> import math
    >>> from trmath.testing import mp_topk_kl
    >>> ref = mp_topk_kl([math.log(0.5)], [math.log(0.25)])  # = binary KL(0.5 || 0.25)
    >>> abs(float(ref) - (0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))) < 1e-16
    True
    """
    lps, lqs = _vec(p_logprobs, "p_logprobs"), _vec(q_logprobs, "q_logprobs")
    if len(lps) != len(lqs):
        raise ValueError(f"p_logprobs and q_logprobs: K differs ({len(lps)} vs {len(lqs)})")

    def f(d):
        p, q, Rp, Rq = _kept(lps, lqs, "p_logprobs", "q_logprobs", d)
        kept = mpmath.fsum(
            mpmath.mpf(0) if x == 0 else (mpmath.inf if y == 0 else x * (a - b))
            for x, y, a, b in zip(p, q, lps, lqs)
        )  # p log(p/q) = p (log p - log q): the log-probabilities are exact
        return kept + _tail_term(Rp, Rq, mpmath.fsum(x - y for x, y in zip(p, q)))

    return _adaptive(f, dps, _start(lps, lqs))


_ORACLES = {"binary_tv": mp_binary_tv, "binary_kl": mp_binary_kl, "topk_tv": mp_topk_tv, "topk_kl": mp_topk_kl}


def mp_coarse_batch(name: str, p: Any, q: Any, dps: int = DEFAULT_DPS) -> np.ndarray:
    r"""Apply one of the coarse oracles over a batch; returns an object array of :class:`mpmath.mpf`.

    ``name`` is ``"binary_tv"``, ``"binary_kl"`` (elementwise over ``[...]``), ``"topk_tv"`` or
    ``"topk_kl"`` (rows ``[..., K]`` → ``[...]``).

    Examples
    --------
    >>> import numpy as np
    >>> from trmath.testing import mp_coarse_batch
    >>> mp_coarse_batch("binary_tv", np.array([-1.0, -2.0]), np.array([-1.0, -1.0])).shape
    (2,)
    """
    if name not in _ORACLES:
        raise ValueError(f"name: expected one of {sorted(_ORACLES)}, got {name!r}")
    f = _ORACLES[name]
    pa = np.asarray(p.detach().cpu().double() if hasattr(p, "detach") else p, dtype=np.float64)
    qa = np.asarray(q.detach().cpu().double() if hasattr(q, "detach") else q, dtype=np.float64)
    if pa.shape != qa.shape:
        raise ValueError(f"p and q: shapes differ ({pa.shape} vs {qa.shape})")
    if name.startswith("binary"):
        out = np.empty(pa.shape, dtype=object)
        for idx in np.ndindex(*pa.shape):
            out[idx] = f(pa[idx], qa[idx], dps)
        return out
    lead = pa.shape[:-1]
    out = np.empty(lead, dtype=object)
    for idx in np.ndindex(*lead):
        out[idx] = f(pa[idx], qa[idx], dps)
    return out
