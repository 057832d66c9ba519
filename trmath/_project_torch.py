r"""Pure-PyTorch implementation of the trust-region projections (the verified reference).

Everything is computed in float64 over blocks of rows (at most :data:`_CHUNK_ELEMS` elements per
block), with device-agnostic ``torch`` operations, so it serves every device and is the parity
reference of the C++ CPU kernels of :func:`trmath.project_kl`.

KL ball
-------
With :math:`a = \log\pi_{new}`, :math:`b = \log\pi_{old}` (log-softmax of the logits at
temperature :math:`T`), :math:`d = a - b` on the common support
:math:`S = \{i: a_i > -\infty,\ b_i > -\infty\}` and :math:`t = 1/(1+\eta)`:

.. math::

    \log\tilde\pi_i = b_i + t d_i - \Lambda(t), \qquad
    \Lambda(t) = \log\sum_{i\in S} e^{b_i + t d_i}, \qquad
    g(\eta) = \mathrm{KL}(\tilde\pi_\eta\|\pi_{old}) = t\,\mu - \Lambda,

with :math:`\mu = E_{\tilde\pi}[d]`, :math:`\sigma^2 = \mathrm{Var}_{\tilde\pi}[d]` and
:math:`dg/d\eta = -t^3\sigma^2`. The root is found per row by Newton's method on
:math:`h(u) = \log g(e^u) - \log\varepsilon` in :math:`u = \log\eta` (nearly linear in both
limits: :math:`g \approx \sigma_{old}^2/(2\eta^2)` for large :math:`\eta`), safeguarded by a
bracket and bisection.

Error.  :math:`g` is evaluated as a sum of non-negative terms,

.. math::

    g = \sum_{i\in S} \pi_{old,i}\,\varphi(r_i) + \pi_{old}(\bar S), \qquad
    r_i = \log\tilde\pi_i - \log\pi_{old,i}, \qquad \varphi(r) = r e^r - e^r + 1 \ge 0,

(:math:`\varphi` by ``expm1`` for :math:`r \le 1`, as :math:`\tilde\pi_i (r_i - 1) + \pi_{old,i}`
above), which equals :math:`\sum_i\tilde\pi_i r_i` because both rows sum to one. The form is
insensitive to first order to a common error :math:`\delta` in the normalisers (it changes
:math:`g` by :math:`\delta g`, not by :math:`\delta`), and an error :math:`\eta_i` in one
:math:`r_i` moves it by :math:`\tilde\pi_i r_i \eta_i`. With rows of logit spread :math:`L`,
:math:`\log\tilde\pi_i = b_i + t d_i - \Lambda` is rounded at the scale of :math:`L`
(:math:`\eta_i \approx 2^{-52}L`), so the absolute error of :math:`g` is about
:math:`2^{-52}L\,E_{\tilde\pi}|r| \lesssim 2^{-52}L\sqrt{2g}`: relative
:math:`2^{-52}L\sqrt{2/g}`, about :math:`3\cdot 10^{-8}` for :math:`L = 10^4`, :math:`g = 10^{-8}`.
(The direct sum :math:`\sum_i\tilde\pi_i(t d_i - \Lambda)` would carry the absolute error
:math:`2^{-52}L`, i.e. :math:`10^{-4}` relative in that case.)
The root is found to :math:`|g - \varepsilon| \le 10^{-12}\varepsilon` or to the resolution of
float64 in :math:`u`, followed by a last Newton step (error :math:`O(h^2)`). The multiplier's
relative error is that of :math:`g` times the condition number :math:`g/(\eta\,|g'|)`, about
:math:`1/2` for large :math:`\eta` and unbounded as
:math:`\varepsilon \to \mathrm{KL}(\pi_{new}\|\pi_{old})` (:math:`\eta \to 0`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_CHUNK_ELEMS = 1 << 22
_MAX_ITER = 100
_RTOL = 1e-12  # stop when |g - eps| <= _RTOL eps + _ATOL (g in the phi-form has no absolute
_ATOL = 0.0  # rounding floor; see _solve for the other stopping rules)

__all__ = [
    "kl_forward",
    "kl_backward",
    "kl_project",
    "tv_project",
    "row_stats",
]


def _blocks(n: int, v: int):
    step = max(1, _CHUNK_ELEMS // max(v, 1))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _logprobs(z: Tensor, T: float) -> Tensor:
    return torch.log_softmax(z.to(torch.float64) / T, dim=-1)


def row_stats(a: Tensor, b: Tensor, eta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Return ``(log_pt, kl, mu, var, support)`` of the interpolation at ``eta`` (rows ``[n, V]``).

    ``a``, ``b``: float64 log-probabilities; ``eta``: float64 ``[n]``, ``> 0``.
    """
    s = torch.isfinite(a) & torch.isfinite(b)
    d = torch.where(s, a - b, torch.zeros((), dtype=a.dtype, device=a.device))
    t = (1.0 / (1.0 + eta)).unsqueeze(-1)
    u = t * d
    y = torch.where(s, b + u, torch.full((), -math.inf, dtype=a.dtype, device=a.device))
    lam = torch.logsumexp(y, dim=-1, keepdim=True)
    lp = y - lam
    p = torch.exp(lp)
    # KL(pi~ || pi_old) as a sum of non-negative terms (see the module docstring):
    # sum_S pi_old phi(r) + pi_old(outside S), r = log pi~ - log pi_old, phi(r) = r e^r - e^r + 1.
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    r = torch.where(s, lp - b, zero)
    q = torch.where(s, torch.exp(b), zero)
    small = r <= 1.0
    rs = torch.where(small, r, zero)
    phi_q = torch.where(small, q * (rs * torch.exp(rs) - torch.expm1(rs)), p * (r - 1.0) + q)
    out = torch.where(torch.isfinite(b) & ~s, torch.exp(b), zero)
    kl = torch.where(s, phi_q, zero).sum(-1) + out.sum(-1)
    mu = (p * d).sum(-1, keepdim=True)
    var = (p * (d - mu) ** 2).sum(-1)
    return lp, kl, mu.squeeze(-1), var, s


