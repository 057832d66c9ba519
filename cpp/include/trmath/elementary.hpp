// trmath: elementary functions for the lane policies, and scalar helpers.
//
// Error budget (float lanes). Every exponential is evaluated as
//     e^a = 2^n * P(r),   n = round(a / ln 2),   r = a - n ln 2,
// with a Cody-Waite reduction, so r carries no error from |a| (a logit gap of 80 in float
// would otherwise cost 80 * 2^-24 = 5e-6 relative). P is the degree-6 Chebyshev interpolant
// of e^r on |r| <= ln2/2 (relative error 2.5e-9; P(0) = 1 exactly) evaluated in float:
// |rel err| <= 2 ulp. The series of the float lanes (expm1 - x, JS halves, log1p) are
// Chebyshev interpolants too, of relative error <= 5.5e-9 (under a tenth of a float ulp) on
// the intervals where they are used; tools/gen_coefficients.py prints every error. They need
// 3 to 4 fewer terms than the Taylor series (kept for the double lanes and the CUDA kernels)
// and these polynomials are most of the float kernels' latency and operations.
#pragma once

#include <cmath>

#include "trmath/coefficients.hpp"
#include "trmath/vec.hpp"
#include "trmath/lanes16.hpp"

#if defined(__FMA__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace trmath {
namespace simd {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // 32 significant bits
constexpr double kLn2Lo = 1.90821492927058770002e-10;

// Estrin's scheme: the same polynomial with a dependency chain of depth ~log2(N) instead of N,
// so the out-of-order core overlaps the several polynomials of a step.
template <class V, int N>
TRMATH_INLINE V estrin(V x, const double (&c)[N]) {
  using S = typename std::remove_reference<decltype(x[0])>::type;
  V t[(N + 1) / 2];
  for (int k = 0; k < N / 2; ++k) t[k] = S(c[2 * k + 1]) * x + S(c[2 * k]);
  if (N % 2) t[N / 2] = splat<V>(S(c[N - 1]));
  int m = (N + 1) / 2;
  V xp = x * x;
  while (m > 1) {
    for (int k = 0; k < m / 2; ++k) t[k] = t[2 * k + 1] * xp + t[2 * k];
    if (m % 2) t[m / 2] = t[m - 1];
    m = (m + 1) / 2;
    xp = xp * xp;
  }
  return t[0];
}

template <class V, int N>
TRMATH_INLINE V horner(V x, const double (&c)[N]) {
  using S = typename std::remove_reference<decltype(x[0])>::type;
  V r = splat<V>(S(c[N - 1]));
  for (int k = N - 2; k >= 0; --k) r = r * x + S(c[k]);
  return r;
}

// log(1 + lo/hi) for 0 <= lo <= hi (0 where hi = 0): 2 atanh(s) with s = u / (2 + u) for
// u = lo/hi in [0, 1], formed as s = lo / (2 hi + lo) in [0, 1/3] with one division; c: the
// series of atanh(s)/s in s^2.
template <class V, int N>
TRMATH_INLINE V log1p_ratio_c(V lo, V hi, const double (&c)[N]) {
  using S = typename std::remove_reference<decltype(lo[0])>::type;
  V s = lo / (hi + hi + lo);
  s = hi > S(0) ? s : V{};
  return S(2) * s * estrin(s * s, c);
}

// 2^n * p for float lanes, n in [-160, 129]; two exact power-of-two factors keep every
// intermediate normal, so subnormal results round once.
TRMATH_INLINE f8 ldexp_f(f8 p, i8 n) {
  i8 n1 = n >> 1;
  i8 n2 = n - n1;
  f8 s1 = (f8)((n1 + 127) << 23);
  f8 s2 = (f8)((n2 + 127) << 23);
  return p * s1 * s2;
}

// Double lanes of any width (DV: 4 or 8 doubles, LV: the matching int64 lanes).
template <class DV, class LV>
TRMATH_INLINE DV ldexp_dv(DV p, LV n) {
  LV n1 = n >> 1;
  LV n2 = n - n1;
  DV s1 = (DV)((n1 + 1023) << 52);
  DV s2 = (DV)((n2 + 1023) << 52);
  return p * s1 * s2;
}

template <class DV, class LV>
TRMATH_INLINE DV exp_dv(DV a) {
  DV ac = a < -746.0 ? splat<DV>(-746.0) : a;
  ac = ac > 710.0 ? splat<DV>(710.0) : ac;
  const DV magic = splat<DV>(6755399441055744.0);
  DV t = ac * kLog2e + magic;
  DV nd = t - magic;
  DV r = ac - nd * kLn2Hi;  // exact: n*ln2_hi has 43 bits, and Sterbenz
  r = r - nd * kLn2Lo;
  DV p = estrin(r, coef::exp_dc);  // Chebyshev, degree 11: relative error 4.2e-18
  LV n = (LV)t - (LV)magic;
  DV res = ldexp_dv(p, n);
  return a < -745.2 ? splat<DV>(0.0) : res;
}

TRMATH_INLINE d4 ldexp_d(d4 p, l4 n) { return ldexp_dv(p, n); }
TRMATH_INLINE d4 exp_d(d4 a) { return exp_dv<d4, l4>(a); }
#if defined(TRMATH_HAVE_LANES16)
TRMATH_INLINE d8 exp_d(d8 a) { return exp_dv<d8, l8>(a); }
#endif

// True if any lane of the mask is set.
TRMATH_INLINE bool any_lane(i8 m) {
#if defined(__AVX2__)
  return _mm256_movemask_ps((__m256)m) != 0;
#else
  int r = 0;
  for (int i = 0; i < 8; ++i) r |= m[i];
  return r != 0;
#endif
}
TRMATH_INLINE bool any_lane(l4 m) {
#if defined(__AVX2__)
  return _mm256_movemask_pd((__m256d)m) != 0;
#else
  int64_t r = 0;
  for (int i = 0; i < 4; ++i) r |= m[i];
  return r != 0;
#endif
}

// True if every lane of the mask is set.
TRMATH_INLINE bool all_lanes(i8 m) {
#if defined(__AVX2__)
  return _mm256_movemask_ps((__m256)m) == 0xff;
#else
  int r = -1;
  for (int i = 0; i < 8; ++i) r &= m[i];
  return r != 0;
#endif
}
TRMATH_INLINE bool all_lanes(l4 m) {
#if defined(__AVX2__)
  return _mm256_movemask_pd((__m256d)m) == 0xf;
#else
  int64_t r = -1;
  for (int i = 0; i < 4; ++i) r &= m[i];
  return r != 0;
#endif
}

// ---- lane policies --------------------------------------------------------------------
// Float lanes form a logit gap a = (z - M)/T with one or two roundings (relative 2^-24 each)
// and exponentiate it with a Cody-Waite reduction (<= 2 ulp for an exact argument), so
// e^a carries a relative error of at most |a| 1.2e-7 + 2.4e-7. That is all the sums need:
//  * a sum of weights A = sum e^a (every term >= 0) is off by at most 1.2e-7 E_p|a| + 2.4e-7
//    relative, and E_p|a| <= H(p) <= log V (a_i >= log p_i, because A >= 1): <= 2e-6;
//  * the divergences are first-order insensitive to a perturbation of the weights that p and
//    q share: a relative change eta_i of q_i moves KL by O(eta eps^2), not O(eta eps), for
//    log-ratios eps (the two first-order terms, Cov_p(eta, eps) and sum (p - q) eta, cancel).
// The one quantity that must be exact to its last bit is the log-ratio x (KL ~ Var(x)/2 down
// to 1e-12): logratio() splits z - w exactly and reduces it about a centre held as three
// floats.
template <class V>
TRMATH_INLINE V finite_or_zero(V ref, V v) {
  return vabs(ref) < std::numeric_limits<float>::infinity() ? v : V{};
}

// Accumulate the float lanes of v into 4 double lanes (exact conversions, then sums).
TRMATH_INLINE d4 to_acc4(f8 v) {
  return __builtin_convertvector(lo_half(v), d4) + __builtin_convertvector(hi_half(v), d4);
}
#if defined(TRMATH_HAVE_LANES16)
TRMATH_INLINE d4 to_acc4(f16v v) {
  return (quarter16_d(v, 0) + quarter16_d(v, 1)) + (quarter16_d(v, 2) + quarter16_d(v, 3));
}
#endif

// Float lanes of any width: FloatLanes (8 lanes, AVX2 and the portable build) and FloatLanes16
// (16 lanes, the AVX-512 build's forward passes) run the same operations in every lane.
template <class In, class VT, class MaskT, template <class> class LoadT>
struct FloatLanesT {
  static constexpr int W = int(sizeof(VT) / sizeof(float));
  using V = VT;
  using Mask = MaskT;
  using S = float;
  using Wide = VT;
  using Storage = In;

