// trmath: CPU kernels of the KL-ball projection (TROLL). Compiled once per instruction set,
// like kernels.cpp; cpp/src/bind_project.cpp picks the copy matching the exact kernels in use.
//
// Forward, per row (rows are spread over the thread pool; each row is reduced by one thread in
// a fixed order, so a row's result does not depend on the number of threads or on the batch),
// after the exact-KL kernel has given KL(pi_new || pi_old) and the normalisers of every row:
//   1. rows with KL <= eps: one pass writes log_softmax(z / T) (eta = 0);
//   2. otherwise one pass computes the old policy's float64 normaliser and its mass on the
//      common support (the feasibility limit), then a bracketed Newton iteration on
//      h(u) = log KL(pi~_{e^u} || pi_old) - log eps in u = log eta runs one fused pass per step
//      (one exponential per element); near the root the constraint is evaluated in the
//      cancellation-free phi-form (proj_phi_pass), which alone may accept the root, and a last
//      pass writes log pi~. Typical rows: two fused passes and one phi pass.
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
constexpr double kRtol = 1e-12;  // |KL - eps| <= kRtol eps at the root (KL by proj_phi_pass)
// Su/S - log S has an absolute rounding floor of a few 1e-16 (log S and log Q of sums of
// exponentials, each within 2 ulp): within kCheapRtol eps + kCheapAtol of eps it can no longer
// tell where the root is, and the exact form takes over.
constexpr double kCheapRtol = 1e-8;
constexpr double kCheapAtol = 1e-14;
constexpr double kPhiOnly = 1e-4;  // |h| from which the next evaluation is the exact form only
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
      // eta = 0: log_softmax(z / T). The exact-KL kernel forms lse_p as lse_q plus the centre of
      // the log-ratio, so it carries ulp(max(|lse_q|, |lse_p|)) absolute (1e-13 for logits
      // ~1e3 even when |log pi_new| ~ 1); one pass refines it to float64 accuracy about itself:
      // lse = lse_p + log sum_i e^{z_i/T - lse_p} (the sum is 1 + O(1e-13), exact to an ulp).
      const ProjNorm np = proj_norm_pass(w, sw, z, sz, V, invT, lse_p);
      const double lse = lse_p + std::log(np.Aw);
      proj_write_pass(z, sz, w, sw, V, invT, lse, k[1], 1.0, 0.0, true, out);
      const double st[kProjStats] = {0.0, 1.0, lse, k[1], 0.0, 0.0, 0.0, K1};
      for (int j = 0; j < kProjStats; ++j) S[j] = st[j];
      return;
    }
    // The solver works with b_i = w_i/T - lq, lq = the exact-KL kernel's normaliser, and
    // Q = sum_i e^{b_i} from the norm pass (the same b_i, so Q is the exact normaliser of the
    // b_i as rounded): pi_old_i = e^{b_i} / Q and g = Su/S - log S + log Q. Folding the rounding
    // of log Q into a rounded lse_q instead would move g by up to ulp(lse_q) absolute (1e-13 for
    // logits ~1e3: 1e-5 relative at eps = 1e-8). The per-element roundings of b_i perturb pi_old
    // by ~ulp(w/T) relative, which moves g by at most TV(pi~, pi_old) times that.
    ProjNorm nm = proj_norm_pass(z, sz, w, sw, V, invT, k[1]);
    const double lq = k[1], logQ = std::log(nm.Aw);
    // The backward's normaliser of pi_old; its d is the solver's plus log Q, so the stored Lambda
    // and mu are shifted to match (b + t d moves by -(1 - t) log Q).
    const double lse_q_stat = lq + logQ;
    // Infeasible: g(eta) -> -log pi_old(S) as eta -> inf.
    const double lim = nm.AwS > 0 ? -std::log(nm.AwS / nm.Aw) : kInf;
    if (!(lim < eps)) return fail(kProjInfeasible);
    const double lse_q = lq;
    const double cd = lse_p - lse_q;
    // One evaluation of g = KL(pi~_t || pi_old) and the moments at t. Accuracy: with
    // u_i = t d_i - c, g = Su/S - log S = E~[u] - log S is evaluated as the difference of two
    // numbers of size |log S| + E~|u|, so its absolute error is a few ulps of that (plus the
    // relative rounding of the sums). The rounding of each u_i itself (|t d_i| may be ~1e4) is
    // harmless: it is a consistent perturbation of the input (the same u_i enters e_i and e_i u_i)
    // and dg/du_i = pi~_i (r_i - g) with r_i = log(pi~_i / pi_old_i), so it moves g by at most
    // ulp(t d) (E~|r| + g) ~ ulp(t d) sqrt(2 g). Hence c must be close to Lambda(t) (|log S| small):
    //   * the first evaluation takes the tangent of Lambda at t = 1 (for finite KL(pi_new||pi_old));
    //   * any whose S left [1e-250, 1e250] (and the first where KL = +inf) is redone with
    //     c = max_i (b_i + t d_i) (a max pass, no exponential): 1 <= S <= V, |log S| <= log V;
    //   * later ones predict c by the tangent Lambda(t') + mu (t - t'), a lower bound of the convex
    //     Lambda, so S >= 1 up to rounding and log S = O(Var dt^2) -> 0 as Newton converges;
    //   * a converged g with |log S| > 1 is re-evaluated at c = Lambda before it is accepted.
    // The moments are centred at d0 (the previous mu, or d at the maximum of b + t d at the first
    // evaluation): Var = Sd2/S - (Sd/S)^2 loses about (mean / sd)^2 ulps, at most V ulps at the
    // first evaluation (the maximum carries >= 1/V of the mass, so mean^2 <= V Var) and O(1) once
    // d0 = mu. A poor Var only slows the iteration: Newton steps are taken inside a bracket.
    double t = 1.0, lam = 0.0, mu = 0.0, var = 0.0, g = 0.0, logS = 0.0;
    bool have = false;  // lam, mu valid at t
    auto eval = [&](double tn, bool force_max) {
      double c, d0;
      if (have && !force_max) {
        c = lam + mu * (tn - t);
        d0 = mu;
      } else if (std::isfinite(K1) && !force_max) {
        // The tangent at t = 1 (Lambda(1) = log pi_new(S) = 0, Lambda'(1) = E_new[d] = K1):
        // S = e^{Lambda(t) + (1 - t) K1} lies in [1, e^{(1 - t) K1}] -- close to 1 on typical
        // rows, and the max pass below takes over where it would overflow.
        c = -(1.0 - tn) * K1;
        d0 = K1;
      } else {
        ProjMax mx = proj_max_pass(z, sz, w, sw, V, invT, lse_q, cd, tn);
        c = mx.y;
        d0 = mx.d;
      }
      ProjMoments m = proj_interp_pass(z, sz, w, sw, V, invT, lse_q, cd, tn, c, d0);
      if (!(m.S >= 1e-250 && m.S <= 1e250) && !force_max) {
        ProjMax mx = proj_max_pass(z, sz, w, sw, V, invT, lse_q, cd, tn);
        c = mx.y;
        d0 = mx.d;
        m = proj_interp_pass(z, sz, w, sw, V, invT, lse_q, cd, tn, c, d0);
      }
      logS = std::log(m.S);
      const double mean = m.Sd / m.S;
      g = m.Su / m.S - logS + logQ;
      t = tn;
      lam = c + logS;
      mu = d0 + mean;
      var = std::max(m.Sd2 / m.S - mean * mean, 0.0);
      have = true;
    };
    // g at the current t in the cancellation-free form of proj_phi_pass (no absolute floor):
    // used to accept the root, once the pass above has brought g to its own floor.
    // lam may be a Taylor prediction: the pass returns its correction delta (see project.hpp).
    auto g_exact = [&]() {
      const ProjPhi f = proj_phi_pass(z, sz, w, sw, V, invT, lse_q, cd, t, lam - logQ);
      const double P = nm.AwS + f.Sig;
      const double x = (f.Sig - nm.Aout) / nm.Aw;
      lam += std::log1p(x);
      return (f.Phi + f.Sig) / P - std::log1p(x);
    };
    if (!std::isfinite(K1)) {
      // pi_old = 0 where pi_new > 0. As eta -> 0+ the projection tends to pi_new restricted to
      // the common support; if that is already in the ball it is the solution (eta = 0+).
      eval(1.0, true);
      g = g_exact();
      if (g <= eps) {
        proj_write_pass(z, sz, w, sw, V, invT, lse_p, lse_q, 1.0, lam, false, out);
        const double st[kProjStats] = {0.0, 1.0, lse_p, lse_q_stat, lam, mu + logQ, var, K1};
        for (int j = 0; j < kProjStats; ++j) S[j] = st[j];
        return;
      }
    }
    // Root of h(u) = log g(e^u) - log eps, decreasing in u = log eta (h > 0: eta too small).
    // Initial guess from g ~ t^2 K1 (exact to first order when pi_new is close to pi_old; it can
    // be far off for distant rows, which the bracketing below absorbs); eta = 1 when K1 = +inf.
    double u = std::isfinite(K1) ? std::log(std::max(std::expm1(0.5 * (std::log(K1) - log_eps)), 1e-300)) : 0.0;
    u = std::min(std::max(u, -700.0), 700.0);
    // Safeguards: [lo, hi] brackets the root once both ends are finite. While it is open, a
    // Newton step (limited to 30 in u) or, without a usable derivative, a step that doubles each
    // time (2, 4, 8, ...) searches for the other end; once closed, Newton is taken only when it
    // lands inside and the step is at most half the one before last, else the bracket is
    // bisected (so its width at least halves every two evaluations). t = 1/(1 + e^u) is a smooth
    // function of u on the whole line, so bisection in u reaches float64 resolution of eta.
    double lo = -kInf, hi = kInf, eta = std::exp(u), walk = 2.0;
    double dx = kInf, dxold = kInf;
    bool phi_only = false;
    for (int it = 0; it < kMaxIter; ++it) {
      eta = std::exp(u);
      const double tn = 1.0 / (1.0 + eta);
      const bool width = (hi - lo) <= 4e-16 * std::max(std::fabs(u), 1.0);
      bool exact = phi_only;
      if (phi_only) {
        // After a Newton step from |h| <= kPhiOnly: the next h is expected to be O(h^2), within
        // the last-step range, so only the exact form is evaluated, about the Taylor prediction
        // of Lambda (corrected by the pass) and mu, Var (approximate: they only shape the last
        // step; the backward recomputes them).
        const double dt = tn - t;
        lam += mu * dt + 0.5 * var * dt * dt;
        mu += var * dt;
        t = tn;
        g = g_exact();
      } else {
        eval(tn, false);
        // Near the root (g within its absolute floor of eps) g is re-evaluated exactly, and only
        // that value may end the iteration.
        exact = width || std::fabs(g - eps) <= kCheapRtol * eps + kCheapAtol;
        if (exact) g = g_exact();
      }
      phi_only = false;
      const double h = std::log(g) - log_eps;  // -inf or NaN if g underflowed or rounded to <= 0
      const double dh = -eta * t * t * t * var / g;
      const bool newton_ok = dh < 0 && std::isfinite(dh) && std::isfinite(h);
      const bool last = newton_ok && std::fabs(h) <= kLastStep * std::min(1.0, -dh);
      if (exact && (last || width || std::fabs(g - eps) <= kRtol * eps)) {
        if (!last) break;
        // Last Newton step without another pass (also taken when g already meets the tolerance,
        // so that eta carries only the rounding error of g, not the tolerance): its error is
        // O(h^2) (below 1e-15 relative here). Lambda and mu at the new t from their Taylor
        // series (dLambda/dt = mu, dmu/dt = Var), truncation O(dt^3) and O(dt^2) with
        // |dt| <= 1e-8 t; the backward recomputes Lambda, mu and Var exactly at the stored t.
        const double un = u - h / dh;
        const double etan = std::exp(un), tn = 1.0 / (1.0 + etan), dt = tn - t;
        lam += mu * dt + 0.5 * var * dt * dt;
        mu += var * dt;
        u = un;
        eta = etan;
        t = tn;
        break;
      }
      if (h > 0) lo = u; else hi = u;
      const double step = newton_ok ? -h / dh : kNaN;
      const double cand = u + step;
      if (std::isfinite(lo) && std::isfinite(hi)) {
        if (newton_ok && cand > lo && cand < hi && std::fabs(2.0 * step) <= dxold) {
          dxold = dx;
          dx = std::fabs(step);
          u = cand;
          phi_only = std::fabs(h) <= kPhiOnly * std::min(1.0, -dh);
        } else {
          dxold = dx;
          dx = 0.5 * (hi - lo);
          u = lo + dx;
        }
      } else if (newton_ok && std::isfinite(cand) && cand > lo && cand < hi) {
        u += std::min(std::max(step, -30.0), 30.0);
        phi_only = std::fabs(h) <= kPhiOnly * std::min(1.0, -dh);
      } else {
        u = h > 0 ? u + walk : u - walk;
        walk *= 2.0;
      }
      u = std::min(std::max(u, -740.0), 705.0);  // eta stays a positive finite double
    }
    proj_write_pass(z, sz, w, sw, V, invT, lse_p, lse_q, t, lam, false, out);
    const double st[kProjStats] = {eta, t, lse_p, lse_q_stat, lam - (1.0 - t) * logQ, mu + logQ, var, K1};
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
