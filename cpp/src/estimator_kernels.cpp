// trmath: the element kernels of the sampled KL estimators k1, k2, k3 (trmath/estimators.py)
// and of the binary coarse divergences binary_tv, binary_kl (trmath/coarse.py; formulas below).
// Compiled once per instruction set, like kernels_fwd.cpp; bind_estimators.cpp picks the copy
// matching the exact kernels in use.
//
// One read of both inputs and one write of each output, in double lanes (8 with AVX-512, else
// 4): the log-ratio lr = o - s is carried as an exact two-sum hi + lo (lo = 0 for 16/32-bit
// inputs, whose difference is exact in double; for float64 inputs of different magnitudes it
// holds what o - s rounded away), and every estimator is evaluated on it in double.
//
// Error argument for k3(x) = expm1(x) - x at x = hi (the tail lo enters at first order,
// k3(hi + lo) = k3(hi) + expm1(hi) lo):
//  * -1.6 <= x <= 2: the Taylor series x^2 sum_{j<25} x^j / (j+2)! by Horner (the first
//    neglected term is below 2^25 / 27! < 4e-21 of the sum). For x > 0 every term is positive;
//    for x < 0 the terms alternate and the rounding errors are amplified by at most
//    sum|terms| / |sum| = (e^|x| - 1 - |x|) / (e^-|x| - 1 + |x|) <= 2.8 on [-1.6, 0].
//  * 2 < x <= 700: with x = n ln2 + r (Cody-Waite, |r| <= ln2/2) and q = expm1(r) from the
//    series, k3 = 2^n q + ((2^n - 1) - x): 2^n - 1 is exact, the terms have the same sign or
//    cancel by less than a factor 2, and r's rounding moves e^x by 2^-55 relative.
//  * x < -1.6 (and x > 700): (e^x - 1) - x with the vector exponential of elementary.hpp
//    (within an ulp); for x < -1.6, e^x <= 0.2 and k3(x) >= 0.8, so its error is damped.
// The slope expm1(x): x + series for -0.7 < x <= 2 (amplification (|x| + k3) / |expm1 x| <=
// 1.8), 2^n q + (2^n - 1) on (2, 700], e^x - 1 elsewhere (amplification e^x / |e^x - 1| <= 1).
// Measured against mpmath (40 digits, 80000 random float64 log-ratios): k3 within 2 ulps,
// expm1 within 2 ulps; a float output then rounds once.
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#ifndef TRMATH_ISA
#error "TRMATH_ISA must be defined"
#endif
#define TRMATH_CAT2(a, b) a##b
#define TRMATH_CAT(a, b) TRMATH_CAT2(a, b)
#define simd TRMATH_CAT(simd_, TRMATH_ISA)

#include "estimator_args.hpp"
#include "trmath/ddouble.hpp"
#include "trmath/elementary.hpp"

#define TRMATH_NS TRMATH_CAT(isa_, TRMATH_ISA)

