// trmath: CPU kernels of the KL-ball projection (TROLL). Compiled once per instruction set,
// like kernels.cpp; cpp/src/bind_project.cpp picks the copy matching the exact kernels in use.
//
// Forward, per row (rows are spread over the thread pool; each row is reduced by one thread in
// a fixed order, so a row's result does not depend on the number of threads or on the batch),
// after the exact-KL kernel has given KL(pi_new || pi_old) and the normalisers of every row:
//   1. rows with KL <= eps: one pass writes log_softmax(z / T) (eta = 0);
//   2. otherwise one pass computes the old policy's exact float64 normaliser and its mass on
//      the common support (the feasibility limit), then a safeguarded Newton iteration on
//      h(u) = log KL(pi~_{e^u} || pi_old) - log eps in u = log eta runs one fused pass per step
//      (one exponential per element), and a last pass writes log pi~.
// Backward (implicit gradient): two passes per row. No [N, V] temporary besides the outputs.
#include <algorithm>
#include <cmath>
#include <limits>

#ifndef TRMATH_ISA
#error "TRMATH_ISA must be defined"
#endif
#define TRMATH_CAT2(a, b) a##b
#define TRMATH_CAT(a, b) TRMATH_CAT2(a, b)
#define simd TRMATH_CAT(simd_, TRMATH_ISA)

#include "project_args.hpp"
#include "trmath/project.hpp"

#define TRMATH_NS TRMATH_CAT(isa_, TRMATH_ISA)

