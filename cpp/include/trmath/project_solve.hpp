// trmath: the per-row solver of the KL-ball projection (TROLL), shared by the CPU kernels
// (cpp/src/project_kernels.cpp) and the CUDA kernels (cpp/src/cuda_project.cu).
//
// The solver only decides which passes over the row to make and combines their sums; the passes
// themselves come from a row object R (the CPU's vectorised loops of project.hpp, or a CUDA
// block's reductions, whose results every thread of the block holds identically, so that every
// thread takes the same branches). R provides:
//   ProjNorm  norm(bool swapped, double c, double cd)   sums of e^{w/T - c} (swapped:
//                                             e^{z/T - c}) over the tokens where the other logits
//                                             are finite / -inf; not swapped, also the first two
//                                             moments of d_i = (z_i - w_i)/T - cd over the common
//                                             support, weighted by e^{w_i/T - c};
//   ProjMoments interp(lse_q, cd, t, c, d0);  ProjPhi phi(lse_q, cd, t, lam_r, moments, d0);
//   ProjMax   max(lse_q, cd, t);              void write(lse_p, lse_q, t, lam, inside);
//   void fail(int bits)                       NaN output and statistics, status |= bits;
//   void finish(const double (&st)[kProjStats])   the row's statistics.
// The sums are those of project.hpp; what they estimate and their error analysis are there.
#pragma once

#include <math.h>

#include <cstdint>

#include "trmath/config.hpp"

#if defined(__CUDACC__)
#define TRMATH_SOLVE __host__ __device__ inline
#else
#define TRMATH_SOLVE inline
#endif

