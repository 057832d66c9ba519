// trmath: vectors of 16 floats (AVX-512F/BW/DQ/VL) and their helpers, for FloatLanes16
// (elementary.hpp): the float lanes' arithmetic, operation for operation, on 16 floats, so a
// forward pass issues half as many instructions per logit (on a CPU that executes 512-bit
// operations at full width, a plain exponential-and-sum loop ran 1.9x faster than in 8 lanes).
// Included by elementary.hpp before the lane templates, which find these overloads (vmax,
// any_lane, andnot, quarter_d, add_lanes, ...) by ordinary lookup: GNU vector types have no
// associated namespace, so an overload declared after the templates would not be seen.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define TRMATH_HAVE_LANES16 1

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "trmath/vec.hpp"

namespace trmath {
namespace simd {

typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

// The 16-lane forms of vec.hpp's and elementary.hpp's helpers (same semantics, NaN included).
TRMATH_INLINE f16v vabs(f16v x) { return (f16v)((i16v)x & 0x7fffffff); }
TRMATH_INLINE f16v vmax(f16v a, f16v b) { return (f16v)_mm512_max_ps((__m512)a, (__m512)b); }
TRMATH_INLINE f16v vmin(f16v a, f16v b) { return (f16v)_mm512_min_ps((__m512)a, (__m512)b); }
TRMATH_INLINE i16v andnot(i16v m, i16v v) { return (i16v)_mm512_andnot_si512((__m512i)m, (__m512i)v); }
TRMATH_INLINE f16v zero_where(i16v m, f16v v) { return (f16v)andnot(m, (i16v)v); }
TRMATH_INLINE bool any_lane(i16v m) { return _mm512_movepi32_mask((__m512i)m) != 0; }
TRMATH_INLINE bool all_lanes(i16v m) { return _mm512_movepi32_mask((__m512i)m) == 0xffff; }
// Lanes 4h .. 4h + 3, widened to double (exact).
TRMATH_INLINE d4 quarter16_d(f16v v, int h) {
  f4 q;
  std::memcpy(&q, reinterpret_cast<const float*>(&v) + 4 * h, sizeof q);
  return __builtin_convertvector(q, d4);
}
TRMATH_INLINE d4 quarter_d(f16v v, int h) { return quarter16_d(v, h); }
// Lanes into per-lane double sums (four d4 vectors); counts are subtracted (a mask lane is -1).
TRMATH_INLINE void add_lanes(d4* acc, f16v x) {
  for (int h = 0; h < 4; ++h) acc[h] += quarter16_d(x, h);
}
TRMATH_INLINE void sub_lanes(d4* acc, i16v m) {
  for (int h = 0; h < 4; ++h) {
    i4 q;
    std::memcpy(&q, reinterpret_cast<const int32_t*>(&m) + 4 * h, sizeof q);
    acc[h] -= __builtin_convertvector(q, d4);
  }
}

template <class In> struct Load16;  // 16 elements -> f16v
template <> struct Load16<float> {
  static TRMATH_INLINE f16v load(const float* p) { f16v v; std::memcpy(&v, p, 64); return v; }
};
template <> struct Load16<bf16_t> {
  static TRMATH_INLINE f16v load(const bf16_t* p) {
    __m256i h; std::memcpy(&h, p, 32);
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    f16v v; std::memcpy(&v, &w, 64); return v;
  }
};
template <> struct Load16<f16_t> {
  static TRMATH_INLINE f16v load(const f16_t* p) {
    __m256i h; std::memcpy(&h, p, 32);
    const __m512 f = _mm512_cvtph_ps(h);
    f16v v; std::memcpy(&v, &f, 64); return v;
  }
};

// 8 doubles (the projection's passes, trmath/project.hpp): the 4-double lanes' helpers.
typedef double d8 __attribute__((vector_size(64)));
typedef int64_t l8 __attribute__((vector_size(64)));
TRMATH_INLINE d8 vabs(d8 x) { return (d8)((l8)x & 0x7fffffffffffffffLL); }
TRMATH_INLINE bool any_lane(l8 m) { return _mm512_movepi64_mask((__m512i)m) != 0; }
// Lanes 0-3 and 4-7 as two d4 sums, then hsum(d4)'s order.
TRMATH_INLINE double hsum(d8 v) {
  const d4 s = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (s[0] + s[2]) + (s[1] + s[3]);
}
// 8 elements -> d8, as two Load4 (exact conversions).
template <class In>
TRMATH_INLINE d8 load8_d(const In* p) {
  const d4 a = Load4<In>::load(p), b = Load4<In>::load(p + 4);
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7);
}

}  // namespace simd
}  // namespace trmath

#endif
