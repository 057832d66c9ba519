r"""Private float64 kernels of the coarse-grained divergences (:mod:`trmath.coarse`).

Every function here works on float64 tensors of log-probabilities (any device) and is written so
that no step subtracts two nearly equal rounded quantities. The error argument, step by step
(``eps = 2**-53``, inputs are exact float64 numbers):

* ``d_i = lq_i - lp_i`` has relative error ``<= eps`` (exact by Sterbenz when the two are
  within a factor 2 of each other, which covers every near-identical pair).
* ``p_i - q_i = s * exp(max) * (-expm1(-|lp_i - lq_i|))``: a product of correctly-rounded-ish
  factors, relative error a few eps, never a difference of two probabilities.
* Each KL term ``w * g(d)`` with ``g(d) = expm1(d) - d = sum_{n>=2} d^n/n! >= 0``: for
  ``|d| < 1`` the Taylor series (terms up to ``d^20/20!``, truncation ``< 1e-18`` relative; for
  ``d < 0`` the alternating partial sums lose at most a factor ``1/(2 g(-1)) < 1.4``), otherwise
  ``w e^d - w (1 + d)`` whose two parts differ by at least a factor ``e/2`` (cancellation
  ``<= 3.8x``). Relative error ``<= ~10 eps`` per term; a sum of non-negative terms keeps it.
* Tail masses ``R = -expm1(LSE)`` with ``LSE`` the (relatively accurate) log of the kept mass:
  ``R`` has the relative error of ``LSE``, never ``1 - sum``.
* Tail log-ratio ``d_R = log(R_q / R_p)`` as ``log1p(c / R_p)`` with ``c = R_q - R_p`` when
  ``|c / R_p| <= 1/2`` (no cancellation inside log1p), else ``log(R_q / R_p)`` of the two
  accurate masses (absolute error ``~3 eps``, ``|d_R| >= log(3/2)`` there, so relative
  ``<= 8 eps``).
* Tail masses below 1/2 are recomputed in double-double (:func:`dd_tail_mass`):
  ``R = -expm1(l_max) - sum_{others} p_i`` with absolute error ``~2^-98`` of the terms, used
  where that is below ``2^-53 R`` (the log-sum-exp loses relative accuracy as the kept mass
  approaches 1).
* ``c = R_q - R_p`` is taken from whichever estimate has the smallest error bound:
  ``sum_S (p_i - q_i)`` (``~4 eps * sum |p_i - q_i|``), ``e^{A} - e^{B}`` of the two log kept
  masses (``~4 eps (|A| + |B|)``), or the difference of the double-double tails. Rows where the
  float64 bound could move the KL by more than ``2^-50`` of its value (the kept tokens trade
  mass while the tail barely moves) recompute ``sum_S (p_i - q_i)`` in double-double
  (:func:`dd_kept_difference`, absolute error ``~2^-100``). For the binary case ``c`` is the
  exact-to-a-few-eps ``p - q``. See ``docs/theory/coarse.rst``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

# 1/n! for n = 2..20: g(d) = expm1(d) - d = d^2 * sum_{n>=2} d^(n-2)/n!  (|d| < 1)
_G_COEF = [1.0 / math.factorial(n) for n in range(2, 21)]
INF = math.inf
_EPS = 2.0**-53


def g_series(d: Tensor) -> Tensor:
    """``expm1(d) - d`` for ``|d| < 1`` (Horner on the Taylor series, no cancellation)."""
    acc = torch.full_like(d, _G_COEF[-1])
    for c in reversed(_G_COEF[:-1]):
        acc = acc * d + c
    return acc * d * d


def weighted_g(w: Tensor, w_other: Tensor, d: Tensor) -> Tensor:
    r"""``w * (expm1(d) - d)`` with ``w_other = w * e^d``, for finite ``d`` and ``w >= 0``.

    Small ``|d|``: ``w * series(d)``. Otherwise ``w_other - w (1 + d)`` (positive: ``e^d >= 1 + d``
    with a ratio ``>= e/2`` for ``|d| >= 1``). Never negative.
    """
    small = d.abs() < 1.0
    ds = torch.where(small, d, torch.zeros_like(d))
    out = torch.where(small, w * g_series(ds), w_other - w * (1.0 + d))
    return out.clamp_min(0.0)


def prob_diff(lp: Tensor, lq: Tensor) -> Tensor:
    """``exp(lp) - exp(lq)`` to a few ulps relative, for ``lp, lq <= 0`` (``-inf`` allowed)."""
    both_zero = torch.isneginf(lp) & torch.isneginf(lq)
    m = torch.maximum(lp, lq)
    ad = torch.where(both_zero, torch.zeros_like(lp), (lp - lq).abs())
    s = torch.sign(lp - lq).nan_to_num(0.0)
    out = s * torch.exp(m) * (-torch.expm1(-ad))
    return torch.where(both_zero, torch.zeros_like(out), out)


# ------------------------------------------------------------------------------------------------
# double-double (unevaluated sums hi + lo, ~106 bits) for the Top-K tail difference
# ------------------------------------------------------------------------------------------------
def _two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _quick_two_sum(a, b):
    s = a + b
    return s, b - (s - a)


def _split(a: Tensor) -> tuple[Tensor, Tensor]:
    c = 134217729.0 * a  # 2^27 + 1 (Veltkamp); |a| <= 2 wherever this is used
    hi = c - (c - a)
    return hi, a - hi


def _two_prod_split(a: Tensor, b: Tensor, bh: Tensor, bl: Tensor) -> tuple[Tensor, Tensor]:
    """``a * b`` exactly as ``p + e`` (Dekker, no FMA needed), with ``b = bh + bl`` pre-split."""
    p = a * b
    ah, al = _split(a)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _dd_add(ah, al, bh, bl):
    """Accurate double-double sum (relative error ~2^-104 even under cancellation)."""
    s, e = _two_sum(ah, bh)
    t, f = _two_sum(al, bl)
    s, e = _quick_two_sum(s, e + t)
    return _quick_two_sum(s, e + f)


def _dd_add_const(ah: Tensor, al: Tensor, ch: float, cl: float) -> tuple[Tensor, Tensor]:
    """``(ah + al) + (ch + cl)`` for sums without cancellation (Horner on a convergent series)."""
    s, e = _two_sum(ah, ch)
    return _quick_two_sum(s, e + (al + cl))


def _dd_mul(ah: Tensor, al: Tensor, bh: Tensor, bl: Tensor) -> tuple[Tensor, Tensor]:
    sh, sl = _split(bh)
    p, e = _two_prod_split(ah, bh, sh, sl)
    return _quick_two_sum(p, e + (ah * bl + al * bh))


def _dd_const(num: int, den: int) -> tuple[float, float]:
    from fractions import Fraction

    x = Fraction(num, den)
    hi = float(x)
    return hi, float(x - Fraction(hi))


# ln 2 = _LN2[0] + _LN2[1] to ~1e-33; 1/n! as double-doubles for the Taylor series of exp
_LN2 = (0.6931471805599453, 2.3190468138462996e-17)
_INV_FACT = [_dd_const(1, math.factorial(n)) for n in range(28)]
_SQUARINGS = 5  # exp(r) = exp(r / 32)^32: |r/32| <= 0.011, 13 Taylor terms reach 2^-110


def _horner_d(x: Tensor, coefs: list[tuple[float, float]]) -> tuple[Tensor, Tensor]:
    """``sum_n coefs[n] x^n`` in double-double for a double ``x`` (Horner, ``x`` split once)."""
    xh, xl = _split(x)
    h = torch.full_like(x, coefs[-1][0])
    lo = torch.full_like(x, coefs[-1][1])
    for ch, cl in reversed(coefs[:-1]):
        p, e = _two_prod_split(h, x, xh, xl)
        h, lo = _quick_two_sum(p, e + lo * x)
        h, lo = _dd_add_const(h, lo, ch, cl)
    return h, lo


def _terms(x: Tensor, first: int) -> int:
    """Number of Taylor terms after which ``max|x|^n / n!`` is below ``2^-110``."""
    m = float(x.abs().max()) if x.numel() else 0.0
    if m == 0.0:
        return first + 1
    n, t = first, 1.0
    while n < len(_INV_FACT) - 1:
        n += 1
        t = m**n / math.factorial(n)
        if t < 2.0**-110:
            break
    return n


def dd_exp(x: Tensor) -> tuple[Tensor, Tensor]:
    r"""``exp(x)`` of float64 ``x <= 0`` as a double-double, relative error ``~1e-30``.

    ``x = k ln 2 + r`` with ``|r| <= ln(2)/2``: ``k * ln2_hi`` is exact (Dekker product), the
    subtraction ``x - k ln2_hi`` is exact (Sterbenz), ``r = r_h + r_l`` in double-double, and
    ``exp(r) = exp(r_h / 32)^32 (1 + r_l)`` with the Taylor series of ``exp(r_h/32)`` to
    ``2^-110`` (Horner in double-double, then five double-double squarings); the result is
    scaled by ``2^k`` exactly. ``-inf`` gives 0. When ``exp(x) < ~1e-292`` the low part is
    subnormal: the absolute error stays below ``1e-320``.
    """
    ninf = torch.isneginf(x)
    xs = torch.where(ninf, torch.zeros_like(x), x)
    k = torch.round(xs / _LN2[0])
    c = torch.full_like(k, _LN2[0])
    ch, cl = _split(c)
    kh, kl = _two_prod_split(k, c, ch, cl)
    kl = kl + k * _LN2[1]
    rh, rl = _two_sum(xs - kh, -kl)
    y = rh * 2.0**-_SQUARINGS  # exact
    h, lo = _horner_d(y, _INV_FACT[: _terms(y, 1) + 1])
    for _ in range(_SQUARINGS):
        h, lo = _dd_mul(h, lo, h, lo)
    h, lo = _quick_two_sum(h, lo + h * rl)  # * (1 + r_l), |r_l| < 2^-50: r_l^2 is negligible
    ki = k.to(torch.int32)
    hi, lo = torch.ldexp(h, ki), torch.ldexp(lo, ki)
    zero = torch.zeros_like(hi)
    return torch.where(ninf, zero, hi), torch.where(ninf, zero, lo)


_INV_FACT1 = [_dd_const(1, math.factorial(n + 1)) for n in range(27)]  # 1/(n+1)!


def dd_expm1(x: Tensor) -> tuple[Tensor, Tensor]:
    """``expm1(x)`` of float64 ``x <= 0`` as a double-double (``-inf`` gives ``-1``).

    ``|x| <= 0.34``: ``x * sum_n x^n/(n+1)!`` (no leading 1, so no cancellation for tiny
    ``x``; as many terms as the largest ``|x|`` needs); otherwise ``exp(x) - 1`` in
    double-double, which loses at most 2 bits there.
    """
    small = x.abs() <= 0.34
    zero = torch.zeros_like(x)
    xs = torch.where(small, x, zero)
    n = max(_terms(xs, 1), 1)
    sh, sl = _horner_d(xs, _INV_FACT1[:n])
    xh, xl = _split(xs)
    p, e = _two_prod_split(sh, xs, xh, xl)
    sh, sl = _quick_two_sum(p, e + sl * xs)
    if bool(small.all()):
        return sh, sl
    eh, el = dd_exp(torch.where(small, zero, x))
    bh, bl = _dd_add(eh, el, torch.full_like(x, -1.0), zero)
    return torch.where(small, sh, bh), torch.where(small, sl, bl)


def _dd_sum_last(h: Tensor, lo: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise double-double sum over the last axis."""
    while h.shape[-1] > 1:
        if h.shape[-1] % 2:
            h = torch.cat([h, torch.zeros_like(h[..., :1])], -1)
            lo = torch.cat([lo, torch.zeros_like(lo[..., :1])], -1)
        h, lo = _dd_add(h[..., 0::2], lo[..., 0::2], h[..., 1::2], lo[..., 1::2])
    return h[..., 0], lo[..., 0]