namespace trmath {
namespace TRMATH_NS {
namespace {

using namespace simd;

#if defined(TRMATH_HAVE_LANES16)
using DV = d8;
using LV = l8;
using FV = f8;
constexpr int kL = 8;
template <class In>
TRMATH_INLINE DV load_lanes(const In* p) { return load8_d(p); }
#else
using DV = d4;
using LV = l4;
using FV = f4;
constexpr int kL = 4;
template <class In>
TRMATH_INLINE DV load_lanes(const In* p) { return Load4<In>::load(p); }
#endif

// 1 / (j + 2)! for j = 0 .. 24, lowest degree first (horner() order).
constexpr double kK3[25] = {
    0.5, 0.16666666666666666, 0.041666666666666664, 0.008333333333333333, 0.001388888888888889,
    0.0001984126984126984, 2.48015873015873e-05, 2.7557319223985893e-06, 2.755731922398589e-07,
    2.505210838544172e-08, 2.08767569878681e-09, 1.6059043836821613e-10, 1.1470745597729725e-11,
    7.647163731819816e-13, 4.779477332387385e-14, 2.8114572543455206e-15, 1.5619206968586225e-16,
    8.22063524662433e-18, 4.110317623312165e-19, 1.9572941063391263e-20, 8.896791392450574e-22,
    3.8681701706306835e-23, 1.6117375710961184e-24, 6.446950284384474e-26, 2.4795962632247972e-27};
// The same for the reduced argument |r| <= ln2 / 2 of the upper branch (the first neglected
// term is below 0.35^13 / 15! < 1e-18 of the sum).
constexpr double kK3r[13] = {
    0.5, 0.16666666666666666, 0.041666666666666664, 0.008333333333333333, 0.001388888888888889,
    0.0001984126984126984, 2.48015873015873e-05, 2.7557319223985893e-06, 2.755731922398589e-07,
    2.505210838544172e-08, 2.08767569878681e-09, 1.6059043836821613e-10, 1.1470745597729725e-11};
constexpr double kSeriesLo = -1.6, kSeriesHi = 2.0;
constexpr double kUpHi = 700.0;  // above: e^x - 1 directly (it overflows from 709.8 on)

TRMATH_INLINE DV tail(DV a, DV lo) { return lo == 0.0 ? DV{} : a * lo; }

// expm1(x) from the branches' parts: x + series on (-0.7, 2], the reduced form on (2, 700],
// e^x - 1 elsewhere.
TRMATH_INLINE DV expm1_of(DV hi, DV series, DV em1, LV up, DV em1_up) {
  const DV e = (hi > -0.7) & (hi <= kSeriesHi) ? hi + series : em1;
  return up ? em1_up : e;
}

// What both directions compute from a vector of s and o: the log-ratio hi + lo and, if need_e,
// the parts of the k3 series and of expm1 (see the error argument at the top).
struct Lanes {
  DV hi, lo, series, em1, k3_up, em1_up;
  LV up;
};

// The parts of k3 and expm1 at hi (see the error argument at the top), into L.
TRMATH_INLINE void expm1_parts(DV hi, Lanes& L) {
  DV xs = hi < kSeriesLo ? splat<DV>(kSeriesLo) : hi;  // keeps the unused lanes finite
  xs = xs > kSeriesHi ? splat<DV>(kSeriesHi) : xs;
  L.series = xs * xs * horner(xs, kK3);
  const LV below = hi <= -0.7, above = hi > kSeriesHi;
  if (any_lane(below | above)) L.em1 = exp_dv<DV, LV>(hi) - 1.0;  // e^-inf = 0
  L.up = above & (hi <= kUpHi);
  if (any_lane(L.up)) {
    // 2 < x <= 700: x = n ln2 + r (|r| <= ln2 / 2, Cody-Waite), q = expm1(r) by its series,
    // e^x - 1 = 2^n q + (2^n - 1) and k3 = 2^n q + ((2^n - 1) - x): no rounded e^x whose
    // error (an ulp of e^x, up to 2 of k3 where e^x has crossed a power of two that k3 has
    // not) the subtraction would carry; each result is off by about an ulp.
    const DV x = L.up ? hi : splat<DV>(kSeriesHi + 1.0);
    const DV magic = splat<DV>(6755399441055744.0);
    const DV tt = x * kLog2e + magic;
    const DV nd = tt - magic;
    const DV r = (x - nd * kLn2Hi) - nd * kLn2Lo;
    const DV q = r + r * r * horner(r, kK3r);
    const LV n = (LV)tt - (LV)magic;
    const DV p2 = (DV)((n + 1023) << 52);  // 2^n, n in [3, 1010]
    const DV p2q = p2 * q, p2m1 = p2 - 1.0;
    L.k3_up = p2q + (p2m1 - x);
    L.em1_up = p2q + p2m1;
  }
}

TRMATH_INLINE Lanes lanes(DV sv, DV ov, bool need_e) {
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  // s = +-inf and o = +inf are not log-probabilities of sampled tokens: NaN from here on.
  sv = vabs(sv) == inf ? splat<DV>(nan) : sv;
  ov = ov == inf ? splat<DV>(nan) : ov;
  // lr = o - s = hi + lo exactly (two-sum); lo = 0 where hi is not finite.
  const DV hi = ov - sv;
  const DV bv = hi - ov;
  DV lo = (ov - (hi - bv)) + ((-sv) - bv);
  lo = (hi - hi) == 0.0 ? lo : DV{};
  Lanes L{hi, lo, DV{}, DV{}, DV{}, DV{}, LV{}};
  if (need_e) expm1_parts(hi, L);
  return L;
}

// Chunk of n elements given to one task of the pool.
constexpr int64_t kChunk = 16384;

// Runs body(begin, end) -> bool over [0, n) in chunks of `per` (kChunk by default) on the
// pool; true if any chunk returned true.
template <class Body>
bool over_chunks(int64_t n, const Body& body, int64_t per = kChunk) {
  const int64_t chunks = (n + per - 1) / per;
  if (chunks <= 1) return chunks == 1 && body(int64_t(0), n);
  std::vector<uint8_t> hit(size_t(chunks), 0);
  parallel_for(chunks, [&](int64_t c) {
    const int64_t b = c * per, e = b + per < n ? b + per : n;
    hit[size_t(c)] = body(b, e) ? 1 : 0;
  });
  for (uint8_t h : hit)
    if (h) return true;
  return false;
}

// body<In>(begin, end) for the dtype of the arguments.
#define TRMATH_BY_DTYPE(dt, fn, ...)                         \
  switch (dt) {                                             \
    case DType::f32: return fn<float>(__VA_ARGS__);         \
    case DType::f64: return fn<double>(__VA_ARGS__);        \
    case DType::bf16: return fn<bf16_t>(__VA_ARGS__);       \
    case DType::f16: return fn<f16_t>(__VA_ARGS__);         \
  }                                                         \
  return false;

// m <= kL elements from p as double lanes (the lanes past m hold +0).
template <class In>
TRMATH_INLINE DV load_part(const In* p, int m) {
  if (m == kL) return load_lanes(p);
  In t[kL];
  std::memset(static_cast<void*>(t), 0, sizeof t);  // +0 in every dtype
  std::memcpy(static_cast<void*>(t), p, size_t(m) * sizeof(In));
  return load_lanes(t);
}

// -1 in the lanes j < m whose valid[i + j] is set (every lane j < m without a mask).
TRMATH_INLINE LV keep_lanes(const uint8_t* valid, int64_t i, int m) {
  LV keep = splat<LV>(-1);
  if (valid)
    for (int j = 0; j < kL; ++j) keep[j] = (j < m && valid[i + j]) ? -1 : 0;
  return keep;
}

// k of the given kind at lr = hi + lo.
TRMATH_INLINE DV value_of(int kind, const Lanes& L) {
  const DV hi = L.hi, lo = L.lo;
  if (kind == 1) return -(hi + lo);
  if (kind == 2) return 0.5 * hi * hi + tail(hi, lo);
  const double inf = std::numeric_limits<double>::infinity();
  DV direct = hi == inf ? splat<DV>(inf) : L.em1 - hi;
  direct = L.up ? L.k3_up : direct;
  const DV base = (hi >= kSeriesLo) & (hi <= kSeriesHi) ? L.series : direct;
  return base + tail(expm1_of(hi, L.series, L.em1, L.up, L.em1_up), lo);
}

// The importance weight exp(s - b): s - b = hi + lo exactly (two-sum; lo = 0 for 16/32-bit
// inputs), e^hi (1 + lo), so that the rounding of s - b (up to half an ulp of |s - b|, 60 ulps
// of the weight at s - b ~ -78) does not reach it: within an ulp or two. s or b = +-inf count
// as NaN.
TRMATH_INLINE DV weight(DV sv, DV bv) {
  const double inf = std::numeric_limits<double>::infinity();
  const DV nanv = splat<DV>(std::numeric_limits<double>::quiet_NaN());
  sv = vabs(sv) == inf ? nanv : sv;
  bv = vabs(bv) == inf ? nanv : bv;
  const DV hi = sv - bv;
  const DV bb = hi - sv;
  DV lo = (sv - (hi - bb)) + ((-bv) - bb);
  const DV e = exp_dv<DV, LV>(hi);
  return (lo != 0.0) & (lo == lo) & (e < inf) ? e + e * lo : e;
}

// w k for the weight w of weight() (exactly positive and finite unless NaN) and an estimator
// value or slope k: where e^(s - b) under- or overflowed, the exact product is still 0 where
// k = 0 and infinite (k's sign) where k is infinite -- never 0 * inf = NaN.
TRMATH_INLINE DV wmul(DV w, DV k) {
  const double inf = std::numeric_limits<double>::infinity();
  DV r = w * k;
  r = (k == 0.0) & (w == w) ? DV{} : r;
  return (vabs(k) == inf) & (w == 0.0) ? k : r;
}

// d k / d lr of the given kind; NaN where an input was NaN (or became NaN), so that k1's
// constant slope does not hide it.
TRMATH_INLINE DV slope_of(int kind, const Lanes& L) {
  DV slope;
  if (kind == 1) {
    slope = splat<DV>(-1.0);
  } else if (kind == 2) {
    slope = L.hi + L.lo;
  } else {
    const DV ee = expm1_of(L.hi, L.series, L.em1, L.up, L.em1_up);
    slope = ee + tail(ee + 1.0, L.lo);
  }
  return L.hi != L.hi ? splat<DV>(std::numeric_limits<double>::quiet_NaN()) : slope;
}

// Stores m <= kL lanes as In (16-bit types through float, as torch converts from float64).
template <class In>
TRMATH_INLINE void store_part(In* p, DV v, int m) {
  if constexpr (std::is_same<In, double>::value) {
    std::memcpy(p, &v, size_t(m) * sizeof(double));
  } else {
    const FV f = __builtin_convertvector(v, FV);
    if constexpr (std::is_same<In, float>::value) {
      std::memcpy(p, &f, size_t(m) * sizeof(float));
    } else if constexpr (std::is_same<In, bf16_t>::value) {
      for (int j = 0; j < m; ++j) p[j].bits = float_to_bf16(f[j]);
    } else {
      for (int j = 0; j < m; ++j) p[j].bits = float_to_f16(f[j]);
    }
  }
}

template <class In>
bool run_backward(const KBwdArgs& a, int64_t begin, int64_t e) {
  const In* s = static_cast<const In*>(a.s);
  const In* o = static_cast<const In*>(a.o);
  const In* b = static_cast<const In*>(a.b);
  In* gs = static_cast<In*>(a.gs);
  In* go = static_cast<In*>(a.go);
  In* gb = static_cast<In*>(a.gb);
  const bool need_e = a.slope_kind == 3 || (b && a.value_kind == 3);
  const DV g0 = a.g_scalar ? splat<DV>(a.g64 ? *static_cast<const double*>(a.g) : double(*static_cast<const float*>(a.g)))
                           : DV{};
  for (int64_t i = begin; i < e; i += kL) {
    const int m = int(e - i < kL ? e - i : kL);
    const DV sv = load_part(s + i, m), ov = load_part(o + i, m);
    const LV keep = keep_lanes(a.valid, i, m);
    DV g = g0;
    if (!a.g_scalar)
      g = a.g64 ? load_part(static_cast<const double*>(a.g) + i, m) : load_part(static_cast<const float*>(a.g) + i, m);
    const Lanes L = lanes(sv, ov, need_e);
    if (!b) {
      DV d = g * slope_of(a.slope_kind, L);
      if (a.valid) d = keep ? d : DV{};
      if (go) store_part(go + i, d, m);
      if (gs) store_part(gs + i, -d, m);
      continue;
    }
    const DV w = weight(sv, load_part(b + i, m));
    const DV gwk = g * wmul(w, value_of(a.value_kind, L)), gws = g * wmul(w, slope_of(a.slope_kind, L));
    const DV zero{};
    if (go) store_part(go + i, a.valid ? (keep ? gws : zero) : gws, m);
    if (gs) store_part(gs + i, a.valid ? (keep ? gwk - gws : zero) : gwk - gws, m);
    if (gb) store_part(gb + i, a.valid ? (keep ? -gwk : zero) : -gwk, m);
  }
  return false;
}

// Returns whether validation (a.check) found a bad entry in [begin, e).
template <class In>
bool run(const KArgs& a, int64_t begin, int64_t e) {
  const In* s = static_cast<const In*>(a.s);
  const In* o = static_cast<const In*>(a.o);
  const In* b = static_cast<const In*>(a.b);
  const double inf = std::numeric_limits<double>::infinity();
  const bool need_e = a.value_kind == 3 || (a.slope != nullptr && a.slope_kind == 3);
  LV bad{};
  for (int64_t i = begin; i < e; i += kL) {
    const int m = int(e - i < kL ? e - i : kL);
    const DV sv = load_part(s + i, m), ov = load_part(o + i, m);
    const LV keep = keep_lanes(a.valid, i, m);
    if (a.check)  // padding lanes hold +0 (a valid value)
      bad |= keep & ((sv != sv) | (sv > a.tol_s) | (sv == -inf) | (ov != ov) | (ov > a.tol_o));
    const Lanes L = lanes(sv, ov, need_e);
    DV val = value_of(a.value_kind, L);
    if (b) {
      const DV bv = load_part(b + i, m);
      if (a.check) bad |= keep & ((bv != bv) | (bv > a.tol_b) | (bv == -inf));
      val = wmul(weight(sv, bv), val);
    }
    DV slope = a.slope ? slope_of(a.slope_kind, L) : DV{};
    if (a.valid) {
      val = keep ? val : DV{};
      slope = keep ? slope : DV{};
    }
    if (a.value64) {
      std::memcpy(static_cast<double*>(a.value) + i, &val, size_t(m) * sizeof(double));
    } else {
      const FV vf = __builtin_convertvector(val, FV);
      std::memcpy(static_cast<float*>(a.value) + i, &vf, size_t(m) * sizeof(float));
    }
    if (a.slope) std::memcpy(a.slope + i, &slope, size_t(m) * sizeof(double));
  }
  return any_lane(bad);
}

// ---- the binary coarse divergences ----------------------------------------------------------
// p = e^lp, q = e^lq, and for KL the tails R_p = 1 - p = -expm1(lp), R_q = -expm1(lq):
//   delta = p - q = sign(lp - lq) e^max(lp, lq) (-expm1(-|lp - lq|))  (never p and q rounded
//     and subtracted);  binary_tv = |delta| (clamped to [0, 1]);
//   binary_kl = p g(d) + R_p g(d_R),  g(x) = expm1(x) - x >= 0,  d = lq - lp,
//     d_R = log(R_q / R_p) = log1p(delta / R_p) where |delta / R_p| <= 1/2, else the log of the
//     ratio of the two accurate tails (|d_R| >= log 1.5 there); each term as w g(d) by the series
//     where |d| < 1, else w' - w (1 + d) (w' = w e^d, the other policy's mass: no cancellation
//     beyond a factor e/2), never negative.
// Conventions (as the torch formulas of trmath/_coarse_impl.py): p = 0 gives the term q; q = 0 <
// p gives +inf; R_p = 0 gives the tail R_q; R_q = 0 < R_p gives +inf. Gradients:
//   tv: d/dlp = s p, d/dlq = -s q (s = sign delta);
//   kl: d/dlp = p (d_R - d), d/dlq = -delta + q expm1(-d_R).
// Every function here is within a few float64 ulps (log and log1p by the atanh series of
// elementary.hpp, expm1 as above), far inside the 1e-12 target of float64 inputs.

// log(x) for x > 0 (subnormals included; +inf for +inf): k ln2 + log(m), m in [0.75, 1.5).
TRMATH_INLINE DV log_pos(DV x) {
  const LV sub = x < 2.2250738585072014e-308;
  x = sub ? x * 0x1p54 : x;
  const LV bits = (LV)x;
  LV e = ((bits >> 52) & 0x7ff) - 1023;
  DV m = (DV)((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);  // [1, 2)
  const LV big = m > 1.5;
  m = big ? m * 0.5 : m;
  e = big ? e + 1 : e;
  e = sub ? e - 54 : e;
  const DV ed = __builtin_convertvector(e, DV);
  const DV lm = log1p_ratio_c(m - 1.0, splat<DV>(1.0), coef::log1p_d);  // m - 1 exact
  const DV r = ed * kLn2Hi + (lm + ed * kLn2Lo);
  return x == std::numeric_limits<double>::infinity() ? x : r;
}

TRMATH_INLINE DV expm1_dv(DV x) {
  Lanes L{x, DV{}, DV{}, DV{}, DV{}, DV{}, LV{}};
  expm1_parts(x, L);
  return expm1_of(x, L.series, L.em1, L.up, L.em1_up);
}

// w g(d) with w' = w e^d, for finite d and w >= 0.
TRMATH_INLINE DV weighted_g(DV w, DV w_other, DV d) {
  const LV small = vabs(d) < 1.0;
  const DV ds = small ? d : DV{};
  const DV r = small ? w * (ds * ds * horner(ds, kK3)) : w_other - w * (1.0 + d);
  return r > 0.0 ? r : DV{};
}

struct Binary {
  DV val, gp, gq;  // gp, gq: the partial derivatives (without g)
};

// p - q from the log-probabilities (<= 0, -inf allowed), and sign(lp - lq) in sgn.
TRMATH_INLINE DV prob_diff(DV lp, DV lq, DV& sgn) {
  const double inf = std::numeric_limits<double>::infinity();
  const DV one = splat<DV>(1.0), zero{};
  const LV fp = lp > -inf, fq = lq > -inf;
  const DV m = lp > lq ? lp : lq;
  const DV ad = (fp & fq) ? vabs(lp - lq) : (fp | fq ? splat<DV>(inf) : zero);
  sgn = lp > lq ? one : (lp < lq ? -one : zero);
  return (fp | fq) ? sgn * exp_dv<DV, LV>(m) * -expm1_dv(-ad) : zero;
}

// d_R = log(R_q / R_p) from c = R_q - R_p and the two tails, with the conventions: both tails
// empty -> 0; only R_p empty -> +inf; only R_q empty -> -inf.
TRMATH_INLINE DV tail_log_ratio(DV c, DV Rp, DV Rq) {
  const double inf = std::numeric_limits<double>::infinity();
  const DV infv = splat<DV>(inf), one = splat<DV>(1.0), zero{};
  const LV posp = Rp > 0.0, posq = Rq > 0.0;
  const DV sRp = posp ? Rp : one;
  const DV u = c / sRp;
  const LV near = vabs(u) <= 0.5;
  const DV dRn = log1p_ratio_c(near ? u : zero, one, coef::log1p_d);
  const DV ratio = Rq / sRp;
  const LV normal = (ratio >= 2.2250738585072014e-308) & (ratio < infv);
  const DV lr = log_pos(normal ? ratio : one);
  const DV ldiff = log_pos(posq ? Rq : one) - log_pos(sRp);  // a tiny or huge ratio
  DV dR = near ? dRn : (normal ? lr : (posq ? ldiff : -infv));
  dR = posp ? dR : (posq ? infv : zero);
  return posp & ~posq ? -infv : dR;
}

// The tail's KL term R_p g(d_R): +inf if R_q = 0 < R_p, R_q if R_p = 0.
TRMATH_INLINE DV tail_term(DV Rp, DV Rq, DV dR) {
  const DV infv = splat<DV>(std::numeric_limits<double>::infinity());
  const LV fin = (dR - dR) == 0.0;
  const DV t = weighted_g(Rp, Rq, fin ? dR : DV{});
  return Rp > 0.0 ? (Rq > 0.0 ? t : infv) : Rq;
}

// A kept token's KL term p g(d) (d = lq - lp): +inf if q = 0 < p, q if p = 0.
TRMATH_INLINE DV kept_term(DV lp, DV lq, DV p, DV q) {
  const double inf = std::numeric_limits<double>::infinity();
  const LV fp = lp > -inf, both = fp & (lq > -inf);
  const DV t = weighted_g(p, q, both ? lq - lp : DV{});
  return both ? t : (fp ? splat<DV>(inf) : q);
}

// d KL / d lp of a kept token: p (d_R - d), d = lq - lp (-inf if q = 0 < p; 0 where p = 0).
TRMATH_INLINE DV kl_grad_p(DV lp, DV lq, DV p, DV dR) {
  const double inf = std::numeric_limits<double>::infinity();
  const LV fp = lp > -inf, both = fp & (lq > -inf);
  const DV dg = both ? lq - lp : (fp ? splat<DV>(-inf) : DV{});
  return fp ? p * (dR - dg) : DV{};
}

// d KL / d lq of a kept token: -(p - q) + q expm1(-d_R).
TRMATH_INLINE DV kl_grad_q(DV delta, DV q, DV dR) { return -delta + (q > 0.0 ? q * expm1_dv(-dR) : DV{}); }

// lp, lq sanitised (<= 0, no NaN).
TRMATH_INLINE Binary binary_lanes(int kind, DV lp, DV lq, bool grads) {
  const DV one = splat<DV>(1.0);
  const DV p = exp_dv<DV, LV>(lp), q = exp_dv<DV, LV>(lq);
  DV sgn;
  const DV delta = prob_diff(lp, lq, sgn);
  Binary r;
  if (kind == 0) {
    const DV a = vabs(delta);
    r.val = a > 1.0 ? one : a;
    if (grads) {
      r.gp = sgn * p;
      r.gq = -(sgn * q);
    }
    return r;
  }
  const DV Rp = -expm1_dv(lp), Rq = -expm1_dv(lq);
  const DV dR = tail_log_ratio(delta, Rp, Rq);
  r.val = kept_term(lp, lq, p, q) + tail_term(Rp, Rq, dR);
  if (grads) {
    r.gp = kl_grad_p(lp, lq, p, dR);
    r.gq = kl_grad_q(delta, q, dR);
  }
  return r;
}

// Loads and sanitises m lanes of x: (x, bad, clamped) with x set to 0 where bad (NaN or above
// tol) and to 0 where in (0, tol].
template <class In>
TRMATH_INLINE DV sanitize(const In* p, int m, double tol, LV& bad, LV& clamped) {
  const DV x = load_part(p, m);
  bad = (x != x) | (x > tol);
  clamped = x > 0.0;
  return (bad | clamped) ? DV{} : x;
}

template <class In>
bool run_binary(const BinArgs& a, int64_t begin, int64_t e) {
  const In* lp = static_cast<const In*>(a.lp);
  const In* lq = static_cast<const In*>(a.lq);
  In* gp = static_cast<In*>(a.gp);
  In* gq = static_cast<In*>(a.gq);
  const bool backward = a.g != nullptr;
  const DV nanv = splat<DV>(std::numeric_limits<double>::quiet_NaN());
  const DV g0 = backward && a.g_scalar
                    ? splat<DV>(a.g64 ? *static_cast<const double*>(a.g) : double(*static_cast<const float*>(a.g)))
                    : DV{};
  LV bad_any{};
  for (int64_t i = begin; i < e; i += kL) {
    const int m = int(e - i < kL ? e - i : kL);
    LV bp, bq, cp, cq;
    const DV xp = sanitize(lp + i, m, a.tol_p, bp, cp), xq = sanitize(lq + i, m, a.tol_q, bq, cq);
    LV bad = bp | bq;
    if (m < kL)
      for (int j = m; j < kL; ++j) bad[j] = 0;
    const Binary r = binary_lanes(a.kind, xp, xq, backward);
    if (!backward) {
      bad_any |= bad;
      const DV v = bad ? nanv : r.val;
      if (a.value64) {
        std::memcpy(static_cast<double*>(a.value) + i, &v, size_t(m) * sizeof(double));
      } else {
        const FV vf = __builtin_convertvector(v, FV);
        std::memcpy(static_cast<float*>(a.value) + i, &vf, size_t(m) * sizeof(float));
      }
      continue;
    }
    DV g = g0;
    if (!a.g_scalar)
      g = a.g64 ? load_part(static_cast<const double*>(a.g) + i, m) : load_part(static_cast<const float*>(a.g) + i, m);
    // As the torch path: NaN at a bad input, 0 at a clamped one, NaN where only the other is bad.
    if (gp) store_part(gp + i, bp ? nanv : (cp ? DV{} : (bq ? nanv : g * r.gp)), m);
    if (gq) store_part(gq + i, bq ? nanv : (cq ? DV{} : (bp ? nanv : g * r.gq)), m);
  }
  return any_lane(bad_any);
}

// ---- the Top-K coarse divergences (16/32-bit inputs) --------------------------------------
// One lane per row, kL rows at a time; a row's K entries are gathered into the lanes. Per row:
// the log kept masses A = log sum p_j (the maxima counted apart: A = M + log(k + R), with its
// error bound; in double-double where that bound matters, see run_topk), c = R_q - R_p from
// whichever of sum (p_j - q_j) and e^A - e^B has the smaller rounding bound, then
//   topk_tv = (sum |p_j - q_j| + |c|) / 2,  topk_kl = sum p_j g(d_j) + R_p g(d_R)
// with the terms of the binary case; gradients d/dlp_j = p_j (s_j - s_R) / 2 (TV, s = signs of
// p_j - q_j and of R_p - R_q), p_j (d_R - d_j) (KL), d/dlq_j = -q_j (s_j - s_R) / 2,
// -(p_j - q_j) + q_j expm1(-d_R). These are the float64 formulas of trmath/_coarse_impl.py
// without its double-double refinements of c, which only float64 inputs need (for 16/32-bit
// inputs the float64 evaluation is then within ~1e-12 relative, the target 1e-5).

template <class In>
TRMATH_INLINE void store_one(In* p, double v) {
  if constexpr (std::is_same<In, double>::value)
    *p = v;
  else
    store_from_float(p, float(v));
}

// log sum_j e^{x_j} over the K entries of each lane (-inf if all are -inf), as M + lg with M the
// largest entry and lg = log(k + R) >= 0 (k maxima, R the rest about M); mag = |M| + lg. Each
// part is within a few ulps, so the result is off by at most ~4 eps mag absolutely: relatively
// accurate unless M and lg cancel (a kept mass near 1 with no kept probability near 1), where
// run_topk refines it (log_kept_mass_dd).
TRMATH_INLINE DV log_kept_mass(const DV* x, int64_t K, DV& mag) {
  const double inf = std::numeric_limits<double>::infinity();
  DV mx = splat<DV>(-inf);
  for (int64_t j = 0; j < K; ++j) mx = x[j] > mx ? x[j] : mx;
  const LV fin = mx > -inf;
  const DV ms = fin ? mx : DV{};
  DV cnt{}, R{};
  for (int64_t j = 0; j < K; ++j) {
    const LV top = x[j] == mx;
    cnt += top ? splat<DV>(1.0) : DV{};
    R += top ? DV{} : exp_dv<DV, LV>(x[j] - ms);  // e^-inf = 0
  }
  const DV cs = cnt > 0.0 ? cnt : splat<DV>(1.0);
  const DV small = log_pos(cs) + log1p_ratio_c(R <= cs ? R : DV{}, cs, coef::log1p_d);
  const DV lg = R <= cs ? small : log_pos(cs + R);
  mag = fin ? vabs(ms) + lg : DV{};
  return fin ? ms + lg : splat<DV>(-inf);
}

// The same for lane l in double-double (M + log(k + R) with R = sum e^(x_j - M) from exact
// differences and double-double exponentials), rounded once: within an ulp or two of the log
// kept mass however close to 0 it is.
__attribute__((noinline)) double log_kept_mass_dd(const DV* x, int64_t K, int l) {
  const double inf = std::numeric_limits<double>::infinity();
  double M = -inf;
  for (int64_t j = 0; j < K; ++j) M = x[j][l] > M ? x[j][l] : M;
  if (M == -inf) return -inf;
  double cnt = 0;
  dd::DD R{0.0, 0.0};
  for (int64_t j = 0; j < K; ++j) {
    const double v = x[j][l];
    if (v == M)
      cnt += 1.0;
    else if (v > -inf)
      R = dd::add(R, dd::exp(dd::two_sum(v, -M)));
  }
  const dd::DD A = dd::add(dd::DD{M, 0.0}, dd::log_count_plus(cnt, R));
  return A.hi + A.lo;
}

template <class In>
bool run_topk(const TopkArgs& a, int64_t r0, int64_t r1) {
  const int64_t K = a.K;
  const In* lp = static_cast<const In*>(a.lp);
  const In* lq = static_cast<const In*>(a.lq);
  In* gp = static_cast<In*>(a.gp);
  In* gq = static_cast<In*>(a.gq);
  const bool backward = a.g != nullptr;
  const DV nanv = splat<DV>(std::numeric_limits<double>::quiet_NaN()), one = splat<DV>(1.0);
  std::vector<DV> xp(static_cast<size_t>(K)), xq(static_cast<size_t>(K));
  const size_t nk = static_cast<size_t>(K);
  std::vector<LV> bp(nk), bq(nk), cp(nk), cq(nk);
  const double grow = 1.0 + std::log(double(K));  // kept-mass tolerance tol (1 + ln K), as coarse._mass_tol
  LV bad_any{};
  for (int64_t r = r0; r < r1; r += kL) {
    const int m = int(r1 - r < kL ? r1 - r : kL);
    LV rowbad{};
    for (int64_t j = 0; j < K; ++j) {
      DV x{}, y{};
      for (int l = 0; l < m; ++l) {
        x[l] = to_double(lp[(r + l) * K + j]);
        y[l] = to_double(lq[(r + l) * K + j]);
      }
      bp[size_t(j)] = (x != x) | (x > a.tol_p);
      bq[size_t(j)] = (y != y) | (y > a.tol_q);
      cp[size_t(j)] = x > 0.0;
      cq[size_t(j)] = y > 0.0;
      xp[size_t(j)] = (bp[size_t(j)] | cp[size_t(j)]) ? DV{} : x;
      xq[size_t(j)] = (bq[size_t(j)] | cq[size_t(j)]) ? DV{} : y;
      rowbad |= bp[size_t(j)] | bq[size_t(j)];
    }
    DV magA, magB;
    DV A = log_kept_mass(xp.data(), K, magA), B = log_kept_mass(xq.data(), K, magB);
    rowbad |= (A > grow * a.tol_p) | (B > grow * a.tol_q);
    for (int l = m; l < kL; ++l) rowbad[l] = 0;
    DV S1{}, cA{}, kept{};
    for (int64_t j = 0; j < K; ++j) {
      DV sg;
      const DV d = prob_diff(xp[size_t(j)], xq[size_t(j)], sg);
      S1 += vabs(d);
      cA += d;
      if (a.kind == 1)
        kept += kept_term(xp[size_t(j)], xq[size_t(j)], exp_dv<DV, LV>(xp[size_t(j)]), exp_dv<DV, LV>(xq[size_t(j)]));
    }
    // c = R_q - R_p from sum (p_j - q_j) (error ~4 eps S1) or e^A - e^B (error ~ the errors
    // eA, eB of A and B, 4 eps mag each), whichever bound is the smaller; a row whose kept mass
    // clearly exceeds 1 (A > eA: rounding of the inputs) has its tail set to 0 and takes the
    // torch formulas' comparison of S1 with |A| + |B| (only e^A - e^B is the difference of the
    // clamped tails). TV = (S1 + |c|) / 2 is then within ~8 eps. The tails themselves and c
    // matter to KL's tail term T = R_p g(d_R), which moves by about |d_R| (dR_p + dR_q + dc).
    // A lane gets A and B in double-double (log_kept_mass_dd) where that could exceed 2^-30 of
    // a lower bound of its KL, or where A or B is within its error of 0 (a kept mass within
    // ~4 eps |log p_max| of 1: its tail, or whether it is clamped, is then unknown; TV needs
    // that too) -- kept masses near 1 with no kept probability near 1, or rows trading kept mass
    // while their tails barely differ. Typical rows never qualify; a row whose kept entries
    // equal the other's (S1 = 0) never needs it (its tails are then equal as computed).
    const double eps = std::numeric_limits<double>::epsilon(), eps4 = 4.0 * eps, ninf = -std::numeric_limits<double>::infinity();
    DV eA = eps4 * magA, eB = eps4 * magB, Ac, Bc, c, cerr;
    auto pick_c = [&] {
      Ac = A > 0.0 ? DV{} : A;
      Bc = B > 0.0 ? DV{} : B;
      DV sAB;
      const DV cB = prob_diff(Ac, Bc, sAB);  // e^A - e^B = R_q - R_p
      const LV clamped = (A > eA) | (B > eB);
      const LV useA = clamped ? S1 <= vabs(Ac) + vabs(Bc) : eps4 * S1 <= eA + eB;
      c = useA ? cA : cB;
      cerr = useA ? eps4 * S1 : eA + eB;
    };
    pick_c();
    DV Rp = -expm1_dv(Ac), Rq = -expm1_dv(Bc), dR{};
    {
      const LV live = (A > ninf) & (B > ninf) & ~rowbad & (S1 > 0.0);
      LV need = (vabs(A) <= eA) | (vabs(B) <= eB);
      if (a.kind == 1) {
        dR = tail_log_ratio(c, Rp, Rq);
        const DV sens = vabs(dR) < std::numeric_limits<double>::infinity() ? vabs(dR) : one;
        const DV Rmax = Rp > Rq ? Rp : Rq;
        const DV kl_lb = kept + c * c / (2.0 * (Rmax > 0.0 ? Rmax : one));
        need |= sens * (eA + eB + cerr) > 0x1p-30 * kl_lb;
      }
      need &= live;
      if (any_lane(need)) {
        for (int l = 0; l < m; ++l) {
          if (!need[l]) continue;
          A[l] = log_kept_mass_dd(xp.data(), K, l);
          B[l] = log_kept_mass_dd(xq.data(), K, l);
          eA[l] = 2.0 * eps * std::fabs(A[l]);
          eB[l] = 2.0 * eps * std::fabs(B[l]);
        }
        pick_c();
        Rp = -expm1_dv(Ac);
        Rq = -expm1_dv(Bc);
        if (a.kind == 1) dR = tail_log_ratio(c, Rp, Rq);
      }
    }
    DV val;
    if (a.kind == 0) {
      val = 0.5 * (S1 + vabs(c));
      val = val > 1.0 ? one : val;
    } else {
      val = kept + tail_term(Rp, Rq, dR);
    }
    if (!backward) {
      bad_any |= rowbad;
      val = rowbad ? nanv : val;
      for (int l = 0; l < m; ++l) {
        if (a.value64)
          static_cast<double*>(a.value)[r + l] = val[l];
        else
          static_cast<float*>(a.value)[r + l] = float(val[l]);
      }
      continue;
    }
    DV g{};
    for (int l = 0; l < m; ++l)
      g[l] = a.g_scalar ? (a.g64 ? *static_cast<const double*>(a.g) : double(*static_cast<const float*>(a.g)))
                        : (a.g64 ? static_cast<const double*>(a.g)[r + l] : double(static_cast<const float*>(a.g)[r + l]));
    const DV sR = c < 0.0 ? one : (c > 0.0 ? -one : DV{});  // sign(R_p - R_q) = sign(-c)
    for (int64_t j = 0; j < K; ++j) {
      const DV x = xp[size_t(j)], y = xq[size_t(j)];
      const DV p = exp_dv<DV, LV>(x), q = exp_dv<DV, LV>(y);
      DV sg;
      const DV d = prob_diff(x, y, sg);
      DV dp, dq;
      if (a.kind == 0) {
        dp = 0.5 * p * (sg - sR);
        dq = -0.5 * q * (sg - sR);
      } else {
        dp = kl_grad_p(x, y, p, dR);
        dq = kl_grad_q(d, q, dR);
      }
      // As the torch path: NaN at a bad entry, 0 at a clamped one, NaN elsewhere in a bad row.
      const DV op = bp[size_t(j)] ? nanv : (cp[size_t(j)] ? DV{} : (rowbad ? nanv : g * dp));
      const DV oq = bq[size_t(j)] ? nanv : (cq[size_t(j)] ? DV{} : (rowbad ? nanv : g * dq));
      for (int l = 0; l < m; ++l) {
        if (gp) store_one(gp + (r + l) * K + j, op[l]);
        if (gq) store_one(gq + (r + l) * K + j, oq[l]);
      }
    }
  }
  return any_lane(bad_any);
}

// ---- the mismatch diagnostics' sums (MismatchArgs) ------------------------------------------
// One chunk's part: sums of hi and lo (lr = hi + lo), of k3, the maxima of lr and |lr|, and the
// sums of e^(lr - M_c), e^(2 (lr - M_c)) about the chunk's own maximum M_c (merged exactly, up
// to the rounding of e^(M_c - M), in chunk order).
struct MPart {
  double hi = 0, lo = 0, k3 = 0, mx = -std::numeric_limits<double>::infinity(), mabs = 0, s1 = 0, s2 = 0;
  bool nan = false;
};

TRMATH_INLINE double hmax(DV v) {
  double m = v[0];
  for (int j = 1; j < kL; ++j) m = v[j] > m ? v[j] : m;
  return m;
}

template <class In>
bool run_mismatch(const MismatchArgs& a, int64_t begin, int64_t e, MPart& P) {
  const In* s = static_cast<const In*>(a.s);
  const In* o = static_cast<const In*>(a.o);
  const double inf = std::numeric_limits<double>::infinity();
  const DV ninf = splat<DV>(-inf), zero{};
  DV shi{}, slo{}, sk3{}, mx = ninf, mabs{};
  LV nan{};
  for (int64_t i = begin; i < e; i += kL) {
    const int m = int(e - i < kL ? e - i : kL);
    const LV keep = keep_lanes(a.valid, i, m);  // lanes past m: 0
    const Lanes L = lanes(load_part(s + i, m), load_part(o + i, m), true);
    nan |= keep & (L.hi != L.hi);
    shi += keep ? L.hi : zero;
    slo += keep ? L.lo : zero;
    sk3 += keep ? value_of(3, L) : zero;
    mx = keep & (L.hi > mx) ? L.hi : mx;
    const DV ab = vabs(L.hi);
    mabs = keep & (ab > mabs) ? ab : mabs;
  }
  P.hi = hsum(shi);
  P.lo = hsum(slo);
  P.k3 = hsum(sk3);
  P.mx = hmax(mx);
  P.mabs = hmax(mabs);
  P.nan = any_lane(nan);
  if (P.nan || P.mx == -inf) return false;
  const DV M = splat<DV>(P.mx);
  DV s1{}, s2{};
  for (int64_t i = begin; i < e; i += kL) {
    const int m = int(e - i < kL ? e - i : kL);
    const LV keep = keep_lanes(a.valid, i, m);
    const DV hi = lanes(load_part(s + i, m), load_part(o + i, m), false).hi;
    const DV w = exp_dv<DV, LV>(keep ? hi - M : ninf);  // <= 1; e^-inf = 0
    s1 += w;
    s2 += w * w;
  }
  P.s1 = hsum(s1);
  P.s2 = hsum(s2);
  return false;
}

}  // namespace

void topk_coarse(const TopkArgs& a) {
  // Chunks of about kChunk elements, a whole number of lane groups of rows.
  int64_t per = (kChunk / (a.K > 0 ? a.K : 1)) / kL * kL;
  per = per < kL ? kL : per;
  const bool bad = over_chunks(a.rows, [&](int64_t b, int64_t e) { TRMATH_BY_DTYPE(a.dtype, run_topk, a, b, e) }, per);
  if (a.bad) *a.bad = bad ? 1 : 0;
}

void binary_coarse(const BinArgs& a) {
  const bool bad = over_chunks(a.n, [&](int64_t b, int64_t e) { TRMATH_BY_DTYPE(a.dtype, run_binary, a, b, e) });
  if (a.bad) *a.bad = bad ? 1 : 0;
}

void k_estimate_backward(const KBwdArgs& a) {
  over_chunks(a.n, [&](int64_t b, int64_t e) { TRMATH_BY_DTYPE(a.dtype, run_backward, a, b, e) });
}

void mismatch_sums(const MismatchArgs& a) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
  std::vector<MPart> parts(size_t(chunks > 0 ? chunks : 0));
  over_chunks(a.n, [&](int64_t b, int64_t e) {
    MPart& P = parts[size_t(b / kChunk)];
    TRMATH_BY_DTYPE(a.dtype, run_mismatch, a, b, e, P)
  });
  double hi = 0, lo = 0, k3 = 0, mx = -inf, mabs = 0, s1 = 0, s2 = 0;
  bool bad = false;
  for (const MPart& P : parts) {
    bad |= P.nan;
    hi += P.hi;
    lo += P.lo;
    k3 += P.k3;
    mx = P.mx > mx ? P.mx : mx;
    mabs = P.mabs > mabs ? P.mabs : mabs;
  }
  if (!bad && mx > -inf) {
    for (const MPart& P : parts) {
      if (P.mx == -inf) continue;
      const double f = std::exp(P.mx - mx);  // <= 1
      s1 += f * P.s1;
      s2 += (f * f) * P.s2;
    }
  }
  double* out = a.out;
  out[0] = hi + lo;
  out[1] = k3;
  out[2] = mx;
  out[3] = mabs;
  out[4] = s1;
  out[5] = s2;
  if (bad)
    for (int j = 0; j < 6; ++j) out[j] = nan;
}

void k_estimate(const KArgs& a) {
  const bool bad = over_chunks(a.n, [&](int64_t b, int64_t e) { TRMATH_BY_DTYPE(a.dtype, run, a, b, e) });
  if (a.bad) *a.bad = bad ? 1 : 0;
}

}  // namespace TRMATH_NS
}  // namespace trmath