def _solve(a: Tensor, b: Tensor, eps: float, k1: Tensor) -> Tensor:
    """Multiplier ``eta`` per row (0 where ``k1 <= eps``; NaN where infeasible or invalid)."""
    n = a.shape[0]
    eta = torch.zeros(n, dtype=torch.float64, device=a.device)
    active = k1 > eps
    # Infeasible: pi_old puts more than 1 - e^-eps of its mass outside supp(pi_new), so every q in
    # the ball has KL(q || pi_new) = +inf (g(eta) -> -log pi_old(S) >= eps as eta -> inf).
    s = torch.isfinite(a) & torch.isfinite(b)
    lim = -torch.logsumexp(torch.where(s, b, torch.full((), -math.inf, dtype=b.dtype, device=b.device)), -1)
    bad = torch.isnan(k1) | (active & ~(lim < eps))
    eta[bad] = math.nan
    # KL(pi_new || pi_old) = +inf (pi_old = 0 where pi_new > 0): as eta -> 0+ the projection
    # tends to pi_new restricted to the common support; if that is in the ball, eta = 0+.
    rest = active & ~bad & torch.isinf(k1)
    if bool(rest.any()):
        r_idx = torch.nonzero(rest).reshape(-1)
        _, g0, _, _, _ = row_stats(a[r_idx], b[r_idx], torch.zeros(r_idx.numel(), dtype=a.dtype, device=a.device))
        active = active.clone()
        active[r_idx[g0 <= eps]] = False
    idx = torch.nonzero(active & ~bad).reshape(-1)
    if idx.numel() == 0:
        return eta
    aa, bb = a[idx], b[idx]
    log_eps = math.log(eps)
    # Initial guess from g(t) ~ t^2 K1 (exact in the small-difference limit).
    # eta = 1 when K1 = +inf (pi_old has zeros where pi_new has mass).
    kk = k1[idx]
    fin = torch.isfinite(kk)
    ratio = torch.log(torch.where(fin, kk, torch.ones_like(kk))) - log_eps
    u = torch.where(fin, torch.log(torch.expm1(0.5 * ratio).clamp_min(1e-300)), torch.zeros_like(kk))
    lo = torch.full_like(u, -math.inf)  # h(lo) > 0 (g > eps: eta too small)
    hi = torch.full_like(u, math.inf)
    done = torch.zeros_like(u, dtype=torch.bool)
    for _ in range(_MAX_ITER):
        _, g, _, var, _ = row_stats(aa, bb, torch.exp(u))
        h = torch.log(g) - log_eps
        e = torch.exp(u)
        t = 1.0 / (1.0 + e)
        dh = -e * t**3 * var / g  # dh/du < 0
        step = torch.where(dh < 0, -h / dh, torch.zeros_like(h))
        # Stop at the tolerance, at the float64 resolution of the bracket, or when the Newton
        # step is below the resolution of u (g is then at its rounding level: it has no absolute
        # floor, but its relative error can exceed _RTOL for peaked rows and tiny eps).
        ures = 4e-16 * torch.clamp(torch.abs(u), min=1.0)
        conv = ((torch.abs(g - eps) <= _RTOL * eps + _ATOL) | ((hi - lo) <= ures)
                | (torch.isfinite(step) & (dh < 0) & (torch.abs(step) <= ures)))
        # A last Newton step where |h| <= 1e-8: error O(h^2), so that eta carries the rounding
        # error of g rather than the tolerance.
        polish = conv & ~done & (dh < 0) & torch.isfinite(step) & (torch.abs(h) <= 1e-8)
        u = torch.where(polish, u + step, u)
        done = done | conv
        if bool(done.all()):
            break
        lo = torch.where(~done & (h > 0), u, lo)
        hi = torch.where(~done & (h <= 0), u, hi)
        step = step.clamp(-30.0, 30.0)
        cand = u + step
        bis = torch.where(torch.isfinite(lo) & torch.isfinite(hi), 0.5 * (lo + hi), cand)
        inside = (cand > lo) & (cand < hi) & (dh < 0) & torch.isfinite(cand)
        unew = torch.where(inside, cand, torch.where(torch.isfinite(lo) & torch.isfinite(hi), bis,
                                                     torch.where(h > 0, u + 2.0, u - 2.0)))
        u = torch.where(done, u, unew)
    eta[idx] = torch.exp(u)
    return eta


