// trmath: per-row passes of the KL-ball projection (TROLL), header-only, no allocation.
//
// A row pair is new logits z and old logits w (any stored dtype, strided), at temperature T.
// With float64 normalisers lse_p, lse_q the log-probabilities are a_i = z_i/T - lse_p,
// b_i = w_i/T - lse_q, the log-ratio is d_i = (z_i - w_i)/T - (lse_p - lse_q) on the common
// support S (both finite), and for t = 1/(1 + eta) the projection is
//     log pi~_i = b_i + t d_i - Lambda(t),   Lambda(t) = log sum_S e^{b_i + t d_i}.
// One pass at (t, c) accumulates, with u_i = t d_i - c and e_i = e^{b_i + u_i}:
//     S = sum e_i, Su = sum e_i u_i, Sd = sum e_i (d_i - d0), Sd2 = sum e_i (d_i - d0)^2,
//     Sd3 = sum e_i (d_i - d0)^3 (the third cumulant, for the solver's Halley steps),
// from which Lambda = c + log S, KL(pi~ || pi_old) = Su / S - log S + log Q (Q = sum e^{b_i},
// the normaliser of the b_i as rounded), mu = d0 + Sd / S and Var = Sd2 / S - (Sd / S)^2
// (centred at d0 near the mean, so no cancellation of mu^2). This KL has an absolute rounding
// floor of a few 1e-16; proj_phi_pass evaluates it without one, for the root's acceptance.
// A constant error in lse_p shifts every d_i and cancels from log pi~, KL, d - mu and the
// gradient; an error in lse_q is absorbed by log Q.
// Everything is double; exponentials are the double lanes' exp of elementary.hpp (<= 2 ulp).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "trmath/elementary.hpp"
#include "trmath/project_solve.hpp"

