r"""Multiple-precision references of the trust-region projections (:mod:`mpmath`).

On the exact values the inputs represent (converted to float64 exactly, then to mpmath numbers),
with :math:`a = \log\operatorname{softmax}(z/T)`, :math:`b = \log\operatorname{softmax}(w/T)`,
:math:`S` the common support and :math:`t = 1/(1+\eta)`:

.. math::

    \log\tilde\pi_i = b_i + t(a_i - b_i) - \Lambda(t), \qquad
    g(\eta) = \mathrm{KL}(\tilde\pi_\eta\|\pi_{old}) = \sum_{i\in S}\tilde\pi_i\bigl(t(a_i-b_i) - \Lambda(t)\bigr),

and the multiplier of the KL ball is the root of :math:`g(\eta) = \varepsilon` (:math:`\eta = 0`
when :math:`\mathrm{KL}(\pi_{new}\|\pi_{old}) \le \varepsilon`; :math:`\eta = 0^+`, the new
policy restricted to :math:`S`, when that divergence is infinite but :math:`g(0^+) \le
\varepsilon`). The root is bracketed and refined
by bisection steps in :math:`\log\eta` interleaved with secant steps, at ``dps + 20`` working digits,
until the bracket is narrower than :math:`10^{-\mathrm{dps}}` relative. The oracles are written for
small vocabularies (each evaluation of :math:`g` costs ``V`` multiple-precision exponentials).

Examples
--------
>>> from trmath.testing import mp_project_kl
>>> eta, lp = mp_project_kl([2.0, 0.0, -1.0], [0.0, 0.0, 0.0], 0.05)
>>> float(eta) > 0, lp.shape
(True, (3,))
"""

from __future__ import annotations

from typing import Any

import mpmath
import numpy as np

from trmath.testing.oracles import DEFAULT_DPS, as_float64

__all__ = ["mp_project_kl", "mp_projection_kl_at", "mp_project_tv"]


def _logsoftmax(x: np.ndarray, T: Any) -> list:
    vals = [mpmath.mpf(float(v)) / T if np.isfinite(v) else mpmath.ninf for v in x.tolist()]
    fin = [v for v in vals if v != mpmath.ninf]
    m = max(fin)
    lse = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in fin))
    return [v - lse if v != mpmath.ninf else mpmath.ninf for v in vals]


def _rows(z: Any, w: Any, T: Any) -> tuple[list, list, Any]:
    za, wa = as_float64(z).reshape(-1), as_float64(w).reshape(-1)
    if za.shape != wa.shape:
        raise ValueError(f"z and w: shapes differ ({za.shape} vs {wa.shape})")
    for name, x in (("z", za), ("w", wa)):
        if np.isnan(x).any() or np.isposinf(x).any() or np.isneginf(x).all():
            raise ValueError(f"{name}: row has no distribution (NaN, +inf or all -inf)")
    Tm = mpmath.mpf(float(T)) if not isinstance(T, mpmath.mpf) else T
    if not Tm > 0:
        raise ValueError(f"temperature must be > 0, got {T!r}")
    return _logsoftmax(za, Tm), _logsoftmax(wa, Tm), Tm


def _interp(a: list, b: list, eta: Any) -> tuple[list, Any]:
    """``log pi~`` and ``KL(pi~ || pi_old)`` at ``eta > 0``."""
    t = 1 / (1 + eta)
    S = [i for i in range(len(a)) if a[i] != mpmath.ninf and b[i] != mpmath.ninf]
    y = {i: b[i] + t * (a[i] - b[i]) for i in S}
    m = max(y.values())
    lam = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in y.values()))
    lp = [y[i] - lam if i in y else mpmath.ninf for i in range(len(a))]
    kl = mpmath.fsum(mpmath.exp(lp[i]) * (t * (a[i] - b[i]) - lam) for i in S)
    return lp, kl


def _kl_rows(a: list, b: list) -> Any:
    tot = mpmath.mpf(0)
    for ai, bi in zip(a, b):
        if ai == mpmath.ninf:
            continue
        if bi == mpmath.ninf:
            return mpmath.inf
        tot += mpmath.exp(ai) * (ai - bi)
    return tot


def mp_projection_kl_at(z: Any, w: Any, eta: Any, temperature: Any = 1.0, *,
                        dps: int = DEFAULT_DPS) -> tuple[Any, np.ndarray]:
    r""":math:`\mathrm{KL}(\tilde\pi_\eta\|\pi_{old})` and :math:`\log\tilde\pi_\eta` at a given :math:`\eta > 0`.

    Use it to check the constraint at an implementation's own multiplier.

    Parameters
    ----------
    z, w : array_like, shape (V,)
        Logits of :math:`\pi_{new}` and :math:`\pi_{old}`.
    eta : float or mpmath.mpf
        :math:`\eta > 0`.
    temperature : float, optional
    dps : int, optional

    Returns
    -------
    (mpmath.mpf, numpy.ndarray of float64)

    Examples
    --------
    >>> from trmath.testing import mp_projection_kl_at
    >>> kl, lp = mp_projection_kl_at([1.0, 0.0], [0.0, 0.0], 1.0)
    >>> float(kl) < 0.06
    True
    """
    with mpmath.workdps(dps + 20):
        a, b, _ = _rows(z, w, temperature)
        e = mpmath.mpf(eta) if not isinstance(eta, mpmath.mpf) else eta
        if not e > 0:
            raise ValueError(f"eta must be > 0, got {eta!r}")
        lp, kl = _interp(a, b, e)
        return +kl, np.array([float(v) for v in lp])


