// trmath: portable SIMD lanes built on GNU vector extensions (GCC, Clang).
//
// Two lane policies drive every CPU kernel:
//   FloatLanes<In>:  8 elements per step; transcendental polynomials in float, while every
//                    argument that must be exact (logit differences, range reduction) is formed
//                    in double ("wide") before it is rounded.
//   DoubleLanes<In>: 4 elements per step, everything in double (float64 inputs, and the
//                    double-precision retry of a float row whose result would cancel).
// Elements are loaded from the caller's dtype (float16, bfloat16, float32, float64) and
// converted in registers: no upcast copy of the input ever exists.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "trmath/config.hpp"

#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace trmath {
namespace simd {

typedef float f8 __attribute__((vector_size(32)));
typedef double d4 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef int64_t l4 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));
typedef uint32_t u8 __attribute__((vector_size(32)));

// ---- storage types --------------------------------------------------------------------
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

TRMATH_INLINE float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
TRMATH_INLINE float f16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  uint32_t bits = em << 13;
  float f;
  std::memcpy(&f, &bits, 4);
  f *= 0x1p112f;  // rebias (exact for normals and subnormals)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (em >= 0x7c00u) u = (em << 13) | 0x7f800000u;  // inf / nan
  u |= sign;
  std::memcpy(&f, &u, 4);
  return f;
}
// float -> bfloat16, round to nearest even, NaN stays NaN.
TRMATH_INLINE uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
// float -> float16, round to nearest even, overflow to inf, NaN stays NaN.
TRMATH_INLINE uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                   // subnormal or zero in half
    float af;
    std::memcpy(&af, &a, 4);
    float t = af + 0.5f;  // places the half subnormal in the low mantissa bits (RNE)
    uint32_t tb;
    std::memcpy(&tb, &t, 4);
    return uint16_t(sign | (tb - 0x3f000000u));
  }
  uint32_t mant_odd = (a >> 13) & 1u;
  a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
  return uint16_t(sign | (a >> 13));
}

template <class In> struct StorageOf;
template <> struct StorageOf<float> { static constexpr DType dtype = DType::f32; };
template <> struct StorageOf<double> { static constexpr DType dtype = DType::f64; };
template <> struct StorageOf<bf16_t> { static constexpr DType dtype = DType::bf16; };
template <> struct StorageOf<f16_t> { static constexpr DType dtype = DType::f16; };

TRMATH_INLINE double to_double(float x) { return x; }
TRMATH_INLINE double to_double(double x) { return x; }
TRMATH_INLINE double to_double(bf16_t x) { return bf16_to_float(x.bits); }
TRMATH_INLINE double to_double(f16_t x) { return f16_to_float(x.bits); }

template <class In> TRMATH_INLINE In neg_inf_of();
template <> TRMATH_INLINE float neg_inf_of<float>() { return -std::numeric_limits<float>::infinity(); }
template <> TRMATH_INLINE double neg_inf_of<double>() { return -std::numeric_limits<double>::infinity(); }
template <> TRMATH_INLINE bf16_t neg_inf_of<bf16_t>() { return bf16_t{0xff80u}; }
template <> TRMATH_INLINE f16_t neg_inf_of<f16_t>() { return f16_t{0xfc00u}; }

TRMATH_INLINE void store_from_float(float* p, float v) { *p = v; }
TRMATH_INLINE void store_from_float(double* p, double v) { *p = v; }
TRMATH_INLINE void store_from_float(bf16_t* p, float v) { p->bits = float_to_bf16(v); }
TRMATH_INLINE void store_from_float(f16_t* p, float v) { p->bits = float_to_f16(v); }

// ---- vector helpers -------------------------------------------------------------------
template <class V> TRMATH_INLINE V splat(typename std::remove_reference<decltype(V{}[0])>::type s) {
  return V{} + s;
}
TRMATH_INLINE f4 lo_half(f8 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3); }
TRMATH_INLINE f4 hi_half(f8 v) { return __builtin_shufflevector(v, v, 4, 5, 6, 7); }
TRMATH_INLINE f8 join(f4 a, f4 b) { return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7); }
TRMATH_INLINE i8 join(i4 a, i4 b) { return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7); }