namespace trmath {

namespace simd {

TRMATH_INLINE void proj_store(float* p, double v) { *p = float(v); }
TRMATH_INLINE void proj_store(double* p, double v) { *p = v; }
TRMATH_INLINE void proj_store(bf16_t* p, double v) { store_from_float(p, float(v)); }
TRMATH_INLINE void proj_store(f16_t* p, double v) { store_from_float(p, float(v)); }

// The passes' lanes: 8 doubles in the AVX-512 build, 4 elsewhere (the same operations per lane;
// only the grouping of the sums differs).
#if defined(TRMATH_HAVE_LANES16)
using pd = d8;
using pl = l8;
template <class In> TRMATH_INLINE pd proj_load_unit(const In* p) { return load8_d(p); }
#else
using pd = d4;
using pl = l4;
template <class In> TRMATH_INLINE pd proj_load_unit(const In* p) { return Load4<In>::load(p); }
#endif
constexpr int kProjW = int(sizeof(pd) / sizeof(double));

template <class In>
TRMATH_INLINE pd proj_load(const In* p, int64_t stride) {
  if (stride == 1) return proj_load_unit(p);
  pd r;
  for (int k = 0; k < kProjW; ++k) r[k] = to_double(p[k * stride]);
  return r;
}

template <class In>
TRMATH_INLINE pd proj_load_tail(const In* p, int64_t stride, int64_t n) {
  pd r = splat<pd>(-std::numeric_limits<double>::infinity());
  for (int64_t k = 0; k < n; ++k) r[k] = to_double(p[k * stride]);
  return r;
}

// Calls f(i, zv, wv, nvalid) over a row in steps of kProjW (the last step padded with -inf).
template <class In, class F>
TRMATH_INLINE void proj_row_loop(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V, F&& f) {
  int64_t i = 0;
  for (; i + kProjW <= V; i += kProjW)
    f(i, proj_load(z + i * sz, sz), proj_load(w + i * sw, sw), int64_t(kProjW));
  if (i < V) f(i, proj_load_tail(z + i * sz, sz, V - i), proj_load_tail(w + i * sw, sw, V - i), V - i);
}

using ProjNorm = projsolve::Norm;

// Exact float64 normaliser of the old policy about an approximate centre cw (the exact-KL
// kernel's lse), and its mass on the common support; with kMoments, also the sums of e_i d_i and
// e_i d_i^2 over the common support, d_i = (z_i - w_i)/T - cd (the solver's first guess).
template <bool kMoments, class In>
inline ProjNorm proj_norm_pass_t(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V,
                                 double invT, double cw, double cd) {
  pd aw = {}, aws = {}, aout = {}, ad = {}, ad2 = {};
  const double ninf = -std::numeric_limits<double>::infinity();
  proj_row_loop(z, sz, w, sw, V, [&](int64_t, pd zv, pd wv, int64_t) TRMATH_LAMBDA_INLINE {
    pd ew = exp_d(wv * invT - cw);
    pd ewm = wv > ninf ? ew : pd{};
    aw += ewm;
    const pl zin = zv > ninf;
    const pd ews = zin ? ewm : pd{};
    aws += ews;
    aout += zin ? pd{} : ewm;
    if (kMoments) {
      const pd d = zin ? (zv - wv) * invT - cd : pd{};  // ews = 0 where d is not finite
      const pd ed = ews * d;
      ad += ed;
      ad2 += ed * d;
    }
  });
  if (!kMoments) return {hsum(aw), hsum(aws), hsum(aout)};
  return {hsum(aw), hsum(aws), hsum(aout), hsum(ad), hsum(ad2)};
}
template <class In>
inline ProjNorm proj_norm_pass(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V,
                               double invT, double cw, double cd, bool moments) {
  return moments ? proj_norm_pass_t<true>(z, sz, w, sw, V, invT, cw, cd)
                 : proj_norm_pass_t<false>(z, sz, w, sw, V, invT, cw, cd);
}

using ProjMoments = projsolve::Moments;

// One pass of the interpolation at t (see the header comment); cd = lse_p - lse_q.
template <class In>
inline ProjMoments proj_interp_pass(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V,
                                    double invT, double lse_q, double cd, double t, double c,
                                    double d0) {
  pd S = {}, Su = {}, Sd = {}, Sd2 = {}, Sd3 = {};
  const double ninf = -std::numeric_limits<double>::infinity();
  proj_row_loop(z, sz, w, sw, V, [&](int64_t, pd zv, pd wv, int64_t) TRMATH_LAMBDA_INLINE {
    pl ok = (zv > ninf) & (wv > ninf);
    pd d = ok ? (zv - wv) * invT - cd : pd{};
    pd b = ok ? wv * invT - lse_q : pd{};
    pd u = t * d - c;
    pd e = exp_d(b + u);
    e = ok ? e : pd{};
    pd dc = d - d0;
    S += e;
    Su += e * u;
    pd edc = e * dc;
    Sd += edc;
    const pd edc2 = edc * dc;
    Sd2 += edc2;
    Sd3 += edc2 * dc;
  });
  return {hsum(S), hsum(Su), hsum(Sd), hsum(Sd2), hsum(Sd3)};
}

// The exact (cancellation-free) form of the constraint. With r_i = t d_i - lam_r over the common
// support S, q_i = e^{b_i}, p_i = e^{b_i + r_i}, phi(r) = r e^r - e^r + 1 >= 0:
//     Phi = sum_S q_i phi(r_i) (>= 0 termwise),  Sig = sum_S q_i expm1(r_i) = sum_S (p_i - q_i).
// For lam_r = Lambda(t) - log Q exactly (Q = sum_i q_i), r_i = log(pi~_i / pi_old_i) and
// KL(pi~ || pi_old) = (Phi + sum_{i not in S} q_i) / Q. For any lam_r (e.g. a Taylor
// prediction), with P = sum_S p_i = A_S + Sig and Lambda = lam_r + log Q + delta,
// delta = log(P / Q) = log1p((Sig - A_out) / Q), the identity phi(r - delta) = e^{-delta} phi(r)
// - delta e^{r - delta} + 1 - e^{-delta} gives
//     KL = (Phi + Sig) / P - log1p((Sig - A_out) / Q),
// where the two delta terms cancel to O(delta^2) with an absolute error of ulp(delta): there is
// no absolute rounding floor (unlike Su/S - log S), and an error eta_i in one r_i moves KL by
// pi~_i r_i eta_i only. Series for |r| < 1: one series E2 = expm1(r) - r (18 terms, converged
// to double precision there) gives expm1 = r + E2 and phi = r expm1(r) - E2 (at most 2 bits lost
// at r = -1); elsewhere phi = p (r - 1) + q and p - q from the second exponential.
using ProjPhi = projsolve::Phi;

// With kMoments, also the moments of pi~ about d0 that the solver's last step needs:
// p_i = q_i e^{r_i} = q_i + (p_i - q_i) (the Sig term), Sk = sum_S p_i (d_i - d0)^k, k = 1..5;
// sum_S p_i = A_S + Sig (see above).
template <bool kMoments, class In>
inline ProjPhi proj_phi_pass_t(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V,
                               double invT, double lse_q, double cd, double t, double lam_r,
                               double d0) {
  const double ninf = -std::numeric_limits<double>::infinity();
  pd aphi = {}, asig = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {};
  proj_row_loop(z, sz, w, sw, V, [&](int64_t, pd zv, pd wv, int64_t) TRMATH_LAMBDA_INLINE {
    pl ok = (zv > ninf) & (wv > ninf);
    pd d = ok ? (zv - wv) * invT - cd : pd{};
    pd b = ok ? wv * invT - lse_q : splat<pd>(ninf);
    pd r = ok ? t * d - lam_r : pd{};
    pd qt = exp_d(b);
    pl small = vabs(r) < 1.0;
    pd e2 = r * r * estrin(r, coef::em2_d);
    pd em1 = r + e2;
    pd phi = qt * (r * em1 - e2);
    pd sig = qt * em1;
    if (any_lane(~small & ok)) {
      pd pt = exp_d(b + r);
      phi = small ? phi : pt * (r - 1.0) + qt;
      sig = small ? sig : pt - qt;
    }
    phi = ok ? phi : pd{};
    sig = ok ? sig : pd{};
    aphi += phi;
    asig += sig;
    if (kMoments) {
      const pd dc = d - d0;
      const pd e1 = (qt + sig) * dc;  // qt = 0 where not ok
      const pd e2m = e1 * dc;
      const pd e3 = e2m * dc;
      const pd e4 = e3 * dc;
      a1 += e1;
      a2 += e2m;
      a3 += e3;
      a4 += e4;
      a5 += e4 * dc;
    }
  });
  if (!kMoments) return {hsum(aphi), hsum(asig)};
  return {hsum(aphi), hsum(asig), hsum(a1), hsum(a2), hsum(a3), hsum(a4), hsum(a5)};
}
template <class In>
inline ProjPhi proj_phi_pass(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V,
                             double invT, double lse_q, double cd, double t, double lam_r,
                             bool moments, double d0) {
  return moments ? proj_phi_pass_t<true>(z, sz, w, sw, V, invT, lse_q, cd, t, lam_r, d0)
                 : proj_phi_pass_t<false>(z, sz, w, sw, V, invT, lse_q, cd, t, lam_r, d0);
}

// The largest y_i = b_i + t d_i over the common support and the d_i where it is attained (the
// first such i in lane order). exp(y_i - ymax) <= 1 with at least one term equal to 1, so a pass
// with c = ymax - (the b part) has 1 <= S <= V: no overflow, no underflow. No exponential.
using ProjMax = projsolve::Max;

template <class In>
inline ProjMax proj_max_pass(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V,
                             double invT, double lse_q, double cd, double t) {
  const double ninf = -std::numeric_limits<double>::infinity();
  pd my = splat<pd>(ninf), md = {};
  proj_row_loop(z, sz, w, sw, V, [&](int64_t, pd zv, pd wv, int64_t) TRMATH_LAMBDA_INLINE {
    pl ok = (zv > ninf) & (wv > ninf);
    pd d = ok ? (zv - wv) * invT - cd : pd{};
    pd y = ok ? (wv * invT - lse_q) + t * d : splat<pd>(ninf);
    pl gt = y > my;
    my = gt ? y : my;
    md = gt ? d : md;
  });
  ProjMax r;
  for (int k = 0; k < kProjW; ++k)
    if (my[k] > r.y) {
      r.y = my[k];
      r.d = md[k];
    }
  return r;
}

// log pi~ (t < 1: the interpolation, lam = Lambda(t)) or log pi_new (t == 1, lse_p) into out.
template <class In, class Out>
inline void proj_write_pass(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V,
                            double invT, double lse_p, double lse_q, double t, double lam,
                            bool inside, Out* out) {
  const double ninf = -std::numeric_limits<double>::infinity();
  const double cd = lse_p - lse_q;
  proj_row_loop(z, sz, w, sw, V, [&](int64_t i, pd zv, pd wv, int64_t n) TRMATH_LAMBDA_INLINE {
    pd r;
    if (inside) {
      r = zv * invT - lse_p;
      r = zv > ninf ? r : splat<pd>(ninf);
    } else {
      pl ok = (zv > ninf) & (wv > ninf);
      pd d = (zv - wv) * invT - cd;
      r = (wv * invT - lse_q) + t * d - lam;
      r = ok ? r : splat<pd>(ninf);
    }
    for (int64_t k = 0; k < n; ++k) proj_store(out + i + k, r[k]);
  });
}

// Implicit gradient of the projection; see docs/theory/projections.rst.
// Pass 1: sums of G over the support and of G (d - mu); for an active row also the moments of
// pi~ at (t, lam): S = sum e^{b + t d - lam}, sum of e (d - mu) and of e (d - mu)^2.
using ProjGradSums = projsolve::GradSums;

template <class In>
inline ProjGradSums proj_grad_sums(const In* z, int64_t sz, const In* w, int64_t sw,
                                   const double* g, int64_t V, double invT, double cd,
                                   double lse_q, double t, double lam, double mu, bool inside) {
  pd a = {}, b = {}, s0 = {}, s1 = {}, s2 = {};
  const double ninf = -std::numeric_limits<double>::infinity();
  proj_row_loop(z, sz, w, sw, V, [&](int64_t i, pd zv, pd wv, int64_t n) TRMATH_LAMBDA_INLINE {
    pd gv = {};
    for (int64_t k = 0; k < n; ++k) gv[k] = g[i + k];
    pl ok = inside ? (zv > ninf) : ((zv > ninf) & (wv > ninf));
    gv = ok ? gv : pd{};
    pd d = ok ? (zv - wv) * invT - cd : pd{};
    pd dc = ok ? d - mu : pd{};
    a += gv;
    b += gv * dc;
    if (!inside) {
      pd e = exp_d((wv * invT - lse_q) + t * d - lam);
      e = ok ? e : pd{};
      s0 += e;
      pd edc = e * dc;
      s1 += edc;
      s2 += edc * dc;
    }
  });
  return {hsum(a), hsum(b), hsum(s0), hsum(s1), hsum(s2)};
}

template <class In, class Out>
inline void proj_grad_write(const In* z, int64_t sz, const In* w, int64_t sw, const double* g,
                            int64_t V, double invT, double lse_p, double lse_q, double t,
                            double lam, double mu, bool inside, double SG, double kappa,
                            Out* dz, Out* dw) {
  const double ninf = -std::numeric_limits<double>::infinity();
  const double cd = lse_p - lse_q;
  proj_row_loop(z, sz, w, sw, V, [&](int64_t i, pd zv, pd wv, int64_t n) TRMATH_LAMBDA_INLINE {
    pd gv = {};
    for (int64_t k = 0; k < n; ++k) gv[k] = g[i + k];
    pd gz, gw;
    if (inside) {
      pl ok = zv > ninf;
      pd pa = exp_d(zv * invT - lse_p);
      gz = ok ? (gv - pa * SG) * invT : pd{};
      gw = pd{};
    } else {
      pl ok = (zv > ninf) & (wv > ninf);
      pd d = ok ? (zv - wv) * invT - cd : pd{};
      pd b = wv * invT - lse_q;
      pd pt = exp_d(b + t * d - lam);
      pt = ok ? pt : pd{};
      pd po = wv > ninf ? exp_d(b) : pd{};
      pd dc = ok ? d - mu : pd{};
      pd r = ok ? gv - pt * SG : pd{};
      gz = (t * r - (kappa * t * t) * (pt * dc)) * invT;
      gw = ((1.0 - t) * r - kappa * ((t * (1.0 - t)) * (pt * dc) - pt + po)) * invT;
    }
    for (int64_t k = 0; k < n; ++k) {
      if (dz) proj_store(dz + i + k, gz[k]);
      if (dw) proj_store(dw + i + k, gw[k]);
    }
  });
}


// ---- TV ball (project_tv): a two-component log-mixture of each row pair --------------------
// With per-row constants ca = lse_p - log(lam) and cb = lse_q - log(1 - lam) (cb = +inf inside
// the ball, lam = 1): A_i = z_i/T - ca = log(lam p_i), B_i = w_i/T - cb = log((1 - lam) q_i) and
//     log pi~_i = logaddexp(A_i, B_i) = M + log(1 + e),  M = max(A, B), e = e^{min - M} <= 1,
// so a row inside the ball gets z_i/T - lse_p exactly. NaN in, NaN out; both -inf: -inf.
// The responsibilities rho_i = lam p_i / pi~_i = 1/(1 + e) (A >= B) or e/(1 + e), and
// sig_i = 1 - rho_i, formed the same way, need no logarithm.
struct TvMixLanes {
  pd M, e, rho, sig;
  pl ok, nan;
};

TRMATH_INLINE TvMixLanes tvmix_lanes(pd zv, pd wv, double invT, double ca, double cb) {
  const double ninf = -std::numeric_limits<double>::infinity();
  TvMixLanes r;
  const pd A = zv * invT - ca, B = wv * invT - cb;
  const pl agb = A >= B;
  r.M = agb ? A : B;
  const pd lo = agb ? B : A;
  r.ok = r.M > ninf;
  r.nan = (A != A) | (B != B);
  r.e = r.ok ? exp_d(lo - r.M) : pd{};
  const pd big = 1.0 / (1.0 + r.e), small = r.e * big;
  r.rho = r.ok ? (agb ? big : small) : pd{};
  r.sig = r.ok ? (agb ? small : big) : pd{};
  return r;
}

template <class In, class Out>
inline void tvmix_write_pass(const In* z, int64_t sz, const In* w, int64_t sw, int64_t V, double invT, double ca,
                             double cb, Out* out) {
  const double ninf = -std::numeric_limits<double>::infinity();
  const pd one = splat<pd>(1.0);
  proj_row_loop(z, sz, w, sw, V, [&](int64_t i, pd zv, pd wv, int64_t n) TRMATH_LAMBDA_INLINE {
    const TvMixLanes m = tvmix_lanes(zv, wv, invT, ca, cb);
    pd r = m.M + log1p_ratio_c(m.e, one, coef::log1p_d);
    r = m.ok ? r : splat<pd>(ninf);
    r = m.nan ? splat<pd>(std::numeric_limits<double>::quiet_NaN()) : r;
    for (int64_t k = 0; k < n; ++k) proj_store(out + i + k, r[k]);
  });
}

// Backward pass 1: S1 = sum g rho, S2 = sum g sig and, for a row outside the ball (lam < 1),
// dL/dlam through the mixture, sum g (p - q) / pi~ = sum g (rho / lam - sig / (1 - lam)).
struct TvMixSums {
  double s1, s2, s3;
};

template <class In>
inline TvMixSums tvmix_grad_sums(const In* z, int64_t sz, const In* w, int64_t sw, const double* g, int64_t V,
                                 double invT, double ca, double cb, double lam) {
  const bool outside = lam < 1.0;
  const double il = 1.0 / lam, i1l = outside ? 1.0 / (1.0 - lam) : 0.0;
  pd a = {}, b = {}, c = {};
  proj_row_loop(z, sz, w, sw, V, [&](int64_t i, pd zv, pd wv, int64_t n) TRMATH_LAMBDA_INLINE {
    pd gv = {};
    for (int64_t k = 0; k < n; ++k) gv[k] = g[i + k];
    const TvMixLanes m = tvmix_lanes(zv, wv, invT, ca, cb);
    gv = m.ok ? gv : pd{};
    a += gv * m.rho;
    b += gv * m.sig;
    if (outside) c += gv * (m.rho * il - m.sig * i1l);
  });
  return {hsum(a), hsum(b), hsum(c)};
}

// Backward pass 2, the mixture's part of the gradient (p = e^{z/T - lse_p}, q likewise):
//     dz_i = (g_i rho_i - p_i S1) / T,  dw_i = (g_i sig_i - q_i S2) / T.
template <class In, class Out>
inline void tvmix_grad_write(const In* z, int64_t sz, const In* w, int64_t sw, const double* g, int64_t V,
                             double invT, double ca, double cb, double lse_p, double lse_q, double S1, double S2,
                             Out* dz, Out* dw) {
  const double ninf = -std::numeric_limits<double>::infinity();
  proj_row_loop(z, sz, w, sw, V, [&](int64_t i, pd zv, pd wv, int64_t n) TRMATH_LAMBDA_INLINE {
    pd gv = {};
    for (int64_t k = 0; k < n; ++k) gv[k] = g[i + k];
    const TvMixLanes m = tvmix_lanes(zv, wv, invT, ca, cb);
    gv = m.ok ? gv : pd{};
    if (dz) {
      const pd p = zv > ninf ? exp_d(zv * invT - lse_p) : pd{};
      const pd gz = (gv * m.rho - p * S1) * invT;
      for (int64_t k = 0; k < n; ++k) proj_store(dz + i + k, gz[k]);
    }
    if (dw) {
      const pd q = wv > ninf ? exp_d(wv * invT - lse_q) : pd{};
      const pd gw = (gv * m.sig - q * S2) * invT;
      for (int64_t k = 0; k < n; ++k) proj_store(dw + i + k, gw[k]);
    }
  });
}

}  // namespace simd
}  // namespace trmath