def kl_forward(z: Tensor, w: Tensor, eps: float, T: float) -> tuple[Tensor, Tensor]:
    """Projected log-probabilities (float64, ``[n, V]``) and the multipliers ``eta`` ``[n]``.

    ``z``, ``w``: ``[n, V]`` logits (any float dtype). NaN rows give NaN (validation is upstream).
    """
    from .exact import kl as _kl

    n, v = z.shape
    out = torch.empty((n, v), dtype=torch.float64, device=z.device)
    etas = torch.empty(n, dtype=torch.float64, device=z.device)
    for sl in _blocks(n, v):
        zc = z[sl].to(torch.float64)
        wc = w[sl].to(torch.float64)
        bad = ~(torch.isfinite(zc) | torch.isneginf(zc)).all(-1) | ~(torch.isfinite(wc) | torch.isneginf(wc)).all(-1)
        bad = bad | torch.isneginf(zc).all(-1) | torch.isneginf(wc).all(-1)
        zs = torch.where(bad.unsqueeze(-1), torch.zeros_like(zc), zc)
        ws = torch.where(bad.unsqueeze(-1), torch.zeros_like(wc), wc)
        a, b = _logprobs(zs, T), _logprobs(ws, T)
        k1 = _kl(zs, ws, temperature=T, validate=False).to(torch.float64)
        k1 = torch.where(bad, torch.full_like(k1, math.nan), k1)
        eta = _solve(a, b, eps, k1)
        act = (eta > 0) | ((eta == 0) & torch.isinf(k1))
        lp = a.clone()
        if bool(act.any()):
            lpa, _, _, _, _ = row_stats(a[act], b[act], eta[act])
            lp[act] = lpa
        lp[torch.isnan(eta)] = math.nan
        out[sl] = lp
        etas[sl] = eta
    return out, etas