namespace trmath {
namespace projsolve {

// Per-row statistics of the projection, saved for the backward:
// [eta, t, lse_p, lse_q, Lambda, mu, Var, KL(pi_new || pi_old)].
constexpr int kStats = 8;
// Status bit (beside the RowStatus bits): no distribution of the ball is at finite KL from pi_new.
constexpr int kInfeasible = 256;

struct Norm {
  double Aw = 0, AwS = 0;  // sum e^{w/T - cw}, and the same over the common support S
  double Aout = 0;         // the same over the tokens outside S (a sum of non-negative terms)
  double Sd = 0, Sd2 = 0;  // sum over S of e^{w/T - cw} d and of e^{w/T - cw} d^2 (not swapped)
};
struct Moments {
  double S = 0, Su = 0, Sd = 0, Sd2 = 0, Sd3 = 0;  // Sd3 = sum e_i (d_i - d0)^3
};
struct Phi {
  double Phi = 0, Sig = 0;
  double S1 = 0, S2 = 0, S3 = 0, S4 = 0, S5 = 0;  // with moments: sum_S p_i (d_i - d0)^k
};
struct Max {
  double y = -INFINITY, d = 0;
};
struct GradSums {
  double SG = 0, SGd = 0, S = 0, Sd = 0, Sd2 = 0;
};

constexpr int kMaxIter = 100;
constexpr double kRtol = 1e-12;  // |KL - eps| <= kRtol eps at the root (KL by the phi pass)
// Su/S - log S has an absolute rounding floor of a few 1e-16 (log S and log Q of sums of
// exponentials, each within 2 ulp): within kCheapRtol eps + kCheapAtol of eps it can no longer
// tell where the root is, and the exact form takes over.
constexpr double kCheapRtol = 1e-8;
constexpr double kCheapAtol = 1e-14;
// |h| from which the next evaluation is the exact form only: after a Newton step (next
// h = O(h^2)) and after a Halley step (O(h^3)), so that the next h is expected within
// kLastPoly when the derivatives of h are of the order of the first (a miss costs one more
// pass, never accuracy).
constexpr double kPhiOnly = 1e-3;
constexpr double kPhiOnlyHalley = 5e-3;
constexpr double kLastStep = 1e-8;  // |h| below which the last Newton step needs no new pass
// |h| below which the last step from the Taylor polynomial of g about t (an exact-form
// evaluation with the cumulants of pi~ up to the fifth at the same t) needs no new pass:
// error O(h^5), ~1e-15 relative at most.
constexpr double kLastPoly = 1e-3;

// The host's and the device's libm, one spelling for both (std::min/max semantics kept).
TRMATH_SOLVE double s_log(double x) { return ::log(x); }
TRMATH_SOLVE double s_exp(double x) { return ::exp(x); }
TRMATH_SOLVE double s_expm1(double x) { return ::expm1(x); }
TRMATH_SOLVE double s_log1p(double x) { return ::log1p(x); }
TRMATH_SOLVE double s_abs(double x) { return ::fabs(x); }
TRMATH_SOLVE bool s_finite(double x) { return ::fabs(x) < double(INFINITY); }
TRMATH_SOLVE double s_max(double a, double b) { return a < b ? b : a; }
TRMATH_SOLVE double s_min(double a, double b) { return b < a ? b : a; }

// The first trial t from a model of the cumulant function of d under pi_old restricted to S,
// L(t) = log sum_S pi_old_i e^{t d_i} (the solver's Lambda less log Q), whose
// g(t) = KL(pi~_t || pi_old) = t L'(t) - L(t). Five of its values are known before any trial:
// L(0) = log pi_old(S), L'(0) and L''(0) (the mean and variance of d under pi_old on S, from
// the normaliser pass), L(1) = -log Q and L'(1) = KL(pi_new || pi_old) - log Q (pi_new lives on
// S when its KL is finite). The quartic p through them gives
//     G(t) = t p'(t) - p(t) = -L(0) + v0 t^2 / 2 + 2 c3 t^3 + 3 c4 t^4,
// G(0) = -log pi_old(S) < eps < G(1) = KL(pi_new || pi_old), and G(t) = eps is solved by a
// safeguarded Newton iteration on [0, 1] (no pass over the row). It is exact when d is Gaussian
// under pi_old (a quadratic L) and close whenever d's skewness varies slowly over [0, 1]; on
// rows with noise-like log-ratios it puts the first trial within |h| ~ 1e-5 of the root, against
// ~1e-2 for the small-difference guess t^2 KL = eps, and on sparse or peaked moves within ~1e-3
// against ~0.3. A poor model only costs evaluations: the bracketing below absorbs it.
struct Guess {
  bool ok = false;
  double t = 0, L0 = 0, m0 = 0, v0 = 0, c3 = 0, c4 = 0;
};
TRMATH_SOLVE double guess_lam(const Guess& q, double t) {
  return q.L0 + t * (q.m0 + t * (0.5 * q.v0 + t * (q.c3 + t * q.c4)));
}
TRMATH_SOLVE double guess_mu(const Guess& q, double t) {
  return q.m0 + t * (q.v0 + t * (3.0 * q.c3 + 4.0 * q.c4 * t));
}
TRMATH_SOLVE Guess model_guess(const Norm& nm, double logQ, double K1, double eps) {
  Guess q;
  if (!(nm.AwS > 0) || !s_finite(K1)) return q;
  q.m0 = nm.Sd / nm.AwS;
  q.v0 = s_max(nm.Sd2 / nm.AwS - q.m0 * q.m0, 0.0);
  q.L0 = s_log(nm.AwS / nm.Aw);
  const double L1 = -logQ;
  const double A = L1 - q.L0 - q.m0 - 0.5 * q.v0, B = K1 + L1 - q.m0 - q.v0;
  q.c4 = B - 3.0 * A;
  q.c3 = 4.0 * A - B;
  if (!(s_finite(q.m0) && s_finite(q.v0) && s_finite(q.c3) && s_finite(q.c4))) return q;
  double lo = 0.0, hi = 1.0;
  double t = s_min(s_max(s_exp(0.5 * (s_log(eps) - s_log(K1))), 1e-3), 0.999);
  for (int i = 0; i < 60; ++i) {
    const double G = -q.L0 + t * t * (0.5 * q.v0 + t * (2.0 * q.c3 + 3.0 * q.c4 * t)) - eps;
    if (G > 0) hi = t; else lo = t;
    const double dG = t * (q.v0 + t * (6.0 * q.c3 + 12.0 * q.c4 * t));
    double tn = t - G / dG;
    if (!(tn > lo && tn < hi)) tn = 0.5 * (lo + hi);  // also a zero or NaN dG
    const bool done = s_abs(tn - t) <= 1e-12 * t;
    t = tn;
    if (done) break;
  }
  q.t = t;
  q.ok = t > 0 && t < 1;
  return q;
}

// Forward of one row: k = the exact-KL kernel's statistics of the row (k[0] = lse_p, k[1] =
// lse_q, k[2] = KL(pi_new || pi_old)), status = its error bits.
//
// Per row: rows with KL <= eps take one pass that writes log_softmax(z / T) (eta = 0); otherwise
// one pass computes the old policy's float64 normaliser and its mass on the common support (the
// feasibility limit, and the first two moments of the log-ratio under it), then a bracketed
// iteration on h(u) = log KL(pi~_{e^u} || pi_old) - log eps in u = log eta (Newton's steps,
// Halley's where the third cumulant makes them safe) runs one pass per step (one exponential
// per element); near the root the constraint is evaluated in the cancellation-free phi-form,
// which alone may accept the root, and a last pass writes log pi~. The first trial comes from a
// model of the row (Guess above) and is evaluated in the phi-form with the cumulants of pi~ up
// to the fifth, from which a last step without another pass reaches the root when the model
// was within |h| <= kLastPoly. Typical rows: that one pass (besides the normaliser and output
// passes); rows with a few large moves, 1.5 to 1.7 passes.
template <class R>
TRMATH_SOLVE void forward_row(R& row, const double* k, int status, double eps) {
  const double kNaN = double(NAN), kInf = double(INFINITY);
  if (status & kErrorBits) return row.fail(0);
  const double K1 = k[2];
  const double lse_p = k[0];
  const double log_eps = s_log(eps);
  if (!(K1 > eps)) {
    // eta = 0: log_softmax(z / T). The exact-KL kernel forms lse_p as lse_q plus the centre of
    // the log-ratio, so it carries ulp(max(|lse_q|, |lse_p|)) absolute (1e-13 for logits
    // ~1e3 even when |log pi_new| ~ 1); one pass refines it to float64 accuracy about itself:
    // lse = lse_p + log sum_i e^{z_i/T - lse_p} (the sum is 1 + O(1e-13), exact to an ulp).
    const Norm np = row.norm(true, lse_p, 0.0);
    const double lse = lse_p + s_log(np.Aw);
    row.write(lse, k[1], 1.0, 0.0, true);
    const double st[kStats] = {0.0, 1.0, lse, k[1], 0.0, 0.0, 0.0, K1};
    return row.finish(st);
  }
  // The solver works with b_i = w_i/T - lq, lq = the exact-KL kernel's normaliser, and
  // Q = sum_i e^{b_i} from the norm pass (the same b_i, so Q is the exact normaliser of the
  // b_i as rounded): pi_old_i = e^{b_i} / Q and g = Su/S - log S + log Q. Folding the rounding
  // of log Q into a rounded lse_q instead would move g by up to ulp(lse_q) absolute (1e-13 for
  // logits ~1e3: 1e-5 relative at eps = 1e-8). The per-element roundings of b_i perturb pi_old
  // by ~ulp(w/T) relative, which moves g by at most TV(pi~, pi_old) times that.
  const double lq = k[1], cd = lse_p - lq;
  const Norm nm = row.norm(false, lq, cd);
  const double logQ = s_log(nm.Aw);
  // The backward's normaliser of pi_old; its d is the solver's plus log Q, so the stored Lambda
  // and mu are shifted to match (b + t d moves by -(1 - t) log Q).
  const double lse_q_stat = lq + logQ;
  // Infeasible: g(eta) -> -log pi_old(S) as eta -> inf.
  const double lim = nm.AwS > 0 ? -s_log(nm.AwS / nm.Aw) : kInf;
  if (!(lim < eps)) return row.fail(kInfeasible);
  const double lse_q = lq;
  const Guess guess = model_guess(nm, logQ, K1, eps);
  // One evaluation of g = KL(pi~_t || pi_old) and the moments at t. Accuracy: with
  // u_i = t d_i - c, g = Su/S - log S = E~[u] - log S is evaluated as the difference of two
  // numbers of size |log S| + E~|u|, so its absolute error is a few ulps of that (plus the
  // relative rounding of the sums). The rounding of each u_i itself (|t d_i| may be ~1e4) is
  // harmless: it is a consistent perturbation of the input (the same u_i enters e_i and e_i u_i)
  // and dg/du_i = pi~_i (r_i - g) with r_i = log(pi~_i / pi_old_i), so it moves g by at most
  // ulp(t d) (E~|r| + g) ~ ulp(t d) sqrt(2 g). Hence c must be close to Lambda(t) (|log S| small):
  //   * the first evaluation takes the model's Lambda (Guess), or else the tangent of Lambda at
  //     t = 1 (for finite KL(pi_new||pi_old));
  //   * any whose S left [1e-250, 1e250] (and the first where KL = +inf) is redone with
  //     c = max_i (b_i + t d_i) (a max pass, no exponential): 1 <= S <= V, |log S| <= log V;
  //   * later ones predict c by the tangent Lambda(t') + mu (t - t'), a lower bound of the convex
  //     Lambda, so S >= 1 up to rounding and log S = O(Var dt^2) -> 0 as Newton converges;
  //   * a converged g with |log S| > 1 is re-evaluated at c = Lambda before it is accepted.
  // The moments are centred at d0 (the previous mu, or d at the maximum of b + t d at the first
  // evaluation): Var = Sd2/S - (Sd/S)^2 loses about (mean / sd)^2 ulps, at most V ulps at the
  // first evaluation (the maximum carries >= 1/V of the mass, so mean^2 <= V Var) and O(1) once
  // d0 = mu. A poor Var only slows the iteration: Newton steps are taken inside a bracket.
  // k3: the third cumulant of d under pi~_t (Lambda'''), for Halley's step and the Taylor
  // predictions of Lambda, mu and Var.
  double t = 1.0, lam = 0.0, mu = 0.0, var = 0.0, k3 = 0.0, k4 = 0.0, k5 = 0.0, g = 0.0, logS = 0.0;
  bool have = false;     // lam, mu valid at t
  bool moments = false;  // mu, var, k3, k4, k5 computed at t by an exact-form pass
  auto eval = [&](double tn, bool force_max) {
    double c, d0;
    if (have && !force_max) {
      c = lam + mu * (tn - t);
      d0 = mu;
    } else if (guess.ok && !force_max) {
      // The model's Lambda and mu at t (see Guess): S ~ 1 to the model's accuracy.
      c = guess_lam(guess, tn) + logQ;
      d0 = guess_mu(guess, tn);
    } else if (s_finite(K1) && !force_max) {
      // The tangent at t = 1 (Lambda(1) = log pi_new(S) = 0, Lambda'(1) = E_new[d] = K1):
      // S = e^{Lambda(t) + (1 - t) K1} lies in [1, e^{(1 - t) K1}] -- close to 1 on typical
      // rows, and the max pass below takes over where it would overflow.
      c = -(1.0 - tn) * K1;
      d0 = K1;
    } else {
      const Max mx = row.max(lse_q, cd, tn);
      c = mx.y;
      d0 = mx.d;
    }
    Moments m = row.interp(lse_q, cd, tn, c, d0);
    if (!(m.S >= 1e-250 && m.S <= 1e250) && !force_max) {
      const Max mx = row.max(lse_q, cd, tn);
      c = mx.y;
      d0 = mx.d;
      m = row.interp(lse_q, cd, tn, c, d0);
    }
    logS = s_log(m.S);
    const double mean = m.Sd / m.S, m2 = m.Sd2 / m.S;
    g = m.Su / m.S - logS + logQ;
    t = tn;
    lam = c + logS;
    mu = d0 + mean;
    var = s_max(m2 - mean * mean, 0.0);
    k3 = m.Sd3 / m.S - mean * (3.0 * m2 - 2.0 * mean * mean);
    have = true;
    moments = false;
  };
  // g at the current t in the cancellation-free form of the phi pass (no absolute floor): used
  // to accept the root, once the pass above has brought g to its own floor. lam may be a Taylor
  // prediction (or the model's): the pass returns its correction delta (see project.hpp). It
  // also gives the moments of pi~ about the current mu (mu, Var and the cumulants k3, k4, k5 at
  // t, for the last step; central moments about d0 ~ mu, so no cancellation to speak of);
  // P_over = sum_S p_i / A_S, how far lam was from Lambda(t).
  double P_over = 1.0;
  auto g_exact = [&]() {
    const double d0 = mu;
    const Phi f = row.phi(lse_q, cd, t, lam - logQ, true, d0);
    const double P = nm.AwS + f.Sig;
    const double x = (f.Sig - nm.Aout) / nm.Aw;
    lam += s_log1p(x);
    P_over = P / nm.AwS;
    const double m1 = f.S1 / P, m2 = f.S2 / P, m3 = f.S3 / P, m4 = f.S4 / P, m5 = f.S5 / P;
    const double m1s = m1 * m1;
    mu = d0 + m1;
    var = s_max(m2 - m1s, 0.0);
    k3 = m3 - m1 * (3.0 * m2 - 2.0 * m1s);  // the third central moment
    const double c4 = m4 - 4.0 * m1 * m3 + 6.0 * m1s * m2 - 3.0 * m1s * m1s;
    const double c5 = m5 - 5.0 * m1 * m4 + 10.0 * m1s * m3 - 10.0 * m1s * m1 * m2 + 4.0 * m1s * m1s * m1;
    k4 = c4 - 3.0 * var * var;
    k5 = c5 - 10.0 * k3 * var;
    moments = true;
    have = true;
    return (f.Phi + f.Sig) / P - s_log1p(x);
  };
  if (!s_finite(K1)) {
    // pi_old = 0 where pi_new > 0. As eta -> 0+ the projection tends to pi_new restricted to
    // the common support; if that is already in the ball it is the solution (eta = 0+).
    eval(1.0, true);
    g = g_exact();
    if (g <= eps) {
      row.write(lse_p, lse_q, 1.0, lam, false);
      const double st[kStats] = {0.0, 1.0, lse_p, lse_q_stat, lam, mu + logQ, var, K1};
      return row.finish(st);
    }
  }
  // Root of h(u) = log g(e^u) - log eps, decreasing in u = log eta (h > 0: eta too small).
  // Initial guess from g ~ t^2 K1 (exact to first order when pi_new is close to pi_old; it can
  // be far off for distant rows, which the bracketing below absorbs); eta = 1 when K1 = +inf.
  // Without a model (KL = +inf, or a degenerate row), the start is the small-difference guess
  // g ~ t^2 KL.
  double u = guess.ok ? s_log((1.0 - guess.t) / guess.t)
             : s_finite(K1) ? s_log(s_max(s_expm1(0.5 * (s_log(K1) - log_eps)), 1e-300)) : 0.0;
  u = s_min(s_max(u, -700.0), 700.0);
  // Safeguards: [lo, hi] brackets the root once both ends are finite. While it is open, a
  // Newton step (limited to 30 in u) or, without a usable derivative, a step that doubles each
  // time (2, 4, 8, ...) searches for the other end; once closed, Newton is taken only when it
  // lands inside and the step is at most half the one before last, else the bracket is
  // bisected (so its width at least halves every two evaluations). t = 1/(1 + e^u) is a smooth
  // function of u on the whole line, so bisection in u reaches float64 resolution of eta.
  double lo = -kInf, hi = kInf, eta = s_exp(u), walk = 2.0;
  double dx = kInf, dxold = kInf;
  bool phi_only = false;
  for (int it = 0; it < kMaxIter; ++it) {
    eta = s_exp(u);
    const double tn = 1.0 / (1.0 + eta);
    const bool width = (hi - lo) <= 4e-16 * s_max(s_abs(u), 1.0);
    bool exact = phi_only;
    if (it == 0 && guess.ok) {
      // The first evaluation in the exact form, about the model's Lambda and mu: a row whose
      // model is close (|h| <= kLastPoly) ends after this one pass. If the model's Lambda was
      // so far off that the pass's sums left a safe range, the fused pass takes over.
      t = tn;
      lam = guess_lam(guess, tn) + logQ;
      mu = guess_mu(guess, tn);
      g = g_exact();
      exact = s_finite(g) && g >= 0 && P_over >= 1e-200 && P_over <= 1e200;
      if (!exact) {
        have = false;
        eval(tn, false);
        exact = width || s_abs(g - eps) <= kCheapRtol * eps + kCheapAtol;
        if (exact) g = g_exact();
      }
    } else if (phi_only) {
      // After a Newton step from |h| <= kPhiOnly (a Halley step from |h| <= kPhiOnlyHalley):
      // the next h is expected to be O(h^2) (O(h^3)), within the last-step range, so only the
      // exact form is evaluated, about the Taylor prediction of Lambda (corrected by the pass)
      // and of mu (the centre of the pass's moments, which give mu, Var, k3, k4, k5 at t).
      const double dt = tn - t, k4m = moments ? k4 : 0.0;
      lam += dt * (mu + dt * (0.5 * var + dt * (k3 / 6.0 + dt * (k4m / 24.0))));
      mu += dt * (var + dt * (0.5 * k3 + dt * (k4m / 6.0)));
      t = tn;
      g = g_exact();
    } else {
      eval(tn, false);
      // Near the root (g within its absolute floor of eps) g is re-evaluated exactly, and only
      // that value may end the iteration.
      exact = width || s_abs(g - eps) <= kCheapRtol * eps + kCheapAtol;
      if (exact) g = g_exact();
    }
    phi_only = false;
    const double h = s_log(g) - log_eps;  // -inf or NaN if g underflowed or rounded to <= 0
    const double dh = -eta * t * t * t * var / g;
    const bool newton_ok = dh < 0 && s_finite(dh) && s_finite(h);
    // The last step from the Taylor polynomial of g about t in dt (g' = t Lambda''):
    //   g(t + x) = g + t Var x + (Var + t k3) x^2/2 + (k3 + t k4/2) x^3/3 + (k4/2 + t k5/6) x^4/4,
    // solved for g(t + x) = eps by Newton's method from x0 = (eps - g)/(t Var); truncation
    // O(x^5). Trusted only when it moves the Newton step x0 by less than a fifth.
    double x_poly = kNaN;
    if (newton_ok && moments && s_abs(h) <= kLastPoly * s_min(1.0, -dh) && var > 0) {
      const double a1 = t * var, a2 = 0.5 * (var + t * k3), a3 = (k3 + 0.5 * t * k4) / 3.0;
      const double a4 = 0.25 * (0.5 * k4 + t * k5 / 6.0);
      const double x0 = (eps - g) / a1;
      double x = x0;
      for (int k = 0; k < 6; ++k) {
        const double F = (g - eps) + x * (a1 + x * (a2 + x * (a3 + x * a4)));
        const double dF = a1 + x * (2.0 * a2 + x * (3.0 * a3 + x * 4.0 * a4));
        x -= F / dF;
      }
      if (s_finite(x) && s_abs(x - x0) <= 0.2 * s_abs(x0)) x_poly = x;
    }
    const bool last = (newton_ok && s_abs(h) <= kLastStep * s_min(1.0, -dh)) || s_finite(x_poly);
    if (exact && (last || width || s_abs(g - eps) <= kRtol * eps)) {
      if (!last) break;
      // Last step without another pass (also taken when g already meets the tolerance, so that
      // eta carries only the rounding error of g, not the tolerance): the polynomial's from
      // |h| <= kLastPoly (error O(h^5)), else Newton's from |h| <= kLastStep (error O(h^2)):
      // below 1e-15 relative either way. eta = (1 - t')/t' with 1 - t' = eta t - x (no
      // cancellation as t' -> 1). Lambda and mu at the new t from their Taylor series
      // (dLambda/dt = mu, dmu/dt = Var, then k3, k4, k5), truncation O(dt^6) and O(dt^5) with
      // |dt| <~ 1e-3 t (O(dt^3), O(dt^2) with |dt| <~ 1e-8 t after a fused pass, which has no
      // k4, k5); the backward recomputes Lambda, mu and Var exactly at the stored t.
      double un = u - h / dh;
      if (s_finite(x_poly)) {
        const double etap = (eta * t - x_poly) / (t + x_poly);
        if (etap > 0) un = s_log(etap);
      }
      const double etan = s_exp(un), tn2 = 1.0 / (1.0 + etan), dt = tn2 - t;
      const double k4m = moments ? k4 : 0.0, k5m = moments ? k5 : 0.0;
      lam += dt * (mu + dt * (0.5 * var + dt * (k3 / 6.0 + dt * (k4m / 24.0 + dt * (k5m / 120.0)))));
      mu += dt * (var + dt * (0.5 * k3 + dt * (k4m / 6.0 + dt * (k5m / 24.0))));
      u = un;
      eta = etan;
      t = tn2;
      break;
    }
    if (h > 0) lo = u; else hi = u;
    // Newton's step, refined to Halley's with h'' from the third cumulant where that changes it
    // by at most a factor 2 (h'' in u: with t_u = -eta t^2, t_uu = eta t^2 (1 - 2t),
    // g_t = t Var, g_tt = Var + t k3: h'' = (g_tt t_u^2 + g_t t_uu) / g - h'^2).
    double step = newton_ok ? -h / dh : kNaN;
    double phi_from = kPhiOnly;
    if (newton_ok) {
      const double tu = -eta * t * t, tuu = eta * t * t * (1.0 - 2.0 * t);
      const double h2 = ((var + t * k3) * tu * tu + t * var * tuu) / g - dh * dh;
      const double den = 1.0 + step * h2 / (2.0 * dh);
      if (den >= 0.5 && den <= 2.0) {
        step /= den;
        phi_from = kPhiOnlyHalley;
      }
    }
    const double cand = u + step;
    if (s_finite(lo) && s_finite(hi)) {
      if (newton_ok && cand > lo && cand < hi && s_abs(2.0 * step) <= dxold) {
        dxold = dx;
        dx = s_abs(step);
        u = cand;
        phi_only = s_abs(h) <= phi_from * s_min(1.0, -dh);
      } else {
        dxold = dx;
        dx = 0.5 * (hi - lo);
        u = lo + dx;
      }
    } else if (newton_ok && s_finite(cand) && cand > lo && cand < hi) {
      u += s_min(s_max(step, -30.0), 30.0);
      phi_only = s_abs(h) <= phi_from * s_min(1.0, -dh);
    } else {
      u = h > 0 ? u + walk : u - walk;
      walk *= 2.0;
    }
    u = s_min(s_max(u, -740.0), 705.0);  // eta stays a positive finite double
  }
  row.write(lse_p, lse_q, t, lam, false);
  const double st[kStats] = {eta, t, lse_p, lse_q_stat, lam - (1.0 - t) * logQ, mu + logQ, var, K1};
  row.finish(st);
}

// What the backward's write pass needs beyond the forward's statistics.
struct GradPlan {
  bool inside;     // pi_new restricted to the common support (eta = 0 with KL = +inf)
  double cd;       // lse_p - lse_q
  double lam, mu;  // exact Lambda and mu at the forward's t
  double SG;       // sum of the incoming gradient over the support
  double kappa;    // the implicit term's coefficient (0 off the ball's boundary)
};

// Backward of one row (implicit gradient), given the forward's statistics S and the sums of the
// first backward pass q (row.grad_sums(cd, inside)), which the caller computes with
// grad_first(S) below. See docs/theory/projections.rst.
TRMATH_SOLVE bool grad_inside(const double* S) { return !(S[0] > 0) && s_finite(S[7]); }
TRMATH_SOLVE GradPlan grad_plan(const double* S, const GradSums& q) {
  const double eta = S[0], t = S[1], lam = S[4], mu = S[5];
  GradPlan p;
  p.inside = grad_inside(S);
  p.cd = S[2] - S[3];
  p.lam = lam;
  p.mu = mu;
  p.SG = q.SG;
  p.kappa = 0.0;
  if (!p.inside && eta > 0) {
    // Exact Lambda, mu and Var at the forward's t (the forward may have skipped the last pass).
    const double m1 = q.Sd / q.S, var = q.Sd2 / q.S - m1 * m1;
    p.lam = lam + s_log(q.S);
    p.mu = mu + m1;
    p.kappa = (q.SGd - q.SG * m1) / (t * var);
  }
  return p;
}

}  // namespace projsolve
}  // namespace trmath