def dd_kept_difference(lp: Tensor, lq: Tensor) -> Tensor:
    r"""``c = sum_S (p_i - q_i)`` with absolute error ``~1e-31 * sum_S (p_i + q_i)``.

    Each probability is a double-double (:func:`dd_exp`); the differences and their sum are
    accumulated in double-double (pairwise over ``K``), so no cancellation among the terms
    costs more than the ~106-bit working precision.
    """
    h, lo = dd_exp(torch.cat([lp, lq], 0))
    n = lp.shape[0]
    dh, dl = _dd_add(h[:n], lo[:n], -h[n:], -lo[n:])
    sh, sl = _dd_sum_last(dh, dl)
    return sh + sl


def dd_tail_mass(lp: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``R = 1 - sum_S p_i`` in double-double, and whether it is resolved to ``~1e-16`` relative.

    ``R = -expm1(l_max) - sum_{i != max} p_i``: the largest probability enters through
    ``expm1`` (so ``1 - p_max`` keeps its relative accuracy next to 1), the rest as
    double-double probabilities. The absolute error is ``~2^-98 (1 - p_max + sum_others)``;
    the value is trusted where that is below ``2^-53 R`` (no deep cancellation between
    ``1 - p_max`` and the other kept probabilities). Returns ``(hi, lo, ok, error bound)``.
    """
    amax = lp.argmax(-1, keepdim=True)
    m = torch.gather(lp, -1, amax)[..., 0]
    others = lp.scatter(-1, amax, float("-inf"))
    oh, ol = dd_exp(others)
    sh, sl = _dd_sum_last(oh, ol)
    eh, el = dd_expm1(m)  # -(1 - p_max)
    rh, rl = _dd_add(-eh, -el, -sh, -sl)
    err = 2.0**-98 * (-eh + sh)
    ok = (rh > 0) & (err <= 2.0**-53 * rh)
    return rh, rl, ok, err

class Parts:
    """Forward quantities of one batch of kept sets, shared by the values and the gradients."""

    def __init__(self, lp: Tensor, lq: Tensor, A: Tensor | None = None, B: Tensor | None = None,
                 refine: bool = True, dd: bool = True):
        # lp, lq: [..., K] float64 (clamped to <= 0); A, B: log kept masses [...] (<= 0).
        # refine: the double-double refinements of the tails (KL needs them; TV, which uses
        # |R_q - R_p| only beside sum |p_i - q_i| >= |R_q - R_p|, is within 8 eps without them).
        # dd=False skips every double-double step: for 16/32-bit inputs the plain float64 error
        # (at most ~1e-12 relative on the adversarial families, measured) is 1e7 times below the
        # 1e-5 target, and the double-double passes cost ~100x the float64 evaluation.
        self.lp, self.lq = lp, lq
        self.p, self.q = torch.exp(lp), torch.exp(lq)
        self.delta = prob_diff(lp, lq)  # p_i - q_i
        self.S1 = self.delta.abs().sum(-1)
        binary = A is None
        if binary:  # K = 1: the kept mass is the single probability, c is exact to a few eps
            A, B = lp[..., 0], lq[..., 0]
            c = self.delta[..., 0]
        else:
            cA = self.delta.sum(-1)
            cB = prob_diff(A, B)  # e^A - e^B = R_q - R_p
            # choose the formula with the smaller rounding bound (see the module docstring)
            errA, errB = self.S1, A.abs() + B.abs()
            c = torch.where(errA <= errB, cA, cB)
            self.refined = torch.zeros_like(c, dtype=torch.bool)
            if refine and dd:
                c = self._refine(c, torch.minimum(errA, errB), lp, lq, A, B)
            # absolute error bound of c so far: 4 eps * min(errA, errB), or ~2^-100 * mass if refined
            self.c_err = torch.where(self.refined, torch.full_like(c, 2.0**-99),
                                     4 * _EPS * torch.minimum(errA, errB))
        self.Rp = -torch.expm1(A)
        self.Rq = -torch.expm1(B)
        if not binary and refine and dd:
            c = self._dd_tails(c, lp, lq)
        self.A, self.B, self.c = A, B, c
        Rp, Rq = self.Rp, self.Rq
        pos_p, pos_q = Rp > 0, Rq > 0
        safe_Rp = torch.where(pos_p, Rp, torch.ones_like(Rp))
        u = c / safe_Rp
        near = u.abs() <= 0.5
        dR_near = torch.log1p(torch.where(near, u, torch.zeros_like(u)))
        # log of the ratio where it is a normal number; else (a subnormal tail, or a ratio beyond
        # the float64 range: tails of 5e-324 next to 0.6) the difference of the logs, whose
        # absolute error ~eps (|log R_q| + |log R_p|) is ~1e-16 relative to |d_R| >= 700 there
        ratio = Rq / safe_Rp
        normal = (ratio >= torch.finfo(ratio.dtype).tiny) & (ratio < INF)
        logs = torch.log(Rq) - torch.log(safe_Rp)
        dR_far = torch.where(normal, torch.log(torch.where(normal, ratio, torch.ones_like(ratio))), logs)
        dR = torch.where(near, dR_near, dR_far)
        # conventions: both tails empty -> 0; only R_p empty -> +inf; only R_q empty -> -inf
        dR = torch.where(pos_p, dR, torch.where(pos_q, torch.full_like(dR, INF), torch.zeros_like(dR)))
        dR = torch.where(pos_p & ~pos_q, torch.full_like(dR, -INF), dR)
        self.dR = dR

    def _refine(self, c: Tensor, err: Tensor, lp: Tensor, lq: Tensor, A: Tensor, B: Tensor) -> Tensor:
        r"""Recompute ``c = R_q - R_p`` in double-double on the rows that need it.

        The float64 ``c`` has absolute error ``~4 eps * err``; the tail term
        ``R_p g(d_R)`` moves by ``(c / R_q) dc`` per ``dc``. A row is refined when that could
        exceed ``2^-50`` of its KL (estimated by the kept terms plus ``c^2 / (2 max(R_p, R_q))``,
        both lower bounds of KL). Typical rows never qualify; the adversarial ones (kept tokens
        trade mass while the tail barely moves, tiny tails) do.
        """
        Rp, Rq = -torch.expm1(A), -torch.expm1(B)
        fp, fq = ~torch.isneginf(lp), ~torch.isneginf(lq)
        both = fp & fq
        d = torch.where(both, lq - lp, torch.zeros_like(lp))
        kept = torch.where(both, weighted_g(self.p, self.q, d), torch.zeros_like(lp)).sum(-1)
        Rmax = torch.maximum(Rp, Rq)
        kl_lb = kept + c * c / (2 * torch.where(Rmax > 0, Rmax, torch.ones_like(Rmax)))
        sens = c.abs() / torch.where(Rq > 0, Rq, torch.ones_like(Rq))
        need = (sens * 4 * _EPS * err > 2.0**-50 * kl_lb) & (Rp > 0) & (Rq > 0) & torch.isfinite(kl_lb)
        self.refined = need
        if not bool(need.any()):
            return c
        idx = need.nonzero(as_tuple=True)
        c_dd = dd_kept_difference(lp[idx], lq[idx])
        out = c.clone()
        out[idx] = c_dd
        return out

    def _dd_tails(self, c: Tensor, lp: Tensor, lq: Tensor) -> Tensor:
        r"""Tail masses below 1/2 from :func:`dd_tail_mass` where it resolves them.

        ``R = -expm1(lse)`` carries the relative error of the log kept mass, which grows as the
        kept mass approaches 1; the double-double sum does not, unless the kept probabilities
        other than the largest nearly fill ``1 - p_max`` (then the lse-based value is kept).
        Where both tails are resolved, ``c = R_q - R_p`` is their double-double difference.
        """
        need = (self.Rp < 0.5) | (self.Rq < 0.5)
        if not bool(need.any()):
            return c
        idx = need.nonzero(as_tuple=True)
        n = int(idx[0].numel())
        th, tl, ok, err = dd_tail_mass(torch.cat([lp[idx], lq[idx]], 0))  # both sides in one pass
        ph, pl, okp, qh, ql, okq = th[:n], tl[:n], ok[:n], th[n:], tl[n:], ok[n:]
        Rp, Rq, c = self.Rp.clone(), self.Rq.clone(), c.clone()
        Rp[idx] = torch.where(okp, ph + pl, Rp[idx])
        Rq[idx] = torch.where(okq, qh + ql, Rq[idx])
        ch, cl = _dd_add(qh, ql, -ph, -pl)
        # the difference of the two tails replaces c where its error bound is the smaller one
        better = okp & okq & (err[:n] + err[n:] < self.c_err[idx])
        c[idx] = torch.where(better, ch + cl, c[idx])
        self.Rp, self.Rq = Rp, Rq
        return c

    # -- values ---------------------------------------------------------------------------------
    def kl(self) -> Tensor:
        lp, lq, p, q = self.lp, self.lq, self.p, self.q
        fp, fq = ~torch.isneginf(lp), ~torch.isneginf(lq)
        both = fp & fq
        d = torch.where(both, lq - lp, torch.zeros_like(lp))
        kept = weighted_g(p, q, d)
        # p_i = 0 < q_i: the term p_i g(d_i) = q_i - p_i - p_i d_i tends to q_i (not 0)
        kept = torch.where(both, kept, torch.where(fp, torch.full_like(kept, INF), q))
        Rp, Rq, dR = self.Rp, self.Rq, self.dR
        fin = torch.isfinite(dR)
        tail = weighted_g(Rp, Rq, torch.where(fin, dR, torch.zeros_like(dR)))
        tail = torch.where(Rp > 0, torch.where(Rq > 0, tail, torch.full_like(tail, INF)), Rq)
        return kept.sum(-1) + tail

    def tv(self) -> Tensor:
        return (0.5 * (self.S1 + self.c.abs())).clamp(0.0, 1.0)

    def binary_tv(self) -> Tensor:
        return self.delta[..., 0].abs().clamp(0.0, 1.0)

    # -- gradients ------------------------------------------------------------------------------
    def kl_grads(self) -> tuple[Tensor, Tensor]:
        r"""``dKL/dlp_i = p_i (d_R - d_i)``, ``dKL/dlq_i = (q_i - p_i) + q_i expm1(-d_R)``."""
        lp, lq, p, q = self.lp, self.lq, self.p, self.q
        fp = ~torch.isneginf(lp)
        both = fp & ~torch.isneginf(lq)
        d = torch.where(both, lq - lp, torch.where(fp, torch.full_like(lp, -INF), torch.zeros_like(lp)))
        dR = self.dR.unsqueeze(-1)
        gp = torch.where(fp, p * (dR - d), torch.zeros_like(p))
        em = torch.expm1(-dR)
        gq = -self.delta + torch.where(q > 0, q * em, torch.zeros_like(q))
        return gp, gq

    def tv_grads(self) -> tuple[Tensor, Tensor]:
        r"""``dTV/dlp_i = p_i (s_i - s_R) / 2``, ``dTV/dlq_i = -q_i (s_i - s_R) / 2`` (subgradient)."""
        s = torch.sign(self.delta)
        sR = torch.sign(-self.c).unsqueeze(-1)  # sign(R_p - R_q)
        return 0.5 * self.p * (s - sR), -0.5 * self.q * (s - sR)


def log_kept_mass(lp: Tensor) -> Tensor:
    """``log sum_S exp(lp_i)`` in float64 (the exact module's fused, relatively accurate lse)."""
    from .exact import logsumexp

    # (unconditionally: a data-dependent branch would break a torch.compile graph)
    allneg = torch.isneginf(lp).all(-1)
    safe = torch.where(allneg.unsqueeze(-1), torch.zeros_like(lp), lp)
    out = logsumexp(safe, validate=False)
    return torch.where(allneg, torch.full_like(out, -INF), out)


class _Coarse(torch.autograd.Function):
    """Value and analytic gradient of one coarse divergence on float64 ``[..., K]`` inputs."""

    @staticmethod
    def forward(ctx, lp: Tensor, lq: Tensor, kind: str, dd: bool, A: Tensor | None,
                B: Tensor | None) -> Tensor:  # type: ignore[override]
        binary = kind.startswith("binary")
        if binary:
            parts = Parts(lp, lq)
        else:
            A = log_kept_mass(lp) if A is None else A
            B = log_kept_mass(lq) if B is None else B
            parts = Parts(lp, lq, A.clamp_max(0.0), B.clamp_max(0.0), refine=kind.endswith("kl"), dd=dd)
        out = parts.binary_tv() if kind == "binary_tv" else (parts.tv() if kind.endswith("tv") else parts.kl())
        ctx.parts = parts
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        parts: Parts = ctx.parts
        gp, gq = parts.tv_grads() if ctx.kind.endswith("tv") else parts.kl_grads()
        gg = g.unsqueeze(-1)
        return gg * gp, gg * gq, None, None, None, None


def coarse(lp: Tensor, lq: Tensor, kind: str, dd: bool = True, A: Tensor | None = None,
           B: Tensor | None = None) -> Tensor:
    """Differentiable coarse divergence ``kind`` of float64 ``[..., K]`` log-probabilities.

    ``dd=False`` (16/32-bit inputs) skips the double-double refinements (see :class:`Parts`).
    """
    lead, K = lp.shape[:-1], lp.shape[-1]
    if A is not None:
        A, B = A.detach().reshape(-1), B.detach().reshape(-1)
    return _Coarse.apply(lp.reshape(-1, K), lq.reshape(-1, K), kind, dd, A, B).reshape(lead)


# ------------------------------------------------------------------------------------------------
# the binary divergences as one operator: the C++ element kernel on CPU, the formulas above elsewhere
# ------------------------------------------------------------------------------------------------
def _torch_binary_parts(lp: Tensor, lq: Tensor, tol_p: float, tol_q: float):
    """Sanitised float64 inputs (bad entries 0, rounding above 0 clamped), the bad mask, the
    clamp masks and the forward quantities of the binary kept set."""
    f64 = torch.float64
    xs, masks = [], []
    for t, tol in ((lp, tol_p), (lq, tol_q)):
        x = t.to(f64)
        bad = torch.isnan(x) | (x > tol)
        xs.append(torch.where(bad, torch.zeros_like(x), x).clamp_max(0.0))
        masks.append((bad, x > 0))
    bad = masks[0][0] | masks[1][0]
    return Parts(xs[0].unsqueeze(-1), xs[1].unsqueeze(-1)), bad, masks[0][1], masks[1][1]


def binary_fwd_impl(lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float,
                    value64: bool) -> tuple[Tensor, bool]:
    """binary_tv (``kind`` 0) or binary_kl (1) of log-probabilities of one dtype and shape, NaN
    where an entry is bad (NaN or above its tolerance; values in ``(0, tol]`` count as 0), float64
    if ``value64`` else float32; and whether an entry was bad (on other devices: always True,
    so the caller's validation looks)."""
    from . import _ops

    if _ops.use_cpp(lp):
        return _ops._cpp().binary_coarse(lp.contiguous(), lq.contiguous(), kind, tol_p, tol_q, value64)
    parts, bad, _, _ = _torch_binary_parts(lp, lq, tol_p, tol_q)
    out = parts.binary_tv() if kind == 0 else parts.kl()
    out = torch.where(bad, torch.full_like(out, math.nan), out)
    return (out if value64 else out.to(torch.float32)), True


def binary_bwd_impl(g: Tensor, lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float,
                    need_p: bool, need_q: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    from . import _ops

    if _ops.use_cpp(lp):
        return _ops._cpp().binary_coarse_backward(g, lp.contiguous(), lq.contiguous(), kind, tol_p, tol_q,
                                                  need_p, need_q)
    parts, bad, cp, cq = _torch_binary_parts(lp, lq, tol_p, tol_q)
    gp, gq = parts.tv_grads() if kind == 0 else parts.kl_grads()
    gd = g.to(torch.float64)
    outs = []
    for gx, clamp, t, want in ((gp[..., 0], cp, lp, need_p), (gq[..., 0], cq, lq, need_q)):
        if not want:
            outs.append(None)
            continue
        x = torch.where(clamp, torch.zeros_like(gd), gd * gx)
        outs.append(torch.where(bad, torch.full_like(x, math.nan), x).to(t.dtype))
    return outs[0], outs[1]


@torch.library.custom_op("trmath::binary_fwd", mutates_args=())
def binary_fwd(lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float,
               value64: bool) -> tuple[Tensor, Tensor]:
    val, bad = binary_fwd_impl(lp, lq, kind, tol_p, tol_q, value64)
    return val, torch.tensor([int(bad)], dtype=torch.int32)


@binary_fwd.register_fake
def _(lp, lq, kind, tol_p, tol_q, value64):
    return (lp.new_empty(lp.shape, dtype=torch.float64 if value64 else torch.float32),
            torch.empty((1,), dtype=torch.int32))


@torch.library.custom_op("trmath::binary_bwd", mutates_args=())
def binary_bwd(g: Tensor, lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float, need_p: bool,
               need_q: bool) -> tuple[Tensor, Tensor]:
    gp, gq = binary_bwd_impl(g, lp, lq, kind, tol_p, tol_q, need_p, need_q)
    return (gp if gp is not None else lp.new_empty(0)), (gq if gq is not None else lq.new_empty(0))


@binary_bwd.register_fake
def _(g, lp, lq, kind, tol_p, tol_q, need_p, need_q):
    return (torch.empty_like(lp, memory_format=torch.contiguous_format) if need_p else lp.new_empty(0),
            torch.empty_like(lq, memory_format=torch.contiguous_format) if need_q else lq.new_empty(0))


def _binary_setup(ctx, inputs, output):
    lp, lq, kind, tol_p, tol_q, value64 = inputs
    ctx.save_for_backward(lp, lq)
    ctx.args = (kind, tol_p, tol_q)


def _binary_backward(ctx, g, gflag):
    lp, lq = ctx.saved_tensors
    np_, nq = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (np_ or nq):
        return (None,) * 6
    gp, gq = binary_bwd(g, lp, lq, *ctx.args, np_, nq)
    return (gp if np_ else None), (gq if nq else None), None, None, None, None


binary_fwd.register_autograd(_binary_backward, setup_context=_binary_setup)


def binary(lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float, value64: bool) -> tuple[Tensor, bool]:
    """The binary divergence with autograd (the gradient recomputed from the inputs in the
    backward: nothing else is kept); the direct body when no gradient is wanted and nothing
    traces. Returns the value and whether an entry was bad (see :func:`binary_fwd_impl`)."""
    from . import _ops

    if lp.dtype != lq.dtype:  # both exact in float64
        lp, lq = lp.to(torch.float64), lq.to(torch.float64)
    if _ops.direct_call(lp, lq):
        return binary_fwd_impl(lp, lq, kind, tol_p, tol_q, value64)
    val, flag = binary_fwd(lp, lq, kind, tol_p, tol_q, value64)
    return val, bool(flag[0])


# ------------------------------------------------------------------------------------------------
# Top-K of 16/32-bit log-probabilities as one operator (the C++ kernel on CPU; the formulas above,
# without the double-double refinements that only float64 inputs need, elsewhere)
# ------------------------------------------------------------------------------------------------
def _torch_topk_parts(lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float):
    """Sanitised float64 rows, the entry masks (bad, clamped), the bad rows and the forward
    quantities (``Parts`` with ``dd=False``)."""
    f64 = torch.float64
    K = lp.shape[-1]
    xs, bads, clamps, over = [], [], [], []
    for t, tol in ((lp, tol_p), (lq, tol_q)):
        x = t.to(f64)
        bad = torch.isnan(x) | (x > tol)
        s = torch.where(bad, torch.zeros_like(x), x).clamp_max(0.0)
        A = log_kept_mass(s)
        xs.append(s)
        bads.append(bad)
        clamps.append(x > 0)
        over.append(A)
    grow = 1.0 + math.log(max(K, 1))  # the kept-mass tolerance: tol (1 + ln K) (coarse._mass_tol)
    rowbad = bads[0].any(-1) | bads[1].any(-1) | (over[0] > tol_p * grow) | (over[1] > tol_q * grow)
    parts = Parts(xs[0], xs[1], over[0].clamp_max(0.0), over[1].clamp_max(0.0), refine=kind == 1, dd=False)
    return parts, bads, clamps, rowbad


def topk_fwd_impl(lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float) -> tuple[Tensor, bool]:
    """topk_tv (``kind`` 0) or topk_kl (1) of ``[rows, K]`` 16/32-bit log-probabilities of one
    dtype: float32 ``[rows]``, NaN for a bad row; and whether a row was bad (on other devices:
    always True, so the caller's validation looks)."""
    from . import _ops

    if _ops.use_cpp(lp):
        return _ops._cpp().topk_coarse(lp.contiguous(), lq.contiguous(), kind, tol_p, tol_q)
    parts, _, _, rowbad = _torch_topk_parts(lp, lq, kind, tol_p, tol_q)
    out = parts.tv() if kind == 0 else parts.kl()
    return torch.where(rowbad, torch.full_like(out, math.nan), out).to(torch.float32), True


def topk_bwd_impl(g: Tensor, lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float,
                  need_p: bool, need_q: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    from . import _ops

    if _ops.use_cpp(lp):
        return _ops._cpp().topk_coarse_backward(g, lp.contiguous(), lq.contiguous(), kind, tol_p, tol_q,
                                                need_p, need_q)
    parts, bads, clamps, rowbad = _torch_topk_parts(lp, lq, kind, tol_p, tol_q)
    gp, gq = parts.tv_grads() if kind == 0 else parts.kl_grads()
    gd = g.to(torch.float64).unsqueeze(-1)
    nan = torch.full_like(gp, math.nan)
    outs = []
    for gx, bad, clamp, t, want in ((gp, bads[0], clamps[0], lp, need_p), (gq, bads[1], clamps[1], lq, need_q)):
        if not want:
            outs.append(None)
            continue
        x = torch.where(rowbad.unsqueeze(-1), nan, gd * gx)
        x = torch.where(bad, nan, torch.where(clamp, torch.zeros_like(x), x))
        outs.append(x.to(t.dtype))
    return outs[0], outs[1]


@torch.library.custom_op("trmath::topk_fwd", mutates_args=())
def topk_fwd(lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float) -> tuple[Tensor, Tensor]:
    val, bad = topk_fwd_impl(lp, lq, kind, tol_p, tol_q)
    return val, torch.tensor([int(bad)], dtype=torch.int32)


@topk_fwd.register_fake
def _(lp, lq, kind, tol_p, tol_q):
    return lp.new_empty(lp.shape[:1], dtype=torch.float32), torch.empty((1,), dtype=torch.int32)


@torch.library.custom_op("trmath::topk_bwd", mutates_args=())
def topk_bwd(g: Tensor, lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float, need_p: bool,
             need_q: bool) -> tuple[Tensor, Tensor]:
    gp, gq = topk_bwd_impl(g, lp, lq, kind, tol_p, tol_q, need_p, need_q)
    return (gp if gp is not None else lp.new_empty(0)), (gq if gq is not None else lq.new_empty(0))


@topk_bwd.register_fake
def _(g, lp, lq, kind, tol_p, tol_q, need_p, need_q):
    return (torch.empty_like(lp, memory_format=torch.contiguous_format) if need_p else lp.new_empty(0),
            torch.empty_like(lq, memory_format=torch.contiguous_format) if need_q else lq.new_empty(0))


def _topk_setup(ctx, inputs, output):
    lp, lq, kind, tol_p, tol_q = inputs
    ctx.save_for_backward(lp, lq)
    ctx.args = (kind, tol_p, tol_q)


def _topk_backward(ctx, g, gflag):
    lp, lq = ctx.saved_tensors
    np_, nq = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (np_ or nq):
        return (None,) * 5
    gp, gq = topk_bwd(g, lp, lq, *ctx.args, np_, nq)
    return (gp if np_ else None), (gq if nq else None), None, None, None


topk_fwd.register_autograd(_topk_backward, setup_context=_topk_setup)


def topk(lp: Tensor, lq: Tensor, kind: int, tol_p: float, tol_q: float) -> tuple[Tensor, bool]:
    """The Top-K divergence of ``[..., K]`` 16/32-bit log-probabilities with autograd (gradients
    recomputed from the inputs); ``[...]`` float32 and whether a row was bad."""
    from . import _ops

    if lp.dtype != lq.dtype:  # both exact in float32
        lp, lq = lp.to(torch.float32), lq.to(torch.float32)
    lead, K = lp.shape[:-1], lp.shape[-1]
    lp2, lq2 = lp.reshape(-1, K), lq.reshape(-1, K)
    if _ops.direct_call(lp2, lq2):
        val, bad = topk_fwd_impl(lp2, lq2, kind, tol_p, tol_q)
    else:
        val, flag = topk_fwd(lp2, lq2, kind, tol_p, tol_q)
        bad = bool(flag[0])
    return val.reshape(lead), bad