def kl_backward(g: Tensor, z: Tensor, w: Tensor, eta: Tensor, T: float, need_z: bool = True,
                need_w: bool = True) -> tuple[Tensor | None, Tensor | None]:
    r"""Implicit gradient of the KL projection.

    With :math:`r_k = G_k - \tilde\pi_k\sum_i G_i` on the support and
    :math:`\kappa = \sum_i G_i (d_i - \mu) / (t\sigma^2)` (0 for inactive rows):

    .. math::

        \partial L/\partial z_k = [t r_k - \kappa t^2 \tilde\pi_k (d_k - \mu)]/T, \qquad
        \partial L/\partial w_k = [(1-t) r_k - \kappa(t(1-t)\tilde\pi_k(d_k - \mu)
        - \tilde\pi_k + \pi_{old,k})]/T .
    """
    n, v = z.shape
    dz = torch.empty((n, v), dtype=torch.float64, device=z.device) if need_z else None
    dw = torch.empty((n, v), dtype=torch.float64, device=z.device) if need_w else None
    for sl in _blocks(n, v):
        a, b = _logprobs(z[sl], T), _logprobs(w[sl], T)
        G = g[sl].to(torch.float64)
        e = eta[sl]
        # eta = 0 rows where pi_old = 0 < pi_new somewhere: pi_new restricted to the common
        # support (the active formula with kappa = 0).
        restricted = (e == 0) & (torch.isfinite(a) & torch.isneginf(b)).any(-1)
        act = (e > 0) | restricted
        # Inactive rows: the output is log_softmax(z / T).
        pa = torch.exp(a)
        Gf = torch.where(torch.isfinite(a), G, torch.zeros_like(G))
        gz = (Gf - pa * Gf.sum(-1, keepdim=True)) / T
        gw = torch.zeros_like(gz)
        if bool(act.any()):
            aa, bb, GG = a[act], b[act], G[act]
            lp, _, mu, var, s = row_stats(aa, bb, e[act])
            GG = torch.where(s, GG, torch.zeros_like(GG))
            pt = torch.exp(lp)
            t = (1.0 / (1.0 + e[act])).unsqueeze(-1)
            d = torch.where(s, aa - bb, torch.zeros_like(aa))
            dc = torch.where(s, d - mu.unsqueeze(-1), torch.zeros_like(d))
            r = GG - pt * GG.sum(-1, keepdim=True)
            kappa = ((GG * dc).sum(-1, keepdim=True)) / (t * var.unsqueeze(-1))
            kappa = torch.where(e[act].unsqueeze(-1) > 0, kappa, torch.zeros_like(kappa))
            po = torch.exp(bb)
            gz[act] = (t * r - kappa * t * t * pt * dc) / T
            gw[act] = ((1.0 - t) * r - kappa * (t * (1.0 - t) * pt * dc - pt + po)) / T
        if need_z:
            dz[sl] = gz
        if need_w:
            dw[sl] = gw
    return dz, dw


class _KLProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w, eps, T):
        lp, eta = kl_forward(z, w, eps, T)
        ctx.save_for_backward(z, w, eta)
        ctx.T = T
        ctx.mark_non_differentiable(eta)
        return lp, eta

    @staticmethod
    def backward(ctx, g, geta):
        z, w, eta = ctx.saved_tensors
        nz, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dz, dw = kl_backward(g, z, w, eta, ctx.T, nz, nw)
        return (dz.to(z.dtype) if nz else None), (dw.to(w.dtype) if nw else None), None, None


def kl_project(z: Tensor, w: Tensor, eps: float, T: float) -> tuple[Tensor, Tensor]:
    """Differentiable KL projection of ``[n, V]`` rows; returns (float64 log-probs, eta)."""
    return _KLProject.apply(z, w, eps, T)


def tv_project(z: Tensor, w: Tensor, delta: float, T: float) -> tuple[Tensor, Tensor]:
    """Differentiable TV projection; returns (float64 log-probs ``[..., V]``, lambda ``[...]``)."""
    from .exact import tv as _tv

    z64, w64 = z.to(torch.float64), w.to(torch.float64)
    tv = _tv(z64, w64, temperature=T, validate=False)
    outside = tv > delta
    tv_safe = torch.where(outside, tv, torch.ones_like(tv))
    # lambda = delta / TV with the derivative -lambda / TV formed as such: autograd of the
    # quotient forms -delta / TV^2, and TV^2 underflows for rows whose TV is below 1e-154
    # (point masses on the same token), where the gradient would turn into inf * 0 = NaN.
    tv_d = tv_safe.detach()
    lam0 = delta / tv_d
    lam = torch.where(outside, lam0 - lam0 * ((tv_safe - tv_d) / tv_d), torch.ones_like(tv))
    lam_mix = torch.where(outside, lam, torch.full_like(lam, 0.5)).unsqueeze(-1)
    a, b = _logprobs(z64, T), _logprobs(w64, T)
    # Tokens masked in both rows stay -inf without a 0 * inf in the backward of logaddexp.
    both = torch.isneginf(a) & torch.isneginf(b)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    a_s, b_s = torch.where(both, zero, a), torch.where(both, zero, b)
    mix = torch.logaddexp(torch.log1p(-lam_mix) + b_s, torch.log(lam_mix) + a_s)
    mix = torch.where(both, torch.full((), -math.inf, dtype=a.dtype, device=a.device), mix)
    out = torch.where(outside.unsqueeze(-1), mix, a)
    return out, lam
