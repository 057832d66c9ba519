// trmath: per-row decisions and final formulas of the pair reductions, shared by the CPU
// (cpp/src/kernels_fwd.cpp) and CUDA (cpp/src/cuda_exact.cu) drivers. Scalar double code, host and
// device; the element sums it consumes are the drivers' own.
//
// Slots of the row sums s[] (q-units, about the centre m + mlo, see exact.hpp):
//   0 A_w = sum qt, 1 Z1 A_w = sum q (e^x - 1), 7 R = sum of pt where q = 0 < p, then
//   KL: 2 Phi;  TV: 2 T+, 3 Q+, 4 P+, 5 P-, 6 P0, 8 Q-, 9 Q0;  JS: 2 both halves, 3 q's half
//   (0 where no backward will run).
#pragma once

#include <cmath>

#include "trmath/config.hpp"

// Internal linkage: the CPU kernels are compiled once per instruction set, and no copy of these
// may be shared between those objects.
#define TRMATH_ROW static TRMATH_HD

namespace trmath {

// psi(u) = log1p(u) - u / (1 + u) >= 0, accurate for small |u| (series) and elsewhere.
TRMATH_ROW double psi_log1p(double u) {
  if (std::fabs(u) < 1e-3) {
    // sum_{n>=2} (-1)^n (n-1) u^n / n
    double s = 0.0, p = u * u;
    for (int n = 2; n <= 8; ++n) {
      s += ((n % 2 == 0) ? 1.0 : -1.0) * (n - 1) * p / n;
      p *= u;
    }
    return s;
  }
  return std::log1p(u) - u / (1.0 + u);
}

// Rounding residual of the centre m when it is fl(Mz - Mw): Mz - Mw = m + residual exactly.
TRMATH_ROW double centre_residual(double Mz, double Mw, double m) {
  double sm = Mz - Mw, bb = sm - Mz;
  return (sm == m) ? (Mz - (sm - bb)) + (-Mw - bb) : 0.0;
}

// Is a full pass accurate enough at its centre? Otherwise move the centre (mlo += T log G) and
// return false. op: 0 KL, 1 TV, 2 JS. wide: float64 inputs (tighter targets). amp (KL only):
// the factor by which merging partial sums about different centres amplified the rounding of
// Phi's terms (mag / Phi for the first pass; 1 for a pass at one centre).
TRMATH_ROW bool pair_accept(int op, bool wide, double T, const double* s, int flags, double& mlo,
                            double amp = 1.0) {
  const double Aw = s[0], Z1 = s[1] / Aw;
  if (op == 0) {
    if (flags & kQZeroP) return true;  // KL = +inf
    double E = 1.0 + Z1, A = (s[2] / Aw) / E, B = psi_log1p(Z1);
    // KL = A - B with c = B / A. A carries the terms' relative rounding eps (~1.2e-7 in float)
    // times amp; B carries that of Z1 (absolute ~eps E_q|e^x - 1|), about eps (2c + 2 sqrt(c (1
    // - c))) A since Z1^2 / 2 ~ c A and the spread of x is ~ sqrt(2 KL). The relative error of KL
    // is then about eps (amp / (1 - c) + (2c + 2 sqrt(c (1 - c))) / (1 - c)). Accepted: c <= 0.6
    // (at most two bits lost; the first pass also needs amp <= 32, see the callers), or c <= 0.9
    // with that factor at most 85.5 -- its value at the corner amp = 32, c = 0.6 of the first
    // rule, so no accepted row is worse than the first rule allows (<= 1e-5 relative in float).
    if (B <= 0.6 * A) return true;
    if (B <= 0.9 * A) {
      const double c = B / A, g = 2.0 * (c + std::sqrt(c * (1.0 - c)));
      if (amp + g <= 85.5 * (1.0 - c)) return true;
    }
    mlo += T * std::log1p(Z1);
    return false;
  }
  const double R = s[7] / Aw, Zt = Z1 + R, G = 1.0 + Zt;
  if (op == 1) {
    double tv = std::fmax((s[2] / Aw - Zt * (s[3] / Aw)) / G, 0.0) + R / G;
    // Tokens whose log-ratio lies between 0 and log G are misclassified; their total error is
    // at most |Zt| (all q-mass in that band). Zt itself is known to ~1.2e-7 E_q|e^x - 1| ~
    // 2.4e-7 TV (float terms), so 1e-6 TV is always reachable in one re-centring; tighter
    // would only chase rounding noise.
    if (std::fabs(Zt) <= (wide ? 1e-13 : 1e-6) * tv || Zt == 0.0) return true;
    mlo += T * std::log1p(Zt);
    return false;
  }
  const double Lp = std::log1p(Zt);
  const double js = 0.5 * s[2] / Aw;
  // Ignoring the residual log G = Lp changes JS by ~Lp KL(p||m) + O(Lp^2): relative ~Lp.
  const double tol = wide ? 1e-13 : 1e-6;
  if (std::fabs(Lp) <= tol && Lp * Lp <= tol * js) return true;
  if (Lp == 0.0) return true;
  mlo += T * Lp;
  return false;
}

// TV's side terms s_j - sum_i p_i s_i for s_j = +1, -1, 0 (sd[0..2]) and the same for q
// (sd[3..5]) from a TV pass's sums s[] (q-units, slots as above): 2P- + P0, -(2P+ + P0), P- - P+,
// formed from the masses on each side (q = 0 < p counts on the + side), never as
// 1 - (P+ - P-) (which cancels).
TRMATH_ROW void tv_side_terms(const double* s, double* sd) {
  const double Aw = s[0], R = s[7] / Aw, G = 1.0 + (s[1] / Aw + R);
  const double Pp = (s[4] / Aw + R) / G, Pm = s[5] / Aw / G, P0 = s[6] / Aw / G;
  const double Qp = s[3] / Aw, Qm = s[8] / Aw, Q0 = s[9] / Aw;
  sd[0] = 2.0 * Pm + P0;
  sd[1] = -(2.0 * Pp + P0);
  sd[2] = Pm - Pp;
  sd[3] = 2.0 * Qm + Q0;
  sd[4] = -(2.0 * Qp + Q0);
  sd[5] = Qm - Qp;
}

// The divergence of a row and the statistics its backward needs (kPairStats = 12 values):
// [lse_p, lse_q, a, b, m, centre correction, (TV) 2P- + P0, -(2P+ + P0), P- - P+, the same for
// q]. Rows with an error bit in flags get NaN everywhere.
TRMATH_ROW double pair_finish(int op, double T, const double* s, int flags, double Mz, double Mw, double m,
                             double mlo, double* stats) {
  const double nan = NAN, invT = 1.0 / T;
  double out = nan, lse_p = nan, lse_q = nan, sa = nan, sb = nan, clo = nan;
  double sd[6] = {nan, nan, nan, nan, nan, nan};
  if (!(flags & kErrorBits)) {
    const double Aw = s[0], Z1 = s[1] / Aw, R = s[7] / Aw, Zt = Z1 + R, G = 1.0 + Zt;
    if (stats) {  // (a forward that keeps no statistics skips their logarithms)
      lse_q = Mw * invT + std::log(Aw);
      lse_p = lse_q + (m + mlo) * invT + std::log1p(Zt);
      // Centre of the log-ratio the backward uses: the exact one (x - log G) for KL and JS;
      // for TV the one the forward classified signs at, so both passes agree. Plus the
      // centre's own rounding residual (m = fl(Mz - Mw)), as the forward used it.
      clo = (op == 1 ? mlo : mlo + T * std::log1p(Zt)) + centre_residual(Mz, Mw, m);
    }
    if (op == 0) {
      if (flags & kQZeroP) {
        out = INFINITY;
      } else {
        double E = 1.0 + Z1;
        out = std::fmax((s[2] / Aw) / E - psi_log1p(Z1), 0.0);
      }
      sa = out;
      sb = 0.0;
    } else if (op == 1) {
      // Both terms are >= 0 up to the (bounded) misclassification error; clamp the rounding.
      out = std::fmin(std::fmax((s[2] / Aw - Zt * (s[3] / Aw)) / G, 0.0) + R / G, 1.0);
      // a = P+ - P-, b = Q+ - Q-, and the backward's side terms (tv_side_terms).
      if (stats) {
        tv_side_terms(s, sd);
        sa = -sd[2];
        sb = -sd[5];
      }
    } else {
      // s[2]: both halves' terms, s[3]: q's (the value reads s[2] alone, so it is the same
      // whether or not the pass summed q's half for a backward).
      sa = (s[2] - s[3]) / Aw;
      sb = s[3] / Aw;
      // Every term is >= 0 in exact arithmetic; in float (16/32-bit inputs) the terms of a row
      // whose JS lies at the bottom of float's range (two near point masses on one token: JS ~
      // 1e-37) round with absolute errors of that size and may sum below 0. Clamped into
      // [0, log 2] as KL and TV are, without turning a NaN into a number.
      const double js = 0.5 * (s[2] / Aw);
      out = js < 0.0 ? 0.0 : (js > 0.69314718055994530942 ? 0.69314718055994530942 : js);
    }
  }
  if (stats) {
    stats[0] = lse_p;
    stats[1] = lse_q;
    stats[2] = sa;
    stats[3] = sb;
    stats[4] = m;
    stats[5] = clo;
    for (int j = 0; j < 6; ++j) stats[6 + j] = sd[j];
  }
  return out;
}

}  // namespace trmath