namespace trmath {
namespace TRMATH_NS {
namespace {

using namespace simd;
constexpr int kMaxIter = 100;
constexpr double kRtol = 1e-12;  // |KL - eps| <= kRtol eps + kAtol at the root; kAtol: a few
constexpr double kAtol = 1e-15;  // times the absolute rounding floor of KL (log S, in float64)
constexpr double kLastStep = 1e-8;  // |h| below which the last Newton step needs no new pass
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

template <class In>
const In* row_ptr(const View& v, int64_t r) {
  return reinterpret_cast<const In*>(v.data) + v.row_offset(r);
}

template <class In, class Out>
void forward_rows(const ProjFwd& a, const double* kst) {
  const int64_t V = a.z.V(), rows = a.z.rows();
  const int64_t sz = a.z.vstride(), sw = a.w.vstride();
  const double invT = 1.0 / a.T, eps = a.eps, log_eps = std::log(eps);
  parallel_for(rows, [&](int64_t r) {
    const In* z = row_ptr<In>(a.z, r);
    const In* w = row_ptr<In>(a.w, r);
    Out* out = static_cast<Out*>(a.out) + r * V;
    double* S = a.stats + kProjStats * r;
    auto fail = [&](int bits) {
      a.status[r] |= bits;
      for (int64_t i = 0; i < V; ++i) out[i] = Out(kNaN);
      for (int j = 0; j < kProjStats; ++j) S[j] = kNaN;
    };
    if (a.status[r] & kErrorBits) return fail(0);
    const double* k = kst + kPairStats * r;
    const double K1 = k[2];
    const double lse_p = k[0];
    if (!(K1 > eps)) {
      // eta = 0: log_softmax(z / T). The kernel's lse_p is float64-exact for float64 inputs and
      // within the float32 output rounding for 16/32-bit inputs.
      proj_write_pass(z, sz, w, sw, V, invT, lse_p, k[1], 1.0, 0.0, true, out);
      const double st[kProjStats] = {0.0, 1.0, lse_p, k[1], 0.0, 0.0, 0.0, K1};
      for (int j = 0; j < kProjStats; ++j) S[j] = st[j];
      return;
    }
    ProjNorm nm = proj_norm_pass(z, sz, w, sw, V, invT, k[1]);
    const double lse_q = k[1] + std::log(nm.Aw);
    // Infeasible: g(eta) -> -log pi_old(S) as eta -> inf.
    const double lim = nm.AwS > 0 ? -std::log(nm.AwS / nm.Aw) : kInf;
    if (!(lim < eps)) return fail(kProjInfeasible);
    const double cd = lse_p - lse_q;
    if (!std::isfinite(K1)) {
      // pi_old = 0 where pi_new > 0. As eta -> 0+ the projection tends to pi_new restricted to
      // the common support; if that is already in the ball it is the solution (eta = 0+).
      ProjMoments m = proj_interp_pass(z, sz, w, sw, V, invT, lse_q, cd, 1.0, 0.0, 0.0);
      const double logS = std::log(m.S), mean = m.Sd / m.S;
      if (m.Su / m.S - logS <= eps) {
        const double lam0 = logS;
        proj_write_pass(z, sz, w, sw, V, invT, lse_p, lse_q, 1.0, lam0, false, out);
        const double st[kProjStats] = {0.0, 1.0, lse_p, lse_q, lam0, mean, m.Sd2 / m.S - mean * mean, K1};
        for (int j = 0; j < kProjStats; ++j) S[j] = st[j];
        return;
      }
    }
    // Initial guess from g(t) ~ t^2 K1; eta = 1 when K1 = +inf.
    double u = std::isfinite(K1) ? std::log(std::max(std::expm1(0.5 * (std::log(K1) - log_eps)), 1e-300)) : 0.0;
    double lo = -kInf, hi = kInf, c = 0.0, d0 = 0.0;
    double t = 1.0, lam = 0.0, mu = 0.0, var = 0.0, eta = 1.0;
    for (int it = 0; it < kMaxIter; ++it) {
      eta = std::exp(u);
      t = 1.0 / (1.0 + eta);
      ProjMoments m = proj_interp_pass(z, sz, w, sw, V, invT, lse_q, cd, t, c, d0);
      const double logS = std::log(m.S), mean = m.Sd / m.S;
      const double g = m.Su / m.S - logS;
      lam = c + logS;
      mu = d0 + mean;
      var = m.Sd2 / m.S - mean * mean;
      c = lam;
      d0 = mu;
      const double h = std::log(g) - log_eps;  // NaN if rounding made g <= 0: then h > 0 is false
      const bool conv = std::fabs(g - eps) <= kRtol * eps + kAtol || (hi - lo) <= 4e-16 * std::max(std::fabs(u), 1.0);
      if (conv) break;
      if (h > 0) lo = u; else hi = u;
      const double dh = -eta * t * t * t * var / g;
      if (dh < 0 && std::fabs(h) <= kLastStep * std::min(1.0, -dh)) {
        // Last Newton step without another pass: its error is O(h^2) (below 1e-15 relative
        // here). Lambda and mu at the new t from their Taylor series (dLambda/dt = mu,
        // dmu/dt = Var), truncation O(dt^3) and O(dt^2) with |dt| <= 1e-8 t; the backward
        // recomputes Lambda, mu and Var exactly at the stored t.
        const double un = u - h / dh;
        const double etan = std::exp(un), tn = 1.0 / (1.0 + etan), dt = tn - t;
        lam += mu * dt + 0.5 * var * dt * dt;
        mu += var * dt;
        u = un;
        eta = etan;
        t = tn;
        break;
      }
      double step = dh < 0 ? -h / dh : 0.0;
      step = std::min(std::max(step, -30.0), 30.0);
      const double cand = u + step;
      const bool closed = std::isfinite(lo) && std::isfinite(hi);
      if (cand > lo && cand < hi && dh < 0 && std::isfinite(cand))
        u = cand;
      else if (closed)
        u = 0.5 * (lo + hi);
      else
        u = h > 0 ? u + 2.0 : u - 2.0;
    }
    proj_write_pass(z, sz, w, sw, V, invT, lse_p, lse_q, t, lam, false, out);
    const double st[kProjStats] = {eta, t, lse_p, lse_q, lam, mu, var, K1};
    for (int j = 0; j < kProjStats; ++j) S[j] = st[j];
  });
}

template <class In>
void backward_rows(const ProjBwd& a) {
  const int64_t V = a.z.V(), rows = a.z.rows();
  const int64_t sz = a.z.vstride(), sw = a.w.vstride();
  const double invT = 1.0 / a.T;
  parallel_for(rows, [&](int64_t r) {
    const In* z = row_ptr<In>(a.z, r);
    const In* w = row_ptr<In>(a.w, r);
    const double* S = a.stats + kProjStats * r;
    const double* g = a.g + r * V;
    In* dz = a.dz ? static_cast<In*>(a.dz) + r * V : nullptr;
    In* dw = a.dw ? static_cast<In*>(a.dw) + r * V : nullptr;
    const double eta = S[0], t = S[1], lse_p = S[2], lse_q = S[3], lam = S[4], mu = S[5];
    // eta = 0 with KL(pi_new || pi_old) = +inf: pi_new restricted to the common support, whose
    // gradient is the active formula with kappa = 0.
    const bool inside = !(eta > 0) && std::isfinite(S[7]);
    const double cd = lse_p - lse_q;
    ProjGradSums q = proj_grad_sums(z, sz, w, sw, g, V, invT, cd, lse_q, t, lam, mu, inside);
    double kappa = 0.0, lam_x = lam, mu_x = mu;
    if (!inside && eta > 0) {
      // Exact Lambda, mu and Var at the forward's t (the forward may have skipped the last pass).
      const double m1 = q.Sd / q.S, var = q.Sd2 / q.S - m1 * m1;
      lam_x = lam + std::log(q.S);
      mu_x = mu + m1;
      kappa = (q.SGd - q.SG * m1) / (t * var);
    }
    proj_grad_write(z, sz, w, sw, g, V, invT, lse_p, lse_q, t, lam_x, mu_x, inside, q.SG, kappa, dz, dw);
    if (std::isnan(eta)) {
      for (int64_t i = 0; i < V; ++i) {
        if (dz) proj_store(dz + i, kNaN);
        if (dw) proj_store(dw + i, kNaN);
      }
    }
  });
}

template <class F>
void by_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f16: return f(f16_t{}, float{});
    case DType::bf16: return f(bf16_t{}, float{});
    case DType::f32: return f(float{}, float{});
    case DType::f64: return f(double{}, double{});
  }
}

}  // namespace

void project_kl_forward_rows(const ProjFwd& a, const double* kst) {
  by_dtype(a.z.dtype, [&](auto in, auto o) { forward_rows<decltype(in), decltype(o)>(a, kst); });
}

void project_kl_backward_rows(const ProjBwd& a) {
  by_dtype(a.z.dtype, [&](auto in, auto) { backward_rows<decltype(in)>(a); });
}

}  // namespace TRMATH_NS
}  // namespace trmath
