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
        bad = torch.isnan(e)  # an invalid row (validate=False): NaN gradients for both inputs
        gz[bad] = math.nan
        gw[bad] = math.nan
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


def _tv_mix(a: Tensor, b: Tensor, lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(M, e, a_top)`` of the log-mixture of float64 log-probabilities ``a``, ``b`` ``[n, V]``
    with weights ``lam``, ``1 - lam`` ``[n]``: with ``A = a + log lam``, ``B = b + log(1 - lam)``
    (``-inf`` where ``lam = 1``), ``M = max(A, B)``, ``e = exp(min(A, B) - M)`` in ``[0, 1]`` (0 where
    both are ``-inf``) and ``a_top = A >= B``; ``log pi~ = M + log1p(e)``."""
    A = a + torch.log(lam).unsqueeze(-1)
    B = b + torch.log1p(-lam).unsqueeze(-1)
    M = torch.maximum(A, B)
    e = torch.exp(torch.minimum(A, B) - M)
    e = torch.where(torch.isneginf(M), torch.zeros((), dtype=e.dtype, device=e.device), e)
    return M, e, A >= B


def _tv_lambda(tv: Tensor, delta: float) -> Tensor:
    """``min(1, delta / TV)`` per row; NaN where TV is (an invalid row)."""
    outside = tv > delta
    lam = torch.where(outside, delta / torch.where(outside, tv, torch.ones_like(tv)), torch.ones_like(tv))
    return torch.where(torch.isnan(tv), tv, lam)


def tv_forward(z: Tensor, w: Tensor, delta: float, T: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(log pi~ [n, V] in out_dtype, lambda [n], TV [n])`` of ``[n, V]`` logits, a block of rows
    at a time in float64 (no ``[n, V]`` float64 temporary beyond one block)."""
    from .exact import tv as _tv

    n, v = z.shape
    out = torch.empty((n, v), dtype=out_dtype, device=z.device)
    lams = torch.empty(n, dtype=torch.float64, device=z.device)
    tvs = torch.empty(n, dtype=torch.float64, device=z.device)
    for sl in _blocks(n, v):
        zc, wc = z[sl].to(torch.float64), w[sl].to(torch.float64)
        tv = _tv(zc, wc, temperature=T, validate=False)
        del zc, wc
        lam = _tv_lambda(tv, delta)
        # log((1 - lam) q + lam p) as a log-mixture (max + log1p(exp(-|A - B|))), never the log
        # of a rounded sum; A exactly where lam = 1 (B = -inf), -inf where both are.
        lp = _logprobs(z[sl], T).add_(torch.log(lam).unsqueeze(-1))
        lp = torch.logaddexp(lp, _logprobs(w[sl], T).add_(torch.log1p(-lam).unsqueeze(-1)))
        # An invalid row (NaN, +inf, all -inf: TV is NaN) is NaN throughout, never a number.
        lp = torch.where(torch.isnan(lam).unsqueeze(-1), torch.full_like(lp, math.nan), lp)
        out[sl] = lp
        lams[sl] = lam
        tvs[sl] = tv
    return out, lams, tvs


def tv_backward(g: Tensor | None, glam: Tensor | None, z: Tensor, w: Tensor, lam: Tensor, tv: Tensor,
                T: float, need_z: bool = True, need_w: bool = True) -> tuple[Tensor | None, Tensor | None]:
    r"""Gradient of the TV projection (see :doc:`/theory/projections`): with the
    responsibilities :math:`\rho_i = \lambda p_i/\tilde\pi_i`, :math:`\sigma_i = 1 - \rho_i`,

    .. math::

        \partial L/\partial z_j = (g_j\rho_j - p_j\textstyle\sum_i g_i\rho_i)/T
        + \Lambda\,\partial\mathrm{TV}/\partial z_j,\qquad
        \partial L/\partial w_j = (g_j\sigma_j - q_j\textstyle\sum_i g_i\sigma_i)/T
        + \Lambda\,\partial\mathrm{TV}/\partial w_j,

    :math:`\Lambda = -(\lambda/\mathrm{TV})\,\partial L/\partial\lambda` outside the ball (0
    inside), :math:`\partial L/\partial\lambda = \sum_i g_i(\rho_i/\lambda - \sigma_i/(1-\lambda))`
    plus ``glam``; :math:`\partial\mathrm{TV}` is :func:`trmath.tv`'s own backward. Float64 per
    block of rows, rounded once to the inputs' dtypes."""
    from .exact import tv as _tv

    n, v = z.shape
    dz = torch.empty((n, v), dtype=z.dtype, device=z.device) if need_z else None
    dw = torch.empty((n, v), dtype=w.dtype, device=w.device) if need_w else None
    for sl in _blocks(n, v):
        zc, wc = z[sl].to(torch.float64), w[sl].to(torch.float64)
        a, b = _logprobs(zc, T), _logprobs(wc, T)
        lm = lam[sl]
        M, e, a_top = _tv_mix(a, b, lm)
        live = ~torch.isneginf(M)  # tokens masked in both rows have no gradient
        zero = torch.zeros((), dtype=a.dtype, device=a.device)
        rho = torch.where(a_top, 1.0 / (1.0 + e), e / (1.0 + e))
        rho = torch.where(live, rho, zero)
        sig = torch.where(live, 1.0 - rho, zero)
        G = zero.expand(a.shape) if g is None else g[sl].to(torch.float64)
        G = torch.where(live, G, zero)
        Gr, Gs = G * rho, G * sig
        dlam = (Gr / lm.unsqueeze(-1) - Gs / (1.0 - lm).unsqueeze(-1)).sum(-1) if g is not None else torch.zeros_like(lm)
        if glam is not None:
            dlam = dlam + glam[sl].to(torch.float64)
        outside = lm < 1.0
        gz = (Gr - torch.exp(a) * Gr.sum(-1, keepdim=True)) / T if need_z else None
        gw = (Gs - torch.exp(b) * Gs.sum(-1, keepdim=True)) / T if need_w else None
        if bool(outside.any()):
            tvb = tv[sl]
            scale = torch.where(outside, -(dlam * lm) / torch.where(outside, tvb, torch.ones_like(tvb)),
                                torch.zeros_like(tvb))
            with torch.enable_grad():
                zz = zc.detach().requires_grad_(need_z)
                ww = wc.detach().requires_grad_(need_w)
                inputs = [x for x, nd in ((zz, need_z), (ww, need_w)) if nd]
                grads = torch.autograd.grad(_tv(zz, ww, temperature=T, validate=False), inputs, scale)
            it = iter(grads)
            if need_z:
                gz = gz + next(it)
            if need_w:
                gw = gw + next(it)
        if need_z:
            dz[sl] = gz
        if need_w:
            dw[sl] = gw
    return dz, dw


class _TVProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w, delta, T, out_dtype):
        out, lam, tv = tv_forward(z, w, delta, T, out_dtype)
        ctx.save_for_backward(z, w, lam, tv)
        ctx.T = T
        return out, lam

    @staticmethod
    def backward(ctx, g, glam):
        z, w, lam, tv = ctx.saved_tensors
        nz, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dz, dw = tv_backward(g, glam, z, w, lam, tv, ctx.T, nz, nw)
        return dz, dw, None, None, None


def tv_project(z: Tensor, w: Tensor, delta: float, T: float) -> tuple[Tensor, Tensor]:
    """Differentiable TV projection of logits ``[..., V]``; returns (log-probs ``[..., V]``,
    float32 for 16/32-bit inputs and float64 for float64 ones, and lambda ``[...]``, float64)."""
    v = z.shape[-1]
    lead = tuple(z.shape[:-1])
    odt = torch.float64 if z.dtype == torch.float64 else torch.float32
    out, lam = _TVProject.apply(z.reshape(-1, v), w.reshape(-1, v), delta, T, odt)
    return out.reshape(z.shape), lam.reshape(lead)