  static TRMATH_INLINE V load(const In* p) { return LoadT<In>::load(p); }

  // (v - M) * invT: exact near the maximum (Sterbenz), else relative 2^-24 per rounding. M as
  // two floats keeps a float64 normaliser (the backward's) to float64 accuracy.
  // kUnitT: the caller knows T = 1 and the scaling (exact, but on the critical path) is skipped.
  template <bool kUnitT = false>
  static TRMATH_INLINE V shifted(V v, double M, double invT) {
    const float Mh = float(M), Ml = float(M - double(Mh));
    V s = (v - Mh) - Ml;
    return kUnitT ? s : s * float(invT);
  }
  // shifted() about a float value M (a row or segment maximum of the input itself, so the low
  // part is 0 and its subtraction is skipped).
  template <bool kUnitT = false>
  static TRMATH_INLINE V shifted_max(V v, double M, double invT) {
    V s = v - float(M);
    return kUnitT ? s : s * float(invT);
  }
  static TRMATH_INLINE V narrow(V a) { return a; }

  // x = (z - w - m - mlo) / T: z - w split exactly, then reduced about the centre.
  // kFinite: every z - w is finite (no -inf, no overflow), so the guard is not needed.
  template <bool kFinite = false, bool kUnitT = false>
  static TRMATH_INLINE V logratio(V z, V w, double m, double mlo, double invT, double = 0.0) {
    V d = z - w;
    V bb = d - z;
    V e = (z - (d - bb)) - (w + bb);
    if (!kFinite) e = finite_or_zero(d, e);
    // The centre as three floats (m = mh + ml exactly for a float-input centre, and the
    // re-centring correction mlo apart): a correction of 1e-19 must survive next to ml ~ 1e-7,
    // or the sign of p - q on a peaked row's top token is lost.
    const float mh = float(m), ml = float(m - double(mh)), mlf = float(mlo);
    V x = (d - mh) + ((e - ml) - mlf);
    return kUnitT ? x : x * float(invT);
  }