TRMATH_INLINE f8 vabs(f8 x) { return (f8)((i8)x & 0x7fffffff); }
TRMATH_INLINE d4 vabs(d4 x) { return (d4)((l4)x & 0x7fffffffffffffffLL); }
// vmax(a, b) = a > b ? a : b and vmin(a, b) = a < b ? a : b, NaN included (b is returned):
// exactly what the AVX max/min instructions compute, which the compiler does not emit for the
// select without -ffast-math (it emits a compare and a blend: one more operation).
#if defined(__AVX__)
TRMATH_INLINE f8 vmax(f8 a, f8 b) { return (f8)_mm256_max_ps((__m256)a, (__m256)b); }
TRMATH_INLINE d4 vmax(d4 a, d4 b) { return (d4)_mm256_max_pd((__m256d)a, (__m256d)b); }
TRMATH_INLINE f8 vmin(f8 a, f8 b) { return (f8)_mm256_min_ps((__m256)a, (__m256)b); }
TRMATH_INLINE d4 vmin(d4 a, d4 b) { return (d4)_mm256_min_pd((__m256d)a, (__m256d)b); }
#else
TRMATH_INLINE f8 vmax(f8 a, f8 b) { return a > b ? a : b; }
TRMATH_INLINE d4 vmax(d4 a, d4 b) { return a > b ? a : b; }
TRMATH_INLINE f8 vmin(f8 a, f8 b) { return a < b ? a : b; }
TRMATH_INLINE d4 vmin(d4 a, d4 b) { return a < b ? a : b; }
#endif
// ~m & v, and v where the mask m is clear, 0 where it is set: one and-not (the compiler turns
// the plain expression into a blend with zero, two operations).
#if defined(__AVX2__)
TRMATH_INLINE i8 andnot(i8 m, i8 v) { return (i8)_mm256_andnot_si256((__m256i)m, (__m256i)v); }
TRMATH_INLINE l4 andnot(l4 m, l4 v) { return (l4)_mm256_andnot_si256((__m256i)m, (__m256i)v); }
#else
TRMATH_INLINE i8 andnot(i8 m, i8 v) { return ~m & v; }
TRMATH_INLINE l4 andnot(l4 m, l4 v) { return ~m & v; }
#endif
TRMATH_INLINE f8 zero_where(i8 m, f8 v) { return (f8)andnot(m, (i8)v); }
TRMATH_INLINE d4 zero_where(l4 m, d4 v) { return (d4)andnot(m, (l4)v); }

TRMATH_INLINE double hsum(d4 v) { return (v[0] + v[2]) + (v[1] + v[3]); }
TRMATH_INLINE double hsum(f8 v) {
  d4 a = __builtin_convertvector(lo_half(v), d4), b = __builtin_convertvector(hi_half(v), d4);
  return hsum(a + b);
}

// Round to nearest integer for |x| < 2^51 (the add-and-subtract trick; exact, no libm call).
TRMATH_INLINE d4 vround(d4 x) {
  const d4 magic = splat<d4>(6755399441055744.0);  // 1.5 * 2^52
  return (x + magic) - magic;
}

// ---- loads ----------------------------------------------------------------------------
template <class In> struct Load8;  // 8 elements -> f8
template <> struct Load8<float> {
  static TRMATH_INLINE f8 load(const float* p) { f8 v; std::memcpy(&v, p, 32); return v; }
};
template <> struct Load8<bf16_t> {
  static TRMATH_INLINE f8 load(const bf16_t* p) {
#if defined(__AVX2__)
    // One widening load (vpmovzxwd) and a shift; the generic conversion below compiles to two
    // half-width widenings and an insert.
    __m128i h; std::memcpy(&h, p, 16);
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    f8 v; std::memcpy(&v, &w, 32); return v;
#else
    u16x8 h; std::memcpy(&h, p, 16);
    i8 w = __builtin_convertvector(h, i8) << 16;
    return (f8)w;
#endif
  }
};
template <> struct Load8<f16_t> {
  static TRMATH_INLINE f8 load(const f16_t* p) {
#if defined(__F16C__)
    __m128i h; std::memcpy(&h, p, 16);
    __m256 f = _mm256_cvtph_ps(h);
    f8 v; std::memcpy(&v, &f, 32); return v;
#else
    u16x8 h; std::memcpy(&h, p, 16);
    i8 em = __builtin_convertvector(h & (uint16_t)0x7fffu, i8);
    i8 sign = __builtin_convertvector(h & (uint16_t)0x8000u, i8) << 16;
    f8 f = (f8)(em << 13) * 0x1p112f;
    i8 u = (i8)f;
    u = em >= 0x7c00 ? ((em << 13) | 0x7f800000) : u;
    return (f8)(u | sign);
#endif
  }
};
template <> struct Load8<double> {
  static TRMATH_INLINE f8 load(const double* p) {
    d4 a, b; std::memcpy(&a, p, 32); std::memcpy(&b, p + 4, 32);
    return join(__builtin_convertvector(a, f4), __builtin_convertvector(b, f4));
  }
};

template <class In> struct Load4;  // 4 elements -> d4
template <> struct Load4<double> {
  static TRMATH_INLINE d4 load(const double* p) { d4 v; std::memcpy(&v, p, 32); return v; }
};
template <> struct Load4<float> {
  static TRMATH_INLINE d4 load(const float* p) { f4 v; std::memcpy(&v, p, 16); return __builtin_convertvector(v, d4); }
};
template <> struct Load4<bf16_t> {
  static TRMATH_INLINE d4 load(const bf16_t* p) {
    u16x4 h; std::memcpy(&h, p, 8);
    i4 w = __builtin_convertvector(h, i4) << 16;
    return __builtin_convertvector((f4)w, d4);
  }
};
template <> struct Load4<f16_t> {
  static TRMATH_INLINE d4 load(const f16_t* p) {
    d4 r;
    for (int i = 0; i < 4; ++i) r[i] = f16_to_float(p[i].bits);
    return r;
  }
};

}  // namespace simd
}  // namespace trmath