def mp_project_kl(z: Any, w: Any, epsilon: Any, temperature: Any = 1.0, *,
                  dps: int = DEFAULT_DPS) -> tuple[Any, np.ndarray]:
    r"""Exact multiplier :math:`\eta` and projected log-probabilities of the KL ball.

    Parameters
    ----------
    z, w : array_like, shape (V,)
        Logits of :math:`\pi_{new}` and of the anchor :math:`\pi_{old}`.
    epsilon : float
        Radius :math:`\varepsilon > 0`.
    temperature : float, optional
    dps : int, optional
        Significant digits of :math:`\eta`.

    Returns
    -------
    eta : mpmath.mpf
        0 when :math:`\mathrm{KL}(\pi_{new}\|\pi_{old}) \le \varepsilon`.
    log_probs : numpy.ndarray of float64, shape (V,)

    Raises
    ------
    ValueError
        Invalid rows, or no root (:math:`\pi_{old}` puts mass :math:`\ge 1 - e^{-\varepsilon}`
        outside the support of :math:`\pi_{new}`).

    Examples
    --------
    >>> from trmath.testing import mp_project_kl
    >>> eta, lp = mp_project_kl([0.0, 0.0], [0.0, 1.0], 10.0)  # already inside
    >>> eta, [round(float(x), 6) for x in lp]
    (mpf('0.0'), [-0.693147, -0.693147])
    """
    with mpmath.workdps(dps + 20):
        a, b, _ = _rows(z, w, temperature)
        eps = mpmath.mpf(float(epsilon))
        if not eps > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        k1 = _kl_rows(a, b)
        if k1 <= eps:
            return mpmath.mpf(0), np.array([float(v) for v in a])
        S = [i for i in range(len(a)) if a[i] != mpmath.ninf and b[i] != mpmath.ninf]
        if not S:
            raise ValueError("no common support: the KL ball has no solution")
        lim = -mpmath.log(mpmath.fsum(mpmath.exp(b[i]) for i in S))
        if lim >= eps:
            raise ValueError("infeasible: pi_old puts mass >= 1 - e^-eps outside supp(pi_new)")
        if k1 == mpmath.inf:
            # pi_old = 0 < pi_new somewhere: the limit eta -> 0+ is pi_new restricted to the
            # common support; when it lies in the ball it is the solution.
            lp0, g0 = _interp(a, b, mpmath.mpf(0))
            if g0 <= eps:
                return mpmath.mpf(0), np.array([float(v) for v in lp0])

        def h(u):  # decreasing in u = log(eta)
            return _interp(a, b, mpmath.exp(u))[1] - eps

        lo, hi = mpmath.mpf(-1), mpmath.mpf(1)
        while h(lo) <= 0:
            lo -= 2 * (1 - lo)
        while h(hi) > 0:
            hi += 2 * (1 + hi)
        hlo, hhi = h(lo), h(hi)
        tol = mpmath.mpf(10) ** (-(dps + 5))
        for it in range(2000):
            if hi - lo <= tol * max(1, abs(lo)):
                break
            # secant (regula falsi with bisection every other step keeps the bracket shrinking)
            mid = (lo + hi) / 2 if it % 2 else lo - hlo * (hi - lo) / (hhi - hlo)
            if not lo < mid < hi:
                mid = (lo + hi) / 2
            hm = h(mid)
            if hm > 0:
                lo, hlo = mid, hm
            else:
                hi, hhi = mid, hm
        u = (lo + hi) / 2
        eta = mpmath.exp(u)
        lp, _ = _interp(a, b, eta)
    with mpmath.workdps(dps):
        return +eta, np.array([float(v) for v in lp])


def mp_project_tv(z: Any, w: Any, delta: Any, temperature: Any = 1.0, *,
                  dps: int = DEFAULT_DPS) -> tuple[Any, np.ndarray]:
    r"""Exact :math:`\lambda` and log-probabilities of the TV-ball projection.

    :math:`\lambda = \min(1, \delta/\mathrm{TV}(\pi_{new}, \pi_{old}))`,
    :math:`\tilde\pi = (1-\lambda)\pi_{old} + \lambda\pi_{new}`.

    Examples
    --------
    >>> from trmath.testing import mp_project_tv
    >>> lam, lp = mp_project_tv([0.0, -float("inf")], [-float("inf"), 0.0], 0.25)
    >>> float(lam), [round(float(x), 6) for x in lp]
    (0.25, [-1.386294, -0.287682])
    """
    with mpmath.workdps(dps + 20):
        a, b, _ = _rows(z, w, temperature)
        p = [mpmath.exp(v) for v in a]
        q = [mpmath.exp(v) for v in b]
        tv = mpmath.fsum(abs(x - y) for x, y in zip(p, q)) / 2
        d = mpmath.mpf(float(delta))
        lam = mpmath.mpf(1) if tv <= d else d / tv
        mix = [(1 - lam) * y + lam * x for x, y in zip(p, q)]
        lp = [mpmath.log(m) if m > 0 else mpmath.ninf for m in mix]
        out = np.array([float(v) for v in lp])
    with mpmath.workdps(dps):
        return +lam, out