  // logratio() about two centres m + mlo1 and m + mlo2 at once (the exact split of z - w is
  // shared); each result is bitwise the one logratio() returns for its centre.
  template <bool kFinite = false, bool kUnitT = false>
  static TRMATH_INLINE void logratio2(V z, V w, double m, double mlo1, double mlo2, double invT,
                                      V& x1, V& x2) {
    V d = z - w;
    V bb = d - z;
    V e = (z - (d - bb)) - (w + bb);
    if (!kFinite) e = finite_or_zero(d, e);
    const float mh = float(m), ml = float(m - double(mh));
    const V dm = d - mh, em = e - ml;
    x1 = dm + (em - float(mlo1));
    x2 = dm + (em - float(mlo2));
    if constexpr (!kUnitT) {
      x1 = x1 * float(invT);
      x2 = x2 * float(invT);
    }
  }

  // e^a for a <= 88. Results below 2^-126 (a < -87.3) are flushed to 0: a probability under
  // 1e-38 changes no reduction by more than V * 1e-38, far below the 1e-30 absolute slack, and
  // this keeps every intermediate normal (subnormals would cost microcode assists).
  // zero: lanes whose result is set to 0 (folded into the power of two, so it costs no
  // operation after the polynomial).
  // kFloor: the caller knows a is finite (no masked token) and accepts e^-87 = 1.6e-38 in
  // place of any smaller result (V * 1.6e-38 <= 5e-33 in a sum of weights >= 1, under the
  // 1e-30 absolute slack); the flush to 0 and its compare are skipped.
  // kKeepNaN: a NaN argument gives NaN (the clamp's operands are swapped: vmax returns its second
  // operand for a NaN); otherwise it is clamped to -88 like any small argument.
  template <bool kFloor = false, bool kKeepNaN = false>
  static TRMATH_INLINE V exp(V a, Mask zero = Mask{}) {
    const V lo = splat<V>(kFloor ? -87.0f : -88.0f);
    V hi = kKeepNaN ? vmax(lo, a) : vmax(a, lo);
    const V magic = splat<V>(12582912.0f);  // 1.5 * 2^23
    V t = hi * float(kLog2e) + magic;
    V n = t - magic;
    Mask ni = (Mask)t - (Mask)magic;
    V r = hi - n * 0.693359375f;  // Cody-Waite: ln2_hi has 9 bits, n*ln2_hi is exact
    r = r - n * -2.12194440e-4f;
    V p = estrin(r, coef::exp_fc);
    if constexpr (!kFloor) zero |= a < -87.0f;
    return p * (V)andnot(zero, (ni + 127) << 23);
  }
  static TRMATH_INLINE V expm1_series(V x) { return x * horner(x, coef::expm1_f); }
  static TRMATH_INLINE V em2_series(V x) { return x * x * estrin(x, coef::em2_fc); }
  static TRMATH_INLINE V phi_series(V x) { return x * x * horner(x, coef::phi_f); }
  static TRMATH_INLINE V jsq_series(V x) { return x * x * estrin(x, coef::jsq_fc); }
  static TRMATH_INLINE V jsg_series(V u) { return estrin(u, coef::jsg_fc); }  // u = x^2 <= 1
  static constexpr double kJsRadius = 1.0;  // the JS series' interval, |x| < kJsRadius
  static TRMATH_INLINE V log1p_ratio(V lo, V hi) { return log1p_ratio_c(lo, hi, coef::log1p_fc); }
  // Accumulate the float terms into 4 double lanes.
  static TRMATH_INLINE d4 to_acc(V v) { return to_acc4(v); }
};

template <class In> using FloatLanes = FloatLanesT<In, f8, i8, Load8>;
#if defined(TRMATH_HAVE_LANES16)
template <class In> using FloatLanes16 = FloatLanesT<In, f16v, i16v, Load16>;
#endif


template <class In>
struct DoubleLanes {
  static constexpr int W = 4;
  using V = d4;
  using Mask = l4;
  using S = double;
  using Wide = d4;
  using Storage = In;

  static TRMATH_INLINE V load(const In* p) { return Load4<In>::load(p); }
  template <bool kUnitT = false>
  static TRMATH_INLINE d4 shifted(V v, double M, double invT) { return (v - M) * invT; }
  template <bool kUnitT = false>
  static TRMATH_INLINE d4 shifted_max(V v, double M, double invT) { return (v - M) * invT; }
  static TRMATH_INLINE V narrow(Wide w) { return w; }
  template <bool kFloor = false, bool = false>  // exp_d keeps NaN
  static TRMATH_INLINE V exp(Wide a, Mask zero = Mask{}) { return zero_where(zero, exp_d(a)); }
  // Series of 18-21 terms: Estrin's scheme (depth 5) rather than Horner's (a chain of 18-21
  // dependent multiply-adds, which made the float64 passes latency-bound at ~4x the cost of
  // the float32 ones). For |x| < 1 both are within a few ulps of the sum: the coefficients
  // decrease, so every partial polynomial is dominated by its low-order terms.
  static TRMATH_INLINE V expm1_series(V x) { return x * estrin(x, coef::expm1_d); }
  static TRMATH_INLINE V em2_series(V x) { return x * x * estrin(x, coef::em2_d); }
  static TRMATH_INLINE V phi_series(V x) { return x * x * estrin(x, coef::phi_d); }
  static TRMATH_INLINE V jsq_series(V x) { return x * x * estrin(x, coef::jsq_d); }
  static TRMATH_INLINE V jsg_series(V u) { return estrin(u, coef::jsg_d); }  // u = x^2 < 1/4
  static constexpr double kJsRadius = 0.5;
  static TRMATH_INLINE V log1p_ratio(V lo, V hi) { return log1p_ratio_c(lo, hi, coef::log1p_d); }
  static TRMATH_INLINE d4 to_acc(V v) { return v; }
  // x = (z - w - m) / T with z - w split exactly (two-sum): near-identical float64 rows have
  // log-ratios of 1e-8 next to logits of size 10, where a rounded z - w would cost 1e-8
  // relative accuracy in KL.
  // The centre is a double-double (m + mlo) for the same reason.
  // mres: the rounding residual of the centre m itself (m = fl(Mz - Mw)), kept apart from the
  // re-centring correction mlo so that a correction of 1e-32 is not lost next to it.
  template <bool kFinite = false, bool kUnitT = false>
  static TRMATH_INLINE V logratio(V z, V w, double m, double mlo, double invT, double mres = 0.0) {
    d4 s = z - w;
    d4 bb = s - z;
    d4 e = (z - (s - bb)) - (w + bb);
    if (!kFinite) e = vabs(s) < std::numeric_limits<double>::infinity() ? e : d4{};  // masked: x = +-inf, not NaN
    return (((s - m) + (e - mres)) - mlo) * invT;
  }
  template <bool kFinite = false, bool = false>  // the scaling by invT is kept (exact for T = 1)
  static TRMATH_INLINE void logratio2(V z, V w, double m, double mlo1, double mlo2, double invT,
                                      V& x1, V& x2) {
    d4 s = z - w;
    d4 bb = s - z;
    d4 e = (z - (s - bb)) - (w + bb);
    if (!kFinite) e = vabs(s) < std::numeric_limits<double>::infinity() ? e : d4{};
    const d4 c = (s - m) + (e - 0.0);
    x1 = (c - mlo1) * invT;
    x2 = (c - mlo2) * invT;
  }
};

}  // namespace simd
}  // namespace trmath
