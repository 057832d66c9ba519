// trmath: CUDA kernels of the exact reductions (logsumexp, entropy, token log-probs, KL, TV,
// JS), forward and backward.
//
// A row's result never depends on the batch, its position or the launch: every reduction tree
// below is fixed by V alone. The formulas are the CPU kernels' (cpp/include/trmath/exact.hpp,
// cpp/src/kernels_fwd.cpp, kernels_bwd.cpp), element for element; what differs is how a row is
// traversed:
//
//  * Forward, first pass (span kernels): a row is cut into spans of kSpan elements and one block
//    reads each (row, span) once (16-byte loads where the row is contiguous and aligned; for
//    32/64-bit inputs streamed through shared memory with four tiles per thread in flight, for
//    16-bit ones the next tile requested before the current one is reduced: see for_tiles).
//    Each thread keeps its partial sums
//    about a scale and centre of its own -- its maxima, moved (exactly: the CPU's segment merge,
//    phi(x + d) expanded) only when a new maximum passes them by 30 T, so the move runs about
//    once per thread -- and the block merges its threads at the span's maxima into one record.
//  * The row kernel merges its row's records in span order, exactly as the block merged its
//    threads, and runs the CPU's stage machine: for KL (and the single-row reductions) the first
//    pass is the whole computation on most rows. TV and JS need one more read at the exact
//    centre (the sign of p - q, and log(p/m), are only known once the normaliser is), as on the
//    CPU, and so do the KL rows whose first centre (the difference of the maxima) is too far
//    from the row's for Phi/E - psi (about one in five where the log-ratios are i.i.d.): the row
//    kernel stores the row's state, a span kernel makes that pass, and a second row kernel sums
//    its records, accepts, and finishes.
//  * Rows these passes cannot settle (cancellation in a merge, a centre still too far, log-prob
//    rows whose logsumexp cancels) take the CPU's further passes, in the same order, with the
//    same acceptance tests, one block per row.
//  * Backward: elementwise from the per-row statistics, the same layout the CPU kernels write.
//
// Arithmetic: 16/32-bit inputs are computed in float with the fewest instructions that keep the
// CPU kernels' error bounds (see CentreF); the terms of each tile are summed in float, then in
// double. float64 inputs use double throughout.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_api.hpp"
#include "cuda_common.cuh"
#include "trmath/coefficients.hpp"
#include "trmath/ddouble.hpp"
#include "trmath/rowfinish.hpp"

namespace trmath {
namespace cuda {
namespace {

using namespace common;

constexpr int kThreads = 256;
constexpr double kLn2d = 0.69314718055994530942;

// Tuning knobs (defaults are the shipped values; benchmarks/cuda_lab overrides them with -D).
#ifndef TRMATH_CUDA_PREFETCH
#define TRMATH_CUDA_PREFETCH 1  // tiles each thread has requested ahead of the one it reduces (for_tiles)
#endif
#ifndef TRMATH_CUDA_SPAN_MINBLOCKS
#define TRMATH_CUDA_SPAN_MINBLOCKS 3  // resident blocks per SM the span kernels' register budget targets
#endif
#ifndef TRMATH_CUDA_SPAN
#define TRMATH_CUDA_SPAN 32768  // elements per span (kSpan); another value moves results' last bits
#endif
#ifndef TRMATH_CUDA_ASYNC
#define TRMATH_CUDA_ASYNC 4  // > 0: the span kernels' contiguous rows stream through shared memory,
                             // this many tiles per thread in flight (cp.async; sm_80 and newer);
                             // 0: registers, TRMATH_CUDA_PREFETCH tiles ahead
#endif
#ifndef TRMATH_CUDA_FIRST_LEAN
#define TRMATH_CUDA_FIRST_LEAN 1  // the first pass's float centre without its zero terms (CentreF0)
#endif
static_assert(TRMATH_CUDA_PREFETCH >= 1, "TRMATH_CUDA_PREFETCH must be at least 1");
#ifndef TRMATH_CUDA_ASYNC16
#define TRMATH_CUDA_ASYNC16 0  // the same for 16-bit inputs (8 elements a tile: their span loops are
                               // bound by instruction issue, and were slower with it)
#endif
static_assert(TRMATH_CUDA_ASYNC >= 0 && TRMATH_CUDA_ASYNC <= 5, "TRMATH_CUDA_ASYNC must be 0..5");
static_assert(TRMATH_CUDA_ASYNC16 >= 0 && TRMATH_CUDA_ASYNC16 <= 5, "TRMATH_CUDA_ASYNC16 must be 0..5");
static_assert(TRMATH_CUDA_SPAN >= 1, "TRMATH_CUDA_SPAN must be positive");
// TRMATH_CUDA_LAB_NOTERMS (lab only, never in a build that is used): pair_span_kernel skips the
// element terms, so a timing shows what the loads and maxima cost alone. Its results are wrong.

// ---- series coefficients in constant memory (from the generated host tables) ------------------
__constant__ Poly<double, coef::em2_d_n> c_em2_d = mk<double>(coef::em2_d);
__constant__ Poly<double, coef::expm1_d_n> c_expm1_d = mk<double>(coef::expm1_d);
__constant__ Poly<double, coef::jsp_d_n> c_jsp_d = mk<double>(coef::jsp_d);
__constant__ Poly<double, coef::jsq_d_n> c_jsq_d = mk<double>(coef::jsq_d);
__constant__ Poly<double, coef::jsd_d_n> c_jsd_d = mk<double>(coef::jsd_d);
__constant__ Poly<double, coef::log1p_d_n> c_log1p_d = mk<double>(coef::log1p_d);
__constant__ Poly<double, coef::phi_d_n> c_phi_d = mk<double>(coef::phi_d);

// ---- element storage --------------------------------------------------------------------------

// Tile<In>: E consecutive elements (16 bytes) per load, kept raw (Raw) until used and then
// converted to S in registers.
template <class In> struct Tile;
template <> struct Tile<float> {
  using S = float;
  using Raw = float4;
  static constexpr int E = 4;
  __device__ static float one(const float* p) { return __ldg(p); }
  __device__ static Raw vec(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
  // Elements i..i+E-1 at stride vs, -inf past n.
  __device__ static Raw gather(const float* p, int64_t vs, int64_t n) {
    float o[E];
#pragma unroll
    for (int k = 0; k < E; ++k) o[k] = k < n ? __ldg(p + k * vs) : -INFINITY;
    return make_float4(o[0], o[1], o[2], o[3]);
  }
  __device__ static void unpack(const Raw& v, float (&o)[E]) {
    o[0] = v.x; o[1] = v.y; o[2] = v.z; o[3] = v.w;
  }
};
template <> struct Tile<double> {
  using S = double;
  using Raw = double2;
  static constexpr int E = 2;
  __device__ static double one(const double* p) { return __ldg(p); }
  __device__ static Raw vec(const double* p) { return __ldg(reinterpret_cast<const double2*>(p)); }
  __device__ static Raw gather(const double* p, int64_t vs, int64_t n) {
    return make_double2(n > 0 ? __ldg(p) : -INFINITY, n > 1 ? __ldg(p + vs) : -INFINITY);
  }
  __device__ static void unpack(const Raw& v, double (&o)[E]) {
    o[0] = v.x; o[1] = v.y;
  }
};
// 16-bit formats: 8 elements in a uint4, unpacked pairwise.
template <class In, unsigned short kNegInf>
struct Tile16 {
  using S = float;
  using Raw = uint4;
  static constexpr int E = 8;
  __device__ static unsigned short bits(const In* p) { return __ldg(reinterpret_cast<const unsigned short*>(p)); }
  __device__ static Raw vec(const In* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ static Raw gather(const In* p, int64_t vs, int64_t n) {
    uint32_t u[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      uint32_t lo = 2 * k < n ? bits(p + 2 * k * vs) : kNegInf;
      uint32_t hi = 2 * k + 1 < n ? bits(p + (2 * k + 1) * vs) : kNegInf;
      u[k] = lo | (hi << 16);
    }
    return make_uint4(u[0], u[1], u[2], u[3]);
  }
};
template <> struct Tile<bf16s> : Tile16<bf16s, 0xff80u> {
  __device__ static float one(const bf16s* p) { return __uint_as_float(uint32_t(bits(p)) << 16); }
  __device__ static void unpack(const Raw& v, float (&o)[E]) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      o[2 * k] = __uint_as_float(u[k] << 16);
      o[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
    }
  }
};
template <> struct Tile<f16s> : Tile16<f16s, 0xfc00u> {
  __device__ static float one(const f16s* p) { return h2f(bits(p)); }
  __device__ static void unpack(const Raw& v, float (&o)[E]) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      o[2 * k] = h2f((unsigned short)(u[k] & 0xffffu));
      o[2 * k + 1] = h2f((unsigned short)(u[k] >> 16));
    }
  }
};

// A tile of results stored at p (16-byte aligned when vec).
template <class In, class S, int E>
__device__ __forceinline__ void store_tile(In* p, const S (&v)[E], bool vec, int64_t n) {
  if (vec && n >= E) {
    if constexpr (std::is_same<In, float>::value) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
      return;
    } else if constexpr (std::is_same<In, double>::value) {
      *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
      return;
    } else {
      uint32_t u[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        uint16_t lo, hi;
        if constexpr (std::is_same<In, bf16s>::value) {
          lo = to_bf16(v[2 * k]);
          hi = to_bf16(v[2 * k + 1]);
        } else {
          lo = to_f16(v[2 * k]);
          hi = to_f16(v[2 * k + 1]);
        }
        u[k] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
      *reinterpret_cast<uint4*>(p) = make_uint4(u[0], u[1], u[2], u[3]);
      return;
    }
  }
  for (int k = 0; k < E && k < n; ++k) store1(p + k, v[k]);
}

// ---- tiles -------------------------------------------------------------------------------------
// Calls f(zv, wv, i0) for every tile of E elements of the thread's share of a row (tiles
// threadIdx.x, threadIdx.x + blockDim.x, ...), in that order; elements past V read as -inf
// (p = 0). kAhead tiles are requested ahead of the one f runs on, held in a ring of registers:
// the loop is unrolled kAhead times so every ring slot is a compile-time index (a dynamically
// indexed array would go to local memory). Which tiles a thread gets, and the order f sees them
// in, do not depend on kAhead, so neither do the results. kPair = false: w is ignored. Idx is
// the type of the element and tile indices: int where V <= kSpan (the span kernels: fewer
// instructions per tile than 64-bit index arithmetic), int64_t for whole rows; strided
// addresses are formed in 64 bits either way.
//
// With TRMATH_CUDA_ASYNC = K > 0, the span kernels (Idx = int) stream contiguous aligned rows
// through shared memory instead: each thread keeps K tiles of its own in flight (cp.async into
// its own slots of a ring, so no barrier is needed: cp.async.wait_group makes a thread's own
// copies visible to it), without holding them in registers. The tiles and their order are the
// same, and so are the results, bit for bit.
#if TRMATH_CUDA_ASYNC > 0 || TRMATH_CUDA_ASYNC16 > 0
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}
#endif

template <class In, bool kPair, class Idx = int64_t, class F>
__device__ __forceinline__ void for_tiles(const In* z, const In* w, Idx V, int64_t vsz, int64_t vsw,
                                          bool vec, F&& f) {
  using T = Tile<In>;
  using S = typename T::S;
  using Raw = typename T::Raw;
  constexpr int E = T::E;
  constexpr int kAhead = TRMATH_CUDA_PREFETCH;
  const Idx nt = (V + E - 1) / E;
  const Idx nvec = vec ? V / E : Idx(0);  // tiles t < nvec are whole and 16-byte aligned
  const Idx bd = blockDim.x;
#if TRMATH_CUDA_ASYNC > 0 || TRMATH_CUDA_ASYNC16 > 0
  constexpr int K = sizeof(In) == 2 ? TRMATH_CUDA_ASYNC16 : TRMATH_CUDA_ASYNC;
  if constexpr (std::is_same<Idx, int>::value && K > 0) {
    if (vec) {
      static_assert(sizeof(Raw) == 16, "a tile is 16 bytes");
      constexpr int kIn = kPair ? 2 : 1;
      __shared__ Raw ring[K * kIn * kThreads];  // slot k, input j, thread i at (k kIn + j) kThreads + i
      constexpr int kSlot = kIn * kThreads;
      Raw* const mine = ring + threadIdx.x;
      const int step = int(bd) * E;  // elements between a thread's consecutive tiles
      int t = threadIdx.x;
      // The next tile to request (index tn, at zn and wn) and the ring slots to write and read.
      int tn = t;
      const In* zn = z + int64_t(t) * E;
      const In* wn = w + int64_t(t) * E;
      auto issue = [&](int wr) {
        if (tn < nvec) {
          cp_async16(mine + wr, zn);
          if (kPair) cp_async16(mine + wr + kThreads, wn);
        }
        cp_async_commit();  // an empty group past the row: the count of groups stays uniform
        tn += int(bd);
        zn += step;
        if (kPair) wn += step;
      };
#pragma unroll
      for (int k = 0; k < K - 1; ++k) issue(k * kSlot);
      int rd = 0, prev = (K - 1) * kSlot;
      for (; t < nvec; t += int(bd)) {
        issue(prev);             // into the slot read last time (the last slot, at first)
        cp_async_wait<K - 1>();  // every group but the K - 1 newest has landed: tile t has
        const Raw a = mine[rd];
        const Raw b = mine[rd + (kPair ? kThreads : 0)];
        prev = rd;
        rd = rd + kSlot == K * kSlot ? 0 : rd + kSlot;
        S zs[E], ws[E];
        T::unpack(a, zs);
        if (kPair) T::unpack(b, ws);
        f(zs, ws, int64_t(t) * E);
      }
      cp_async_wait<0>();
      if (t < nt) {  // the partial last tile (t = nvec), if any
        Raw a, b;
        a = T::gather(z + int64_t(t) * E * vsz, vsz, int64_t(V - t * E));
        if (kPair) b = T::gather(w + int64_t(t) * E * vsw, vsw, int64_t(V - t * E));
        S zs[E], ws[E];
        T::unpack(a, zs);
        if (kPair) T::unpack(b, ws);
        f(zs, ws, int64_t(t) * E);
      }
      return;
    }
  }
#endif
  auto load = [&](Idx t, Raw& a, Raw& b) {
    const Idx i = t * E;
    if (t < nvec) {
      a = T::vec(z + i);
      if (kPair) b = T::vec(w + i);
    } else {
      a = T::gather(z + int64_t(i) * vsz, vsz, int64_t(V - i));
      if (kPair) b = T::gather(w + int64_t(i) * vsw, vsw, int64_t(V - i));
    }
  };
  // With kAhead = 1 this is the plain loop: tile t reduced while tile t + blockDim.x loads.
  Raw za[kAhead], wa[kAhead];
  Idx t = threadIdx.x;
#pragma unroll
  for (int k = 0; k < kAhead; ++k)
    if (t + k * bd < nt) load(t + k * bd, za[k], wa[k]);
  for (; t < nt; t += kAhead * bd) {
#pragma unroll
    for (int k = 0; k < kAhead; ++k) {
      const Idx tk = t + k * bd;
      if (k > 0 && tk >= nt) break;
      const Idx tn = tk + kAhead * bd;
      Raw zb, wb;
      if (tn < nt) load(tn, zb, wb);
      S zs[E], ws[E];
      T::unpack(za[k], zs);
      if (kPair) T::unpack(wa[k], ws);
      f(zs, ws, int64_t(tk) * E);
      za[k] = zb;
      if (kPair) wa[k] = wb;
    }
  }
}

// ---- per-precision element math ------------------------------------------------------------------
// 2^x by the hardware approximation (relative error ~2^-22; subnormal results flushed to 0, as
// the CPU kernels flush exp below 2^-126).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// max(a, b) where b is never NaN: a NaN a leaves b, as `a > b ? a : b` does, in one instruction
// instead of a compare and a select. Of +0 and -0 either may come back; a maximum is only ever
// used as a shift or a centre, where the two are the same number.
__device__ __forceinline__ float maxnum(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double maxnum(double a, double b) { return fmax(a, b); }

// The per-row (or per-thread) constants of the element formulas, for 16/32-bit inputs, and the
// element formulas themselves, at the fewest instructions that keep the CPU kernels' error
// bounds:
//  * shifts a = (v - M)/T are rounded once or twice (relative 2^-24 each) and e^a is 2^(a log2 e)
//    in hardware: a relative error <= |a| 1.2e-7 + 2.4e-7 per term, on terms that are all >= 0
//    (sums of weights; the divergences are first-order insensitive to a common relative
//    perturbation of their weights, see exact.hpp);
//  * the log-ratio x = (z - w - m - mlo)/T is the one quantity that must be exact to its last
//    bit (KL ~ Var(x)/2 down to 1e-12): z - w is split exactly (two-sum), and reduced about the
//    centre m, held as an exact float pair; near the centre d - mh is exact (Sterbenz).
// The maxima of the first pass are input values, exact in float (low parts 0); the backward
// passes its float64 normalisers as (hi, lo) pairs.
struct CentreF {
  static constexpr bool kFirst = false;  // see CentreF0
  float Mzh, Mzl, Mwh, Mwl;  // maxima (or normalisers times T) as float pairs
  float mh, c2;              // centre m = mh + ml, c2 = ml + mlo (+ the float64 residual)
  float invT, kq;            // 1/T and log2(e)/T
  float g;                   // exp((Mz - Mw - m - mlo)/T): pt = exp(a) g
  __device__ void set(double Mz, double Mw, double m, double mres, double mlo_, double invT_, double g_) {
    Mzh = float(Mz);
    Mzl = float(Mz - double(Mzh));
    Mwh = float(Mw);
    Mwl = float(Mw - double(Mwh));
    mh = float(m);
    c2 = float((m - double(mh)) + (mlo_ + mres));
    invT = float(invT_);
    kq = float(invT_ * 1.4426950408889634074);
    g = float(g_);
  }
  // e^((v - M)/T) about either maximum.
  __device__ float qexp(float w) const { return ex2_approx(((w - Mwh) - Mwl) * kq); }
  __device__ float pexp(float z) const { return ex2_approx(((z - Mzh) - Mzl) * kq); }
  // x = (z - w - m - mlo)/T; +-inf where z - w is (a masked token; w = -inf is masked by the
  // callers).
  __device__ float x(float z, float w) const {
    float d = z - w;
    float bb = d - z;
    float e = (z - (d - bb)) + (-w - bb);
    e = fabsf(d) < INFINITY ? e : 0.0f;
    return ((d - mh) + (e - c2)) * invT;
  }
  __device__ static float em2(float x) { return x * x * horner_imm<coef::em2_f>(x); }
  __device__ static float expm1s(float x) { return x * horner_imm<coef::expm1_f>(x); }
  __device__ static float jsp(float x) { return x * x * horner_imm<coef::jsp_f>(x); }
  __device__ static float jsq(float x) { return x * x * horner_imm<coef::jsq_f>(x); }
  __device__ static float jsd(float x) { return x * horner_imm<coef::jsd_f>(x); }
  // log(1 + lo/hi) for 0 <= lo <= hi (0 where hi = 0): 2 atanh(s), s = lo / (2 hi + lo) in
  // [0, 1/3] with one division (as on the CPU, elementary.hpp's log1p_ratio_c).
  __device__ static float log1p_ratio(float lo, float hi) {
    const float s = hi > 0.0f ? lo / (hi + hi + lo) : 0.0f;
    return 2.0f * s * horner_imm<coef::log1p_f>(s * s);
  }
};

// The same for float64 inputs: double throughout, z - w split exactly and the centre's own
// rounding residual mres kept (near-identical float64 rows have log-ratios of 1e-8 next to
// logits of size 10).
struct CentreD {
  static constexpr bool kFirst = false;
  double Mz, Mw, m, mres, mlo, invT, g;
  __device__ void set(double Mz_, double Mw_, double m_, double mres_, double mlo_, double invT_, double g_) {
    Mz = Mz_;
    Mw = Mw_;
    m = m_;
    mres = mres_;
    mlo = mlo_;
    invT = invT_;
    g = g_;
  }
  __device__ static double ex(double a) { return a < -745.0 ? 0.0 : exp(a); }
  __device__ double qexp(double w) const { return ex((w - Mw) * invT); }
  __device__ double pexp(double z) const { return ex((z - Mz) * invT); }
  __device__ double x(double z, double w) const {
    double s = z - w, bb = s - z;
    double e = (z - (s - bb)) + (-w - bb);
    if (!(fabs(s) < INFINITY)) return s;
    return (((s - m) + (e - mres)) - mlo) * invT;
  }
  __device__ static double em2(double x) { return x * x * horner(x, c_em2_d); }
  __device__ static double expm1s(double x) { return x * horner(x, c_expm1_d); }
  __device__ static double jsp(double x) { return x * x * horner(x, c_jsp_d); }
  __device__ static double jsq(double x) { return x * x * horner(x, c_jsq_d); }
  __device__ static double jsd(double x) { return x * horner(x, c_jsd_d); }
  __device__ static double log1p_ratio(double lo, double hi) {
    const double s = hi > 0.0 ? lo / (hi + hi + lo) : 0.0;
    return 2.0 * s * horner(s * s, c_log1p_d);
  }
};

// The first pass's centre in float: its maxima are input values (low parts 0) and the centre
// is their difference (g = 1), so the element formulas skip those terms -- the same bits, three
// instructions fewer per element.
struct CentreF0 : CentreF {
  static constexpr bool kFirst = true;
  __device__ float qexp(float w) const { return ex2_approx((w - Mwh) * kq); }
  __device__ float pexp(float z) const { return ex2_approx((z - Mzh) * kq); }
};

template <class S> struct CentreOf { using type = CentreF; };
template <> struct CentreOf<double> { using type = CentreD; };

// phi(d) = d e^d - e^d + 1 in double, series for |d| < 1 (as on the CPU).
__device__ __forceinline__ double phi_d(double d) { return d * d * horner(d, c_phi_d); }

// (A - B) - (C - D) for doubles, with only the final rounding: the difference of two centres
// (A - B and C - D are each exact as two-sums; their residuals are carried).
__device__ __forceinline__ double diff_of_diffs(double A, double B, double C, double D) {
  dd::DD a = dd::two_sum(A, -C);  // (A - C) exactly
  dd::DD b = dd::two_sum(B, -D);  // (B - D) exactly
  return (a.hi - b.hi) + (a.lo - b.lo);
}

// ---- block reductions (fixed tree: deterministic) -------------------------------------------------
__device__ __forceinline__ int block_or(int f) {
  double none[1] = {0.0};
  block_max<1>(none, f);
  return f;
}

template <class T>
__device__ __forceinline__ void put(void* out, int64_t i, double v) {
  static_cast<T*>(out)[i] = T(v);
}

// ---- pass 1, split: each block reads one span of a row once -------------------------------------
// A row is cut into spans of kSpan elements (a function of V alone, so a row's result never depends
// on the batch); one block per (row, span) keeps per-thread online sums about each thread's own
// maxima and centre, merges them exactly at the span's maxima, and writes one record. The row
// kernel then merges the records of its row in span order, exactly as the block merged its threads.
constexpr int64_t kSpan = TRMATH_CUDA_SPAN;
constexpr int kPairRec = 8;    // Mz, Mw, Q, Z, Phi, mag, R, flags (0x10000: fallback)
constexpr int kSingleRec = 5;  // M, k, R, B, flags
constexpr int kFallbackBit = 0x10000;

__host__ __device__ __forceinline__ int64_t nspans(int64_t V) { return (V + kSpan - 1) / kSpan; }

// =============================================================================================
// single-row reductions
// =============================================================================================
// Per-thread online state about its running maximum M: k = count of maxima, R = sum of
// exp((z - M)/T) below it, B = sum exp(a) (-a) (entropy). Moving to a larger maximum M' with
// d = (M' - M)/T: R' = (k + R) e^-d, B' = e^-d (B + d (k + R)), k' = 0 -- the CPU's segment merge.
struct SingleAcc {
  double M = -INFINITY, k = 0, R = 0, B = 0;
  __device__ __noinline__ void move_to(double M2, double invT) {
    if (M2 == M) return;
    if (M == -INFINITY || (k == 0 && R == 0)) {
      M = M2;
      k = R = B = 0;
      return;
    }
    double d = (M2 - M) * invT, f = exp(-d), A = k + R;
    R = A * f;
    B = f * (B + d * A);
    k = 0;
    M = M2;
  }
};

template <class In, bool kH>
__global__ void __launch_bounds__(kThreads, TRMATH_CUDA_SPAN_MINBLOCKS) single_span_kernel(SingleFwd a, double* rec) {
  using T = Tile<In>;
  using S = typename T::S;
  using C = typename CentreOf<S>::type;
  constexpr int E = T::E;
  constexpr bool kDouble = std::is_same<In, double>::value;
  const int64_t N = nrows(a.z), Vrow = a.z.shape[a.z.ndim - 1], vs = a.z.strides[a.z.ndim - 1];
  const int64_t ns = nspans(Vrow);
  const double invT = 1.0 / a.T;
  const S ninf = -INFINITY, pinf = INFINITY;
  for (int64_t wk = blockIdx.x; wk < N * ns; wk += gridDim.x) {
    const int64_t r = wk / ns, i0 = (wk % ns) * kSpan, V = min(kSpan, Vrow - i0);
    const In* z = reinterpret_cast<const In*>(a.z.data) + row_offset(a.z, r) + i0 * vs;
    const bool vec = vs == 1 && aligned16(z);
    C c;
    c.set(0.0, 0.0, 0.0, 0.0, 0.0, invT, 1.0);
    int flags = 0;
    // The thread's maximum tM (an input value) and its sums about it, in registers: aK counts
    // the elements equal to tM, aR sums exp((z - tM)/T) over the others, aB sums
    // exp(a) (-a). A new maximum moves them there (SingleAcc::move_to's segment merge), inline:
    // in a warp some thread finds a new maximum at most tiles of a span, so a move must cost a
    // few instructions, not a call. For 16/32-bit inputs the factor e^-d is the hardware 2^x
    // (relative error ~2^-22 on the sums moved, each move; the terms themselves carry 2^-22.5
    // and their shifts' roundings).
    S tM = ninf;
    double aK = 0.0, aR = 0.0, aB = 0.0;
    for_tiles<In, false, int>(z, z, int(V), vs, vs, vec, [&](S (&v)[E], S (&)[E], int64_t) {
      S mx = ninf;
      bool bad = false;  // NaN or +inf (each compare is false for NaN)
#pragma unroll
      for (int u = 0; u < E; ++u) {
        bad |= !(v[u] < pinf);
        mx = maxnum(v[u], mx);
      }
      if (bad) {
#pragma unroll
        for (int u = 0; u < E; ++u) {
          if (v[u] != v[u]) flags |= kNanA;
          if (v[u] == pinf) flags |= kPosInfA;
        }
      }
      if (flags) return;
      if (mx > tM) {  // the thread's maximum is an input value: compared exactly
        if (tM > ninf) {
          const double d = (double(mx) - double(tM)) * invT, A = aK + aR;  // d > 0, exact difference
          double f;
          if constexpr (kDouble) f = exp(-d);
          else f = double(ex2_approx(float(tM - mx) * c.kq));
          aR = A * f;
          if (kH) aB = f * (aB + d * A);
          aK = 0.0;
        }
        tM = mx;
      }
      if (tM == ninf) return;
      S sR = 0, sk = 0, sB = 0;
#pragma unroll
      for (int u = 0; u < E; ++u) {
        S e, na;
        if constexpr (kDouble) {
          double ad = (v[u] - tM) * invT;
          e = CentreD::ex(ad);
          na = -ad;
        } else {
          const float sh = v[u] - tM;  // exact near the maximum; relative 2^-24 elsewhere
          e = ex2_approx(sh * c.kq);
          na = -sh * c.invT;
        }
        const bool top = v[u] == tM;
        sR += top ? S(0) : e;
        sk += top ? S(1) : S(0);
        if (kH) sB += v[u] > ninf ? e * na : S(0);
      }
      aR += double(sR);
      aK += double(sk);
      if (kH) aB += double(sB);
    });
    SingleAcc acc;
    if (tM > ninf) {
      acc.M = double(tM);
      acc.k = aK;
      acc.R = aR;
      acc.B = aB;
    }
    double mv[1] = {acc.M};
    block_max<1>(mv, flags);
    double sums[3] = {0, 0, 0};
    if (!flags && mv[0] > -INFINITY) {
      acc.move_to(mv[0], invT);
      sums[0] = acc.R;
      sums[1] = acc.k;
      sums[2] = acc.B;
    }
    block_sum<3>(sums);
    if (threadIdx.x == 0) {
      double* o = rec + wk * kSingleRec;
      o[0] = mv[0];
      o[1] = sums[1];
      o[2] = sums[0];
      o[3] = sums[2];
      o[4] = double(flags);
    }
  }
}

template <class In, bool kH>
__global__ void __launch_bounds__(kThreads, 2) single_fwd_kernel(SingleFwd a, const double* rec) {
  using T = Tile<In>;
  using S = typename T::S;
  constexpr bool kDouble = std::is_same<In, double>::value;
  using OutT = typename std::conditional<kDouble, double, float>::type;
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1], vs = a.z.strides[a.z.ndim - 1], ns = nspans(V);
  const double invT = 1.0 / a.T;
  constexpr bool want_h = kH;
  const bool want_lp = a.op == SingleOp::logprob || a.op == SingleOp::logprob_entropy;
  const bool want_lse = a.op == SingleOp::lse;
  __shared__ double s_zt;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const In* z = reinterpret_cast<const In*>(a.z.data) + row_offset(a.z, r);
    // ---- the spans' records (see pair_fwd_kernel)
    SingleAcc acc;
    int flags = 0;
    for (int64_t j = threadIdx.x; j < ns; j += blockDim.x) {
      const double* o = rec + (r * ns + j) * kSingleRec;
      flags |= int(o[4]);
      if (flags || o[0] == -INFINITY) continue;
      SingleAcc b;
      b.M = o[0];
      b.k = o[1];
      b.R = o[2];
      b.B = o[3];
      const double M2 = fmax(acc.M, b.M);
      acc.move_to(M2, invT);
      b.move_to(M2, invT);
      acc.k += b.k;
      acc.R += b.R;
      acc.B += b.B;
    }
    // ---- merge the threads at the row maximum
    double mv[1] = {acc.M};
    block_max<1>(mv, flags);
    const double M = mv[0];
    if (!(flags & (kNanA | kPosInfA)) && M == -INFINITY) flags |= kAllNegInfA;
    double sums[3] = {0, 0, 0};
    if (!flags) {
      acc.move_to(M, invT);
      sums[0] = acc.R;
      sums[1] = acc.k;
      sums[2] = acc.B;
    }
    block_sum<3>(sums);
    double R = sums[0], k = sums[1], B = sums[2];
    double zt = 0.0;
    if (want_lp && !flags) {
      if (threadIdx.x == 0) {
        int64_t t = a.tokens[r];
        s_zt = (t < 0 || t >= V) ? NAN : double(T::one(z + t * vs));
      }
      __syncthreads();
      zt = s_zt;
      __syncthreads();
      if (zt != zt) flags |= kTokenRange;
    }
    double lse = NAN, H = NAN, lp = NAN, logA = NAN;
    if (!flags) {
      logA = log(k) + log1p(R / k);
      lse = M * invT + logA;
      if (want_lse) {
        // lse = M/T + log A cancels when lse ~ 0 (log-probabilities passed as logits): redo
        // the row in double, then in double-double, as the CPU does.
        double cond = (fabs(M * invT) + fabs(logA)) / fabs(lse);
        bool in_double = kDouble;
        if (!in_double && cond > 4.0) {
          double s2[2] = {0, 0};
          for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
            double zi = double(T::one(z + i * vs));
            if (zi == M) s2[1] += 1.0;
            else s2[0] += exp((zi - M) * invT);
          }
          block_sum<2>(s2);
          logA = log(s2[1]) + log1p(s2[0] / s2[1]);
          lse = M * invT + logA;
          cond = (fabs(M * invT) + fabs(logA)) / fabs(lse);
          in_double = true;
        }
        if (in_double && cond > 1000.0) {
          // Double-double: each term exp((z - M)/T) to ~1e-30 relative. Thread partials are
          // summed in a fixed order (thread 0 adds them in index order).
          // The maxima (terms exactly 1) are counted apart, as on the CPU (dd::log_count_plus).
          dd::DD t{0.0, 0.0};
          double kmax = 0.0;
          for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
            double zi = double(T::one(z + i * vs));
            if (zi == -INFINITY) continue;
            if (zi == M) {
              kmax += 1.0;
              continue;
            }
            dd::DD x = dd::two_sum(zi, -M);
            if (a.T != 1.0) x = dd::div(x, a.T);
            t = dd::add(t, dd::exp(x));
          }
          __shared__ double hi[kThreads], lo[kThreads], cnt[kThreads];
          hi[threadIdx.x] = t.hi;
          lo[threadIdx.x] = t.lo;
          cnt[threadIdx.x] = kmax;
          __syncthreads();
          if (threadIdx.x == 0) {
            dd::DD A{0.0, 0.0};
            double k = 0.0;
            for (int j = 0; j < int(blockDim.x); ++j) {
              A = dd::add(A, dd::DD{hi[j], lo[j]});
              k += cnt[j];
            }
            dd::DD l = dd::add(dd::div(dd::DD{M, 0.0}, a.T), dd::log_count_plus(k, A));
            hi[0] = l.hi + l.lo;
          }
          __syncthreads();
          lse = hi[0];
          __syncthreads();
        }
      }
      H = want_h ? B / (k + R) + logA : 0.0;
      lp = (zt - M) * invT - logA;
    }
    if (threadIdx.x == 0) {
      if (a.status) a.status[r] = flags;
      if (a.stats) {
        double* st = a.stats + kSingleStats * r;
        st[0] = lse;
        st[1] = H;
        st[2] = flags ? NAN : M;
        st[3] = logA;
      }
      switch (a.op) {
        case SingleOp::lse: put<OutT>(a.out0, r, lse); break;
        case SingleOp::entropy: put<OutT>(a.out0, r, H); break;
        case SingleOp::logprob: put<OutT>(a.out0, r, lp); break;
        case SingleOp::logprob_entropy:
          put<OutT>(a.out0, r, lp);
          put<OutT>(a.out1, r, H);
          break;
      }
    }
    __syncthreads();
  }
}

// =============================================================================================
// pair reductions
// =============================================================================================
// kTVv: TV's value alone (a forward whose caller keeps no statistics): T+ and Q+ without the
// side masses P+-0, Q-0 the backward needs -- 5 of TV's 10 sums, about a quarter of its full
// pass's time.
enum Terms : int { kCentre = 0, kKL = 1, kTV = 2, kJS = 3, kTVv = 4 };

// Per-thread partial of the first pass, about its own maxima (Mz, Mw) and centre m = Mz - Mw:
// Q = sum qt, Z = sum q (e^x - 1), Phi = sum q phi(x) (KL), mag = sum of |terms| of Phi's
// merges (cancellation check), R = sum pt where q = 0 < p (TV, JS).
struct PairAcc {
  double Mz = -INFINITY, Mw = -INFINITY, Q = 0, Z = 0, Phi = 0, mag = 0, R = 0;
  __device__ bool empty() const { return Q == 0 && R == 0 && Z == 0 && Phi == 0; }
  // Move to maxima (Mz2, Mw2) >= (Mz, Mw):  delta = (m - m2)/T, f = e^((Mw - Mw2)/T),
  // f e^delta = e^((Mz - Mz2)/T) <= 1; Phi' = f e^d Phi + d f e^d Z + f Q phi(d).
  // delta is formed as (Mz - Mz2) - (Mw - Mw2) with one rounding: near-identical rows move by
  // deltas of 1e-8 between centres of size 10.
  __device__ __noinline__ void move_to(double Mz2, double Mw2, double invT) {
    if (Mz2 == Mz && Mw2 == Mw) return;
    if (Mz == -INFINITY || Mw == -INFINITY || empty()) {
      Mz = Mz2;
      Mw = Mw2;
      Q = Z = Phi = mag = R = 0;
      return;
    }
    double d = diff_of_diffs(Mz, Mw, Mz2, Mw2) * invT;
    double f = exp((Mw - Mw2) * invT);
    double fe = exp((Mz - Mz2) * invT);
    double f_em1 = d < 1.0 ? f * expm1(d) : fe - f;
    double f_phi = fabs(d) < 1.0 ? f * phi_d(d) : fe * (d - 1.0) + f;
    double t1 = fe * Phi, t2 = d * fe * Z, t3 = Q * f_phi;
    Phi = t1 + t2 + t3;
    mag = fe * mag + fabs(t2) + t3;
    Z = fe * Z + f_em1 * Q;
    Q = f * Q;
    R = fe * R;
    Mz = Mz2;
    Mw = Mw2;
  }
};

// Terms of one element pair (z, w) at the given centre, added to the accumulators t[]:
//   0 qt, 1 q (e^x - 1), then kKL: 2 Phi; kTV: 2 T+, 3 Q+, 4 P+, 5 P-, 6 P0, 7 Q-, 8 Q0;
//   kJS: 2, 3 the two halves; kTVv: 2 T+, 3 Q+; last (all but kKL): R (q = 0 < p).
template <class S, class C, int kT>
__device__ __forceinline__ void pair_terms(S zv, S wv, const C& c, S* t, bool& qzp) {
  const S ninf = -INFINITY, zero = 0;
  const bool wneg = wv == ninf, zneg = zv == ninf, only_p = wneg && !zneg;
  qzp |= only_p;
  S qt = c.qexp(wv);  // 0 where w = -inf
  // x for every element, then 0 where w = -inf (c.x is finite or +-inf there): branch-free, as
  // the masked elements are few.
  S x = c.x(zv, wv);
  x = wneg ? zero : x;
  const bool small = fabs(x) < S(1);
  S e2 = C::em2(x);
  S em1_s = x + e2;
  // p's own exponential is needed where |x| >= 1 or q = 0 < p. In float it costs three
  // instructions: cheaper than a divergent branch.
  S ez = zero;
  if (std::is_same<S, float>::value || !small || only_p) ez = c.pexp(zv);
  const S pz = C::kFirst ? ez : ez * S(c.g);  // g = 1 in the first pass
  S pt = wneg ? zero : pz;
  S em1 = small ? qt * em1_s : pt - qt;
  S pfull = small ? qt + qt * em1_s : pt;
  t[0] += qt;
  t[1] += em1;
  if (kT == kKL) {
    S xc = x > S(-200) ? x : S(-200);
    t[2] += small ? qt * (x * em1_s - e2) : pt * (xc - S(1)) + qt;
  } else if (kT == kTVv) {
    const bool pos = x > zero;
    t[2] += pos ? em1 : zero;
    t[3] += pos ? qt : zero;
  } else if (kT == kTV) {
    const bool pos = x > zero, neg = x < zero, tie = !(pos || neg);
    t[2] += pos ? em1 : zero;
    t[3] += pos ? qt : zero;
    t[4] += pos ? pfull : zero;
    t[5] += neg ? pfull : zero;
    t[6] += tie ? pfull : zero;
    t[7] += neg ? qt : zero;
    t[8] += tie ? qt : zero;
  } else if (kT == kJS) {
    const bool js_small = fabs(x) < S(0.5);
    S tp, tq;
    // Both forms for every element, then a select: a branch would run both anyway in any
    // warp holding both kinds of element (almost every warp), one after the other.
    {
      S sp = qt * C::jsp(x), sq = qt * C::jsq(x);
      S hi = pfull > qt ? pfull : qt, lo = pfull > qt ? qt : pfull;
      S l1 = C::log1p_ratio(lo, hi);
      S xc = x > S(-200) ? x : S(-200);
      const bool ppos = pfull > qt;
      S d_big = S(kLn2d) - l1;
      S dp = ppos ? d_big : d_big + xc;
      S dq = ppos ? d_big - xc : d_big;
      S bp = pfull * dp + (qt - pfull) * S(0.5);
      S bq = qt * dq + (pfull - qt) * S(0.5);
      tp = js_small ? sp : bp;
      tq = js_small ? sq : bq;
    }
    S praw = pz;
    tp = only_p ? praw * S(kLn2d - 0.5) : tp;
    tq = only_p ? praw * S(0.5) : tq;
    t[2] += tp + tq;  // slots as the CPU's (rowfinish.hpp): both halves, then q's alone
    t[3] += tq;
  }
  if (kT != kKL) {
    constexpr int last = kT == kCentre ? 2 : kT == kTV ? 9 : 4;  // kJS, kTVv: 4
    t[last] += only_p ? pz : zero;
  }
}

template <int kT> struct NTerms { static constexpr int value = kT == kCentre ? 3 : kT == kKL ? 3 : kT == kTV ? 10 : 5; };

// Record slot of a full pass's sum j: kTVv's sums go where kTV's are (its side masses stay 0),
// so the row kernel reads both alike.
template <int kT> __host__ __device__ constexpr int record_slot(int j) { return kT == kTVv && j == 4 ? 9 : j; }

// One full pass over a row at a fixed centre; returns the block sums in v[] (slot layout of
// pair_terms) and ORs kQZeroP into flags.
template <class In, int kT, class Idx = int64_t>
__device__ void full_pass(const In* z, const In* w, Idx V, int64_t vsz, int64_t vsw, bool vec,
                          const typename CentreOf<typename Tile<In>::S>::type& c,
                          double (&v)[NTerms<kT>::value], int& flags) {
  using S = typename Tile<In>::S;
  using C = typename CentreOf<S>::type;
  constexpr int K = NTerms<kT>::value;
  constexpr int E = Tile<In>::E;
  for (int j = 0; j < K; ++j) v[j] = 0.0;
  bool qzp = false;
  for_tiles<In, true, Idx>(z, w, V, vsz, vsw, vec, [&](S (&zv)[E], S (&wv)[E], int64_t) {
    S t[K];
#pragma unroll
    for (int j = 0; j < K; ++j) t[j] = 0;
#pragma unroll
    for (int u = 0; u < E; ++u) pair_terms<S, C, kT>(zv[u], wv[u], c, t, qzp);
#pragma unroll
    for (int j = 0; j < K; ++j) v[j] += double(t[j]);
  });
  block_sum<K>(v);
  if (block_or(qzp ? int(kQZeroP) : 0)) flags |= kQZeroP;
}

// Row state, identical in every thread of the block (every value is a block-reduced one).
struct PairSt {
  int flags = 0, iter = 0;
  bool fallback = false;
  double mag = 0, Mz = 0, Mw = 0, m = 0, mres = 0, mlo = 0;
  double s[12] = {};
};

template <class In, int kT>
__device__ void run_full(const In* z, const In* w, int64_t V, int64_t vsz, int64_t vsw, bool vec, PairSt& s,
                         double invT) {
  using S = typename Tile<In>::S;
  typename CentreOf<S>::type c;
  // The float path forms z - w - m exactly from float pairs, so the centre's own residual is
  // used only by float64 rows (as on the CPU).
  c.set(s.Mz, s.Mw, s.m, std::is_same<In, double>::value ? s.mres : 0.0, s.mlo, invT,
        exp((((s.Mz - s.Mw) - s.m) - s.mlo) * invT));
  double v[NTerms<kT>::value];
  full_pass<In, kT>(z, w, V, vsz, vsw, vec, c, v, s.flags);
  if (kT == kTV) {
    for (int k = 0; k < 7; ++k) s.s[k] = v[k];
    s.s[8] = v[7];
    s.s[9] = v[8];
    s.s[7] = v[9];
  } else if (kT == kKL) {
    for (int k = 0; k < 3; ++k) s.s[k] = v[k];
    s.s[7] = 0.0;
  } else {
    constexpr int Kmain = NTerms<kT>::value - 1;
    for (int k = 0; k < Kmain; ++k) s.s[k] = v[k];
    s.s[7] = v[Kmain];
  }
}

// Row state between the row kernels' two phases (identical in every thread of the row's block).
constexpr int kStateLen = 24;
constexpr int kFullRec = 11;  // the K <= 10 sums of a full pass over one span, then kQZeroP

__device__ __forceinline__ void save_state(double* o, const PairSt& s, bool done) {
  o[0] = s.flags;
  o[1] = s.iter;
  o[2] = s.fallback ? 1.0 : 0.0;
  o[3] = s.mag;
  o[4] = s.Mz;
  o[5] = s.Mw;
  o[6] = s.m;
  o[7] = s.mres;
  o[8] = s.mlo;
  o[9] = done ? 1.0 : 0.0;
  for (int j = 0; j < 12; ++j) o[10 + j] = s.s[j];
}

__device__ __forceinline__ bool load_state(const double* o, PairSt& s) {
  s.flags = int(o[0]);
  s.iter = int(o[1]);
  s.fallback = o[2] != 0.0;
  s.mag = o[3];
  s.Mz = o[4];
  s.Mw = o[5];
  s.m = o[6];
  s.mres = o[7];
  s.mlo = o[8];
  for (int j = 0; j < 12; ++j) s.s[j] = o[10 + j];
  return o[9] != 0.0;
}

// The sums of one full pass (run_full's slots) from the per-span records, added in span order.
template <int kT>
__device__ void full_from_records(const double* rec, int64_t ns, PairSt& s) {
  constexpr int K = NTerms<kT>::value;
  double v[K];
  for (int j = 0; j < K; ++j) v[j] = 0.0;
  int q = 0;
  for (int64_t i = 0; i < ns; ++i) {
    const double* o = rec + i * kFullRec;
    for (int j = 0; j < K; ++j) v[j] += o[j];
    q |= int(o[kFullRec - 1]);
  }
  if (q) s.flags |= kQZeroP;
  if (kT == kTV) {
    for (int k = 0; k < 7; ++k) s.s[k] = v[k];
    s.s[8] = v[7];
    s.s[9] = v[8];
    s.s[7] = v[9];
  } else if (kT == kKL) {
    for (int k = 0; k < 3; ++k) s.s[k] = v[k];
    s.s[7] = 0.0;
  } else {
    constexpr int Kmain = K - 1;
    for (int k = 0; k < Kmain; ++k) s.s[k] = v[k];
    s.s[7] = v[Kmain];
  }
}

// One full pass (KL, TV or JS terms) over one span of a row, at the centre its row kernel chose
// (rows the row kernel finished are skipped).
template <class In, int kT>
__global__ void __launch_bounds__(kThreads, TRMATH_CUDA_SPAN_MINBLOCKS) pair_full_span_kernel(PairFwd a, const double* state, double* rec) {
  using S = typename Tile<In>::S;
  constexpr int K = NTerms<kT>::value;
  constexpr bool kDouble = std::is_same<In, double>::value;
  const int64_t N = nrows(a.z), Vrow = a.z.shape[a.z.ndim - 1], ns = nspans(Vrow);
  const int64_t vsz = a.z.strides[a.z.ndim - 1], vsw = a.w.strides[a.w.ndim - 1];
  const double invT = 1.0 / a.T;
  for (int64_t wk = blockIdx.x; wk < N * ns; wk += gridDim.x) {
    const int64_t r = wk / ns, i0 = (wk % ns) * kSpan, V = min(kSpan, Vrow - i0);
    PairSt s;
    const bool done = load_state(state + r * kStateLen, s);
    double v[K];
    for (int j = 0; j < K; ++j) v[j] = 0.0;
    int f = 0;
    if (!done) {
      const In* z = reinterpret_cast<const In*>(a.z.data) + row_offset(a.z, r) + i0 * vsz;
      const In* w = reinterpret_cast<const In*>(a.w.data) + row_offset(a.w, r) + i0 * vsw;
      const bool vec = vsz == 1 && vsw == 1 && aligned16(z) && aligned16(w);
      typename CentreOf<S>::type c;
      c.set(s.Mz, s.Mw, s.m, kDouble ? s.mres : 0.0, s.mlo, invT, exp((((s.Mz - s.Mw) - s.m) - s.mlo) * invT));
      full_pass<In, kT, int>(z, w, int(V), vsz, vsw, vec, c, v, f);
    }
    if (threadIdx.x == 0) {
      double* o = rec + wk * kFullRec;
      if (kT == kTVv)
        for (int j = 4; j < 9; ++j) o[j] = 0.0;
      for (int j = 0; j < K; ++j) o[record_slot<kT>(j)] = v[j];
      o[kFullRec - 1] = double(f & kQZeroP);
    }
  }
}

template <class In, int kFirst>
__global__ void __launch_bounds__(kThreads, TRMATH_CUDA_SPAN_MINBLOCKS) pair_span_kernel(PairFwd a, double* rec) {
  using Tl = Tile<In>;
  using S = typename Tl::S;
  // The first pass's centre (CentreF0 for float: see there; TRMATH_CUDA_FIRST_LEAN=0, the
  // general one, for the lab).
  using C = typename std::conditional<std::is_same<S, float>::value && TRMATH_CUDA_FIRST_LEAN, CentreF0,
                                      typename CentreOf<S>::type>::type;
  constexpr int E = Tl::E;
  constexpr bool kDouble = std::is_same<In, double>::value;
  const int64_t N = nrows(a.z), Vrow = a.z.shape[a.z.ndim - 1], ns = nspans(Vrow);
  const int64_t vsz = a.z.strides[a.z.ndim - 1], vsw = a.w.strides[a.w.ndim - 1];
  const double invT = 1.0 / a.T;
  const S ninf = -INFINITY, pinf = INFINITY;
  for (int64_t wk = blockIdx.x; wk < N * ns; wk += gridDim.x) {
    const int64_t r = wk / ns, i0 = (wk % ns) * kSpan, V = min(kSpan, Vrow - i0);
    const In* z = reinterpret_cast<const In*>(a.z.data) + row_offset(a.z, r) + i0 * vsz;
    const In* w = reinterpret_cast<const In*>(a.w.data) + row_offset(a.w, r) + i0 * vsw;
    const bool vec = vsz == 1 && vsw == 1 && aligned16(z) && aligned16(w);
    PairAcc acc;
    C c;
    c.set(0.0, 0.0, 0.0, 0.0, 0.0, invT, 1.0);
    int flags = 0;
    bool thread_fb = false, qzp = false;
    // The thread's maxima (exact input values), and the scale and centre its sums are kept
    // about: moved only when a maximum passes it by thr (30 in units of T), so that the exact
    // move (PairAcc::move_to, a warp-divergent branch) runs about once per thread instead of
    // at every new maximum. Terms stay below e^30 in float.
    S tMz = ninf, tMw = ninf, sMz = ninf, sMw = ninf;
    const S thr = S(30.0 * a.T);
    // The sums live in registers; acc (in local memory: move_to is not inlined) holds them only
    // across a move.
    double aQ = 0.0, aZ = 0.0, aPhi = 0.0, aMag = 0.0, aR = 0.0;
    auto to_acc = [&] { acc.Q = aQ; acc.Z = aZ; acc.Phi = aPhi; acc.mag = aMag; acc.R = aR; };
    auto from_acc = [&] { aQ = acc.Q; aZ = acc.Z; aPhi = acc.Phi; aMag = acc.mag; aR = acc.R; };
    for_tiles<In, true, int>(z, w, int(V), vsz, vsw, vec, [&](S (&zv)[E], S (&wv)[E], int64_t) {
      S mz = ninf, mw = ninf;
      bool bad = false;  // NaN or +inf (each compare is false for NaN)
#pragma unroll
      for (int u = 0; u < E; ++u) {
        bad |= !(zv[u] < pinf) || !(wv[u] < pinf);
        mz = maxnum(zv[u], mz);
        mw = maxnum(wv[u], mw);
      }
      if (bad) {
#pragma unroll
        for (int u = 0; u < E; ++u) {
          if (zv[u] != zv[u]) flags |= kNanA;
          if (zv[u] == pinf) flags |= kPosInfA;
          if (wv[u] != wv[u]) flags |= kNanB;
          if (wv[u] == pinf) flags |= kPosInfB;
        }
      }
      const bool anyz = mz > ninf, anyw = mw > ninf;
      if (flags & kErrorBits) return;
      tMz = maxnum(mz, tMz);
      tMw = maxnum(mw, tMw);
      if (mz > sMz + thr || mw > sMw + thr) {  // -inf + thr = -inf: the first live tile moves
        sMz = tMz;
        sMw = tMw;
        to_acc();
        acc.move_to(double(sMz), double(sMw), invT);
        from_acc();
        if (acc.Mz > -INFINITY && acc.Mw > -INFINITY) {
          const double m = acc.Mz - acc.Mw;
          c.set(acc.Mz, acc.Mw, m, kDouble ? centre_residual(acc.Mz, acc.Mw, m) : 0.0, 0.0, invT, 1.0);
        }
      }
      if (acc.Mz == -INFINITY || acc.Mw == -INFINITY) {
        // A centre needs both maxima; elements seen before one exists go to the fallback.
        if (anyz || anyw) thread_fb = true;
        return;
      }
      constexpr int K = NTerms<kFirst>::value;
      S t[K];
#pragma unroll
      for (int j = 0; j < K; ++j) t[j] = 0;
#ifndef TRMATH_CUDA_LAB_NOTERMS  // lab-only timing knob: defined, the results are wrong
#pragma unroll
      for (int u = 0; u < E; ++u) pair_terms<S, C, kFirst>(zv[u], wv[u], c, t, qzp);
#endif
      aQ += double(t[0]);
      aZ += double(t[1]);
      if (kFirst == kKL) {
        aPhi += double(t[2]);
        aMag += double(t[2]);
      } else {
        aR += double(t[2]);
      }
    });
    double mv[2] = {double(tMz), double(tMw)};
    int f = flags | (thread_fb ? kFallbackBit : 0) | (qzp ? int(kQZeroP) : 0);
    block_max<2>(mv, f);
    double v[5] = {0, 0, 0, 0, 0};
    if (!(f & kErrorBits) && mv[0] > -INFINITY && mv[1] > -INFINITY) {
      to_acc();
      acc.move_to(mv[0], mv[1], invT);
      v[0] = acc.Q;
      v[1] = acc.Z;
      v[2] = acc.Phi;
      v[3] = acc.mag;
      v[4] = acc.R;
    }
    block_sum<5>(v);
    if (threadIdx.x == 0) {
      double* o = rec + wk * kPairRec;
      o[0] = mv[0];
      o[1] = mv[1];
      for (int j = 0; j < 5; ++j) o[2 + j] = v[j];
      o[7] = double(f);
    }
  }
}

// kPhase 0: merge the first pass's span records and run the CPU's stage machine; KL rows finish
// here, TV and JS rows store their state for the span kernel of their full pass. kPhase 1 (TV,
// JS): sum those records, accept or take further passes, finish.
template <class In, int OP, int kPhase>
__global__ void __launch_bounds__(kThreads, 2) pair_fwd_kernel(PairFwd a, const double* rec, double* state,
                                                                const double* frec) {
  using Tl = Tile<In>;
  using S = typename Tl::S;
  using OutT = typename std::conditional<std::is_same<In, double>::value, double, float>::type;
  constexpr bool kDouble = std::is_same<In, double>::value;
  constexpr int kFirst = OP == int(PairOp::kl) ? kKL : kCentre;
  constexpr int kFull = OP == int(PairOp::kl) ? kKL : OP == int(PairOp::tv) ? kTV : kJS;
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1], ns = nspans(V);
  const int64_t vsz = a.z.strides[a.z.ndim - 1], vsw = a.w.strides[a.w.ndim - 1];
  const double invT = 1.0 / a.T, T = a.T;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const In* z = reinterpret_cast<const In*>(a.z.data) + row_offset(a.z, r);
    const In* w = reinterpret_cast<const In*>(a.w.data) + row_offset(a.w, r);
    const bool vec = vsz == 1 && vsw == 1 && aligned16(z) && aligned16(w);
    PairSt s;
    if constexpr (kPhase == 1) {
      if (load_state(state + r * kStateLen, s)) continue;  // finished in phase 0
      full_from_records<kFull>(frec + r * ns * kFullRec, ns, s);
      if (!(pair_accept(OP, kDouble, T, s.s, s.flags, s.mlo) || s.iter >= 3)) {
        ++s.iter;
        for (;;) {
          if (OP == int(PairOp::kl)) run_full<In, kKL>(z, w, V, vsz, vsw, vec, s, invT);
          else if (OP == int(PairOp::tv)) run_full<In, kTV>(z, w, V, vsz, vsw, vec, s, invT);
          else run_full<In, kJS>(z, w, V, vsz, vsw, vec, s, invT);
          if (pair_accept(OP, kDouble, T, s.s, s.flags, s.mlo) || s.iter >= 3) break;
          ++s.iter;
        }
      }
    } else {
    // ---- the spans' records: thread j holds span j's (spans beyond the block fold in order)
    PairAcc acc;
    int flags = 0;
    bool thread_fb = false, qzp = false;
    for (int64_t j = threadIdx.x; j < ns; j += blockDim.x) {
      const double* o = rec + (r * ns + j) * kPairRec;
      const int f = int(o[7]);
      flags |= f & kErrorBits;
      thread_fb |= (f & kFallbackBit) != 0;
      qzp |= (f & kQZeroP) != 0;
      if (f & kErrorBits) continue;
      PairAcc b;
      b.Mz = o[0];
      b.Mw = o[1];
      b.Q = o[2];
      b.Z = o[3];
      b.Phi = o[4];
      b.mag = o[5];
      b.R = o[6];
      if (b.Mz == -INFINITY || b.Mw == -INFINITY) continue;  // an empty span (its fallback bit says if not)
      if (acc.Mz == -INFINITY) {
        acc = b;
        continue;
      }
      const double Mz2 = fmax(acc.Mz, b.Mz), Mw2 = fmax(acc.Mw, b.Mw);
      acc.move_to(Mz2, Mw2, invT);
      b.move_to(Mz2, Mw2, invT);
      acc.Q += b.Q;
      acc.Z += b.Z;
      acc.Phi += b.Phi;
      acc.mag += b.mag;
      acc.R += b.R;
    }
    // ---- merge: row maxima, then every thread's partial moved there and summed
    {
      double mv[2] = {acc.Mz, acc.Mw};
      int f = flags | (thread_fb ? kFallbackBit : 0) | (qzp ? int(kQZeroP) : 0);
      block_max<2>(mv, f);
      s.Mz = mv[0];
      s.Mw = mv[1];
      s.fallback = (f & kFallbackBit) != 0;
      s.flags = f & (kErrorBits | kQZeroP);
      if (!(s.flags & (kNanA | kPosInfA)) && s.Mz == -INFINITY) s.flags |= kAllNegInfA;
      if (!(s.flags & (kNanB | kPosInfB)) && s.Mw == -INFINITY) s.flags |= kAllNegInfB;
      double v[5] = {0, 0, 0, 0, 0};
      if (!(s.flags & kErrorBits)) {
        acc.move_to(s.Mz, s.Mw, invT);
        v[0] = acc.Q;
        v[1] = acc.Z;
        v[2] = acc.Phi;
        v[3] = acc.mag;
        v[4] = acc.R;
      }
      block_sum<5>(v);
      s.s[0] = v[0];
      s.s[1] = v[1];
      s.s[2] = v[2];
      s.s[7] = kFirst == kKL ? 0.0 : v[4];  // KL = +inf is decided by the flag alone
      s.mag = v[3];
    }
    // ---- the CPU's stage machine (kernels_fwd.cpp, PairAlgo::next), in order
    bool done = (s.flags & kErrorBits) != 0;
    if (!done) {
      s.m = s.Mz - s.Mw;
      s.mres = centre_residual(s.Mz, s.Mw, s.m);
      int stage = 1;  // 0: centre pass, 1: full passes, 2: centre known from the sums
      if (s.fallback) {
        s.flags &= kErrorBits;  // recomputed by the passes below
        stage = OP == int(PairOp::kl) ? 1 : 0;
      } else if (OP == int(PairOp::kl)) {
        const double kMerge = 32.0;
        if (s.mag <= kMerge * s.s[2] &&
            pair_accept(OP, kDouble, T, s.s, s.flags, s.mlo, s.s[2] > 0 ? s.mag / s.s[2] : 1.0)) {
          done = true;
        } else if (s.mag > kMerge * s.s[2]) {
          s.mlo = T * log1p(s.s[1] / s.s[0]);
        }
      } else {
        stage = 2;
      }
      if (!done && stage == 0) {
        run_full<In, kCentre>(z, w, V, vsz, vsw, vec, s, invT);
        stage = 2;
      }
      if (!done && stage == 2) {
        double Zt = (s.s[1] + s.s[7]) / s.s[0];
        s.mlo += T * log1p(Zt);
      }
      if (!done) {
        // The first full pass runs span by span (pair_full_span_kernel), then phase 1. (For KL:
        // the rows whose first-pass centre, the difference of the maxima, is too far from the
        // row's to be accepted -- about one row in five on rows of i.i.d. log-ratios, as on the
        // CPU -- so that they are read at the speed of the span kernels, not one block each.)
        if (threadIdx.x == 0) save_state(state + r * kStateLen, s, false);
        __syncthreads();
        continue;
      }
    }
    }
    // ---- finish (the CPU's PairAlgo::finish)
    if (threadIdx.x == 0) {
      if (kPhase == 0) save_state(state + r * kStateLen, s, true);
      if (a.status) a.status[r] = s.flags & kErrorBits;
      double out = pair_finish(OP, T, s.s, s.flags, s.Mz, s.Mw, s.m, s.mlo,
                               a.stats ? a.stats + kPairStats * r : nullptr);
      put<OutT>(a.out, r, out);
    }
    __syncthreads();
  }
}

// =============================================================================================
// backward: elementwise from the per-row statistics
// =============================================================================================
constexpr int kBwdThreads = 256;
constexpr int kBwdTiles = 4;  // tiles of E elements per thread per block-step

template <class In>
__global__ void __launch_bounds__(kBwdThreads) single_bwd_kernel(SingleBwd a) {
  using Tl = Tile<In>;
  using S = typename Tl::S;
  using C = typename CentreOf<S>::type;
  constexpr int E = Tl::E;
  constexpr int64_t kChunk = int64_t(kBwdThreads) * kBwdTiles * E;
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1], vs = a.z.strides[a.z.ndim - 1];
  const int64_t nch = (V + kChunk - 1) / kChunk;
  const double invT = 1.0 / a.T;
  In* dz = static_cast<In*>(a.dz);
  for (int64_t u = blockIdx.x; u < N * nch; u += gridDim.x) {
    const int64_t r = u / nch, ch = u % nch;
    const In* z = reinterpret_cast<const In*>(a.z.data) + row_offset(a.z, r);
    In* out = dz + r * V;
    const bool vec = vs == 1 && aligned16(z) && aligned16(out);
    const double* st = a.stats + kSingleStats * r;
    const double lse = st[0], H = st[1], Mx = st[2], logA = st[3];
    const S g0 = S(a.g0[r] * invT), g1 = S(a.g1 ? a.g1[r] * invT : 0.0);
    const int64_t tok = a.tokens ? a.tokens[r] : -1;
    const bool bad = lse != lse;
    // log p + H = (z - Mx)/T - (log A - H), as on the CPU: z - Mx is exact (Mx the row's largest
    // logit) and the row constant c = log A - H is kept as two S values, so neither near-uniform
    // rows (log p ~ -H) nor peaked ones (H ~ 1e-11, where a constant rounded at the size of lse
    // was all of log p + H) lose it.
    const double cst = logA - H;
    const S cth = S(cst), ctl = S(cst - double(cth));
    const S Mxs = S(Mx);
    // The token's own entry (1 - p_t) g0 / T from -expm1(log p_t), log p_t = (z_t - Mx)/T -
    // log A (exact z_t - Mx): g0 - g0 p_t cancelled where p_t -> 1.
    double lpt = 0.0;
    if (tok >= 0 && tok < V && !bad) lpt = (double(Tl::one(z + tok * vs)) - Mx) * invT - logA;
    const S gtok = S(-(a.g0[r] * invT) * expm1(lpt));
    C c;
    c.set(lse * a.T, 0.0, 0.0, 0.0, 0.0, invT, 1.0);
    for (int j = 0; j < kBwdTiles; ++j) {
      const int64_t i0 = ch * kChunk + (int64_t(j) * kBwdThreads + threadIdx.x) * E;
      if (i0 >= V) break;
      S zv[E], res[E];
      Tl::unpack(vec && i0 + E <= V ? Tl::vec(z + i0) : Tl::gather(z + i0 * vs, vs, V - i0), zv);
#pragma unroll
      for (int k = 0; k < E; ++k) {
        S p, lp;  // lp: log p + H
        if constexpr (std::is_same<S, double>::value) {
          p = C::ex((zv[k] - lse * a.T) * invT);
        } else {
          p = c.pexp(zv[k]);
        }
        lp = ((zv[k] - Mxs) * S(invT) - cth) - ctl;
        const bool live = zv[k] > S(-INFINITY);
        S v;
        switch (a.op) {
          case SingleOp::lse: v = g0 * p; break;
          case SingleOp::entropy: {
            v = live ? -g0 * p * lp : S(0);
            break;
          }
          default: {
            S ent = live ? p * lp : S(0);
            v = i0 + k == tok ? gtok - g1 * ent : -g0 * p - g1 * ent;
            break;
          }
        }
        res[k] = bad ? S(NAN) : v;
      }
      store_tile<In, S, E>(out + i0, res, vec, V - i0);
    }
  }
}

// The dominant-token entries of KL's and JS's gradients, as on the CPU (kernels_bwd.cpp, DomPart):
// each gradient row sums to 0, and at a token holding more than half of p (or of q) the direct
// formula, e.g. p_j (eps_j - KL) / T, is a small difference of numbers of the size p_j (|eps_j| +
// KL), all rounding on a peaked row. Every warp of the backward sums its other entries and their
// magnitudes and notes such a token, in one record per (row, chunk, warp); pair_dom_fix_kernel
// merges a row's records in a fixed order and, where it is the more accurate, writes minus the sum
// of the others at the dominant token. Record: per side (0: dz, 1: dw) rest, size, probability (0:
// none), direct entry, index.
constexpr int kDomRec = 10;
constexpr int kBwdWarps = kBwdThreads / 32;

// The better of two candidates (larger probability, then smaller index; at < 0: none): a total
// order, so a butterfly leaves every lane with the same choice.
template <class S>
__device__ __forceinline__ void dom_pick(S& prob, S& direct, int64_t& at, S oprob, S odirect, int64_t oat) {
  if (oat >= 0 && (at < 0 || oprob > prob || (oprob == prob && oat < at))) {
    prob = oprob;
    direct = odirect;
    at = oat;
  }
}

template <class In, int OP>
__global__ void __launch_bounds__(kBwdThreads) pair_bwd_kernel(PairBwd a, double* dom, double* flags) {
  using Tl = Tile<In>;
  using S = typename Tl::S;
  using C = typename CentreOf<S>::type;
  constexpr int E = Tl::E;
  constexpr int64_t kChunk = int64_t(kBwdThreads) * kBwdTiles * E;
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1];
  const int64_t vsz = a.z.strides[a.z.ndim - 1], vsw = a.w.strides[a.w.ndim - 1];
  const int64_t nch = (V + kChunk - 1) / kChunk;
  const double invT = 1.0 / a.T, T = a.T;
  In* dz = static_cast<In*>(a.dz);
  In* dw = static_cast<In*>(a.dw);
  const S zero = 0, half = 0.5, one = 1, ninf = -INFINITY;
  for (int64_t u = blockIdx.x; u < N * nch; u += gridDim.x) {
    const int64_t r = u / nch, ch = u % nch;
    const In* z = reinterpret_cast<const In*>(a.z.data) + row_offset(a.z, r);
    const In* w = reinterpret_cast<const In*>(a.w.data) + row_offset(a.w, r);
    const bool vec = vsz == 1 && vsw == 1 && aligned16(z) && aligned16(w) &&
                     (!dz || aligned16(dz + r * V)) && (!dw || aligned16(dw + r * V));
    const double* t = a.stats + kPairStats * r;
    const double lse_p = t[0], lse_q = t[1];
    const S sa = S(t[2]), sb = S(t[3]);
    const S ca = S(kLn2d - t[2]), cb = S(kLn2d - t[3]);  // JS: log 2 - KL(p||m), log 2 - KL(q||m)
    const S g = S(a.g[r] * invT);
    const bool bad = lse_p != lse_p || lse_q != lse_q;
    // KL = +inf (some q_i = 0 < p_i): d/dz NaN wherever p_j > 0; a row whose upstream gradient
    // is 0 gets 0 (no 0 * NaN reaching the rows a loss keeps), as on the CPU.
    const bool kl_inf = OP == int(PairOp::kl) && isinf(t[2]);
    const bool zero_row = kl_inf && a.g[r] == 0.0;
    const bool masses = t[6] != 0.0 || t[7] != 0.0;
    const double dd_[6] = {masses ? t[6] : 1.0 - t[2], masses ? t[7] : -1.0 - t[2],
                           masses ? t[8] : -t[2], masses ? t[9] : 1.0 - t[3],
                           masses ? t[10] : -1.0 - t[3], masses ? t[11] : -t[3]};
    // p and q about their log-normalisers; eps about the stored centre (and eps - KL for KL).
    C cp, ck;
    cp.set(lse_p * T, lse_q * T, t[4], 0.0, t[5], invT, 1.0);
    ck.set(lse_p * T, lse_q * T, t[4], 0.0, t[5] + T * t[2], invT, 1.0);
    // Dominant-token sums of this thread (sides: dz, dw), in the lanes' precision over its few
    // elements, then across the warp.
    const bool dom_z = OP != int(PairOp::tv) && dom && dz, dom_w = OP != int(PairOp::tv) && dom && dw;
    S d_rest[2] = {zero, zero}, d_size[2] = {zero, zero}, d_prob[2] = {zero, zero}, d_dir[2] = {zero, zero};
    int64_t d_at[2] = {-1, -1};
    auto note = [&](int side, S gv, S pv, int64_t idx) {
      if (pv > half && pv > d_prob[side]) {
        // Rounding can put two tokens just above 1/2: the larger is the candidate, and one set
        // aside before goes back into the sum of the others.
        if (d_at[side] >= 0) {
          d_rest[side] += d_dir[side];
          d_size[side] += fabs(d_dir[side]);
        }
        d_prob[side] = pv;
        d_dir[side] = gv;
        d_at[side] = idx;
        return;
      }
      d_rest[side] += gv;
      d_size[side] += fabs(gv);
    };
    for (int j = 0; j < kBwdTiles; ++j) {
      const int64_t i0 = ch * kChunk + (int64_t(j) * kBwdThreads + threadIdx.x) * E;
      if (i0 >= V) break;
      S zv[E], wv[E], gzv[E], gwv[E];
      const bool full = vec && i0 + E <= V;
      Tl::unpack(full ? Tl::vec(z + i0) : Tl::gather(z + i0 * vsz, vsz, V - i0), zv);
      Tl::unpack(full ? Tl::vec(w + i0) : Tl::gather(w + i0 * vsw, vsw, V - i0), wv);
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const S p = cp.pexp(zv[k]), q = cp.qexp(wv[k]);
        const bool zl = zv[k] > ninf, wl = wv[k] > ninf;
        const S eps = cp.x(zv[k], wv[k]);
        S gz, gw;
        if (OP == int(PairOp::kl)) {
          const bool small = fabs(eps) < one;
          S em1 = small ? q * C::expm1s(eps) : p - q;
          S epsk = ck.x(zv[k], wv[k]);
          gz = zl ? g * p * epsk : zero;
          if (kl_inf) gz = p > zero ? S(NAN) : zero;
          gw = (zl || wl) ? -g * em1 : zero;
        } else if (OP == int(PairOp::tv)) {
          const bool pos = eps > zero, neg = eps < zero;
          S dp = S(pos ? dd_[0] : (neg ? dd_[1] : dd_[2]));
          S dq = S(pos ? dd_[3] : (neg ? dd_[4] : dd_[5]));
          gz = (zl || wl) ? g * half * p * dp : zero;
          gw = (zl || wl) ? -g * half * q * dq : zero;
        } else {
          // da = log(p/m) - KL(p||m), db = log(q/m) - KL(q||m), as the CPU kernels form them:
          // beyond the series, log 2 - KL in double (ca, cb) minus log1p(lo/hi), never the
          // difference of two float-rounded numbers near log 2 (one row a point mass away from
          // the other).
          const bool small = fabs(eps) < half;
          S hi = p > q ? p : q, lo = p > q ? q : p;
          S lr = C::log1p_ratio(lo, hi);
          S ec = eps > S(-200) ? eps : S(-200);
          ec = ec < S(200) ? ec : S(200);
          const bool ppos = p > q;
          S da = ppos ? ca - lr : (ca - lr) + ec;
          S db = ppos ? (cb - lr) - ec : cb - lr;
          S ds = C::jsd(eps);  // log(p/m) = log(2 / (1 + e^-eps)), series for |eps| < 1/2
          da = small ? ds - sa : da;
          db = small ? (ds - eps) - sb : db;
          gz = zl ? g * half * p * da : zero;
          gw = wl ? g * half * q * db : zero;
        }
        gzv[k] = bad ? S(NAN) : (zero_row ? zero : gz);
        gwv[k] = bad ? S(NAN) : (zero_row ? zero : gw);
        if (dom_z) note(0, gzv[k], p, i0 + k);
        if (dom_w) note(1, gwv[k], q, i0 + k);
      }
      if (dz) store_tile<In, S, E>(dz + r * V + i0, gzv, vec, V - i0);
      if (dw) store_tile<In, S, E>(dw + r * V + i0, gwv, vec, V - i0);
    }
    if (dom_z || dom_w) {  // uniform over the block
      const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
      double* o = dom + ((r * nch + ch) * kBwdWarps + warp) * kDomRec;
      for (int side = 0; side < 2; ++side) {
        if (!(side == 0 ? dom_z : dom_w)) continue;
        S bp = d_prob[side], bd = d_dir[side];
        int64_t ba = d_at[side];
        S rest = d_rest[side], size = d_size[side];
        if (__any_sync(0xffffffffu, ba >= 0)) {  // rare: the warp holds a candidate
          for (int m = 16; m > 0; m >>= 1) {
            const S op = __shfl_xor_sync(0xffffffffu, bp, m), od = __shfl_xor_sync(0xffffffffu, bd, m);
            const int64_t oa = __shfl_xor_sync(0xffffffffu, ba, m);
            dom_pick(bp, bd, ba, op, od, oa);
          }
          if (d_at[side] >= 0 && d_at[side] != ba) {  // a lane's candidate that is not the warp's
            rest += d_dir[side];
            size += fabs(d_dir[side]);
          }
          if (lane == 0) flags[r] = 1.0;  // the row has a candidate (every writer writes 1)
        }
        // The warp's sums in the lanes' precision (32 terms; the CPU also sums blocks of its
        // lanes in float before moving them to double).
        for (int m = 16; m > 0; m >>= 1) {
          rest += __shfl_down_sync(0xffffffffu, rest, m);
          size += __shfl_down_sync(0xffffffffu, size, m);
        }
        if (lane == 0) {
          double* os = o + 5 * side;
          os[0] = double(rest);
          os[1] = double(size);
          os[2] = ba >= 0 ? double(bp) : 0.0;
          os[3] = double(bd);
          os[4] = double(ba);
        }
      }
    }
  }
}

// One block per row with a candidate (flags): the row's dominant-token records (pair_bwd_kernel)
// merged in a fixed order -- thread t takes records t, t + kBwdThreads, ..., then fixed trees --
// so the result depends on V alone. The entry becomes minus the sum of the others where their
// rounding (a few ulps of their magnitudes' sum) is below the direct entry's (a few ulps of
// g p_j (|z_j - w_j| / T + |lse_p| + |lse_q| + |row scalar|)), the CPU's criterion.
template <class In, int OP>
__global__ void __launch_bounds__(kBwdThreads) pair_dom_fix_kernel(PairBwd a, const double* dom, int64_t nrec,
                                                                   const double* flags) {
  using Tl = Tile<In>;
  using S = typename Tl::S;
  __shared__ double pick_p[kBwdWarps], pick_d[kBwdWarps];
  __shared__ int64_t pick_a[kBwdWarps];
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1];
  const int64_t vsz = a.z.strides[a.z.ndim - 1], vsw = a.w.strides[a.w.ndim - 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    if (flags[r] == 0.0) continue;  // uniform over the block
    const double* t = a.stats + kPairStats * r;
    const double gT = fabs(a.g[r] / a.T) * (OP == int(PairOp::js) ? 0.5 : 1.0);
    for (int side = 0; side < 2; ++side) {
      if (side == 0 ? !a.dz : !a.dw) continue;
      const double* rec = dom + r * nrec * kDomRec + 5 * side;
      double bp = 0.0, bd = 0.0;
      int64_t ba = -1;
      for (int64_t k = threadIdx.x; k < nrec; k += kBwdThreads) {
        const double* o = rec + k * kDomRec;
        dom_pick(bp, bd, ba, o[2], o[3], o[2] > 0.0 ? int64_t(o[4]) : int64_t(-1));
      }
      for (int m = 16; m > 0; m >>= 1) {
        const double op = __shfl_xor_sync(0xffffffffu, bp, m), od = __shfl_xor_sync(0xffffffffu, bd, m);
        const int64_t oa = __shfl_xor_sync(0xffffffffu, ba, m);
        dom_pick(bp, bd, ba, op, od, oa);
      }
      if (lane == 0) {
        pick_p[warp] = bp;
        pick_d[warp] = bd;
        pick_a[warp] = ba;
      }
      __syncthreads();
      bp = pick_p[0];
      bd = pick_d[0];
      ba = pick_a[0];
      for (int k = 1; k < kBwdWarps; ++k) dom_pick(bp, bd, ba, pick_p[k], pick_d[k], pick_a[k]);
      __syncthreads();
      if (ba < 0) continue;  // uniform: every thread holds the same choice
      double v[2] = {0.0, 0.0};  // rest, size
      for (int64_t k = threadIdx.x; k < nrec; k += kBwdThreads) {
        const double* o = rec + k * kDomRec;
        v[0] += o[0];
        v[1] += o[1];
        if (o[2] > 0.0 && int64_t(o[4]) != ba) {  // a rounding-level second candidate
          v[0] += o[3];
          v[1] += fabs(o[3]);
        }
      }
      block_sum<2>(v);
      if (threadIdx.x == 0) {
        const In* z = reinterpret_cast<const In*>(a.z.data) + row_offset(a.z, r);
        const In* w = reinterpret_cast<const In*>(a.w.data) + row_offset(a.w, r);
        const double zj = double(Tl::one(z + ba * vsz)), wj = double(Tl::one(w + ba * vsw));
        const double scalar = side == 0 ? t[2] : t[3];
        const double direct_size = gT * bp * (fabs(zj - wj) / a.T + fabs(t[0]) + fabs(t[1]) + fabs(scalar));
        if (isfinite(v[0]) && isfinite(bd) && isfinite(direct_size) && v[1] < direct_size)
          store1(static_cast<In*>(side == 0 ? a.dz : a.dw) + r * V + ba, S(-v[0]));
      }
    }
  }
}

}  // namespace

// ---- launch helpers (Scratch: cuda_common.cuh) --------------------------------------------------
// One block per row; the grid is capped (rows beyond it are taken in a grid-stride loop), which
// changes nothing in a row's result.
void single_forward(const SingleFwd& a, uintptr_t stream) {
  const int64_t N = nrows(a.z);
  if (N == 0) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t ns = nspans(a.z.shape[a.z.ndim - 1]);
  Scratch rec(N * ns * kSingleRec, st);
  by_dtype(a.z.dtype, [&](auto tag) {
    using In = decltype(tag);
    const bool h = a.op == SingleOp::entropy || a.op == SingleOp::logprob_entropy;
    const int gs = grid_for(N * ns, 8), g = grid_for(N, 4);
    if (h) {
      single_span_kernel<In, true><<<gs, kThreads, 0, st>>>(a, rec.p);
      single_fwd_kernel<In, true><<<g, kThreads, 0, st>>>(a, rec.p);
    } else {
      single_span_kernel<In, false><<<gs, kThreads, 0, st>>>(a, rec.p);
      single_fwd_kernel<In, false><<<g, kThreads, 0, st>>>(a, rec.p);
    }
  });
  check(cudaGetLastError(), "single_forward launch");
}

void pair_forward(const PairFwd& a, uintptr_t stream) {
  const int64_t N = nrows(a.z);
  if (N == 0) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int64_t V = a.z.shape[a.z.ndim - 1], ns = nspans(V);
  // First-pass records, the row states, and the full pass's records.
  Scratch buf(N * ns * kPairRec + N * kStateLen + N * ns * kFullRec, st);
  double* rec = buf.p;
  double* state = rec + N * ns * kPairRec;
  double* frec = state + N * kStateLen;
  by_dtype(a.z.dtype, [&](auto tag) {
    using In = decltype(tag);
    const int gs = grid_for(N * ns, 8), g = grid_for(N, 4);
    if (a.op == PairOp::kl) {
      pair_span_kernel<In, kKL><<<gs, kThreads, 0, st>>>(a, rec);
      pair_fwd_kernel<In, 0, 0><<<g, kThreads, 0, st>>>(a, rec, state, frec);
      pair_full_span_kernel<In, kKL><<<gs, kThreads, 0, st>>>(a, state, frec);
      pair_fwd_kernel<In, 0, 1><<<g, kThreads, 0, st>>>(a, rec, state, frec);
      return;
    }
    pair_span_kernel<In, kCentre><<<gs, kThreads, 0, st>>>(a, rec);
    if (a.op == PairOp::tv) {
      pair_fwd_kernel<In, 1, 0><<<g, kThreads, 0, st>>>(a, rec, state, frec);
      // Without statistics to keep (a forward no backward will follow) the pass sums TV's
      // value alone; a row that needs more passes takes them with all ten sums, as before.
      if (a.stats) pair_full_span_kernel<In, kTV><<<gs, kThreads, 0, st>>>(a, state, frec);
      else pair_full_span_kernel<In, kTVv><<<gs, kThreads, 0, st>>>(a, state, frec);
      pair_fwd_kernel<In, 1, 1><<<g, kThreads, 0, st>>>(a, rec, state, frec);
    } else {
      pair_fwd_kernel<In, 2, 0><<<g, kThreads, 0, st>>>(a, rec, state, frec);
      pair_full_span_kernel<In, kJS><<<gs, kThreads, 0, st>>>(a, state, frec);
      pair_fwd_kernel<In, 2, 1><<<g, kThreads, 0, st>>>(a, rec, state, frec);
    }
  });
  check(cudaGetLastError(), "pair_forward launch");
}

void single_backward(const SingleBwd& a, uintptr_t stream) {
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1];
  if (N == 0) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  by_dtype(a.z.dtype, [&](auto tag) {
    using In = decltype(tag);
    const int64_t chunk = int64_t(kBwdThreads) * kBwdTiles * Tile<In>::E;
    single_bwd_kernel<In><<<grid_for(N * ((V + chunk - 1) / chunk), 16), kBwdThreads, 0, st>>>(a);
  });
  check(cudaGetLastError(), "single_backward launch");
}

void pair_backward(const PairBwd& a, uintptr_t stream) {
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1];
  if (N == 0 || (!a.dz && !a.dw)) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  by_dtype(a.z.dtype, [&](auto tag) {
    using In = decltype(tag);
    const int64_t chunk = int64_t(kBwdThreads) * kBwdTiles * Tile<In>::E;
    const int64_t nch = (V + chunk - 1) / chunk;
    const int g = grid_for(N * nch, 16);
    // KL's and JS's gradients fix their dominant-token entries (records: N x nch x warps, then a
    // flag per row).
    const bool dom = a.op != PairOp::tv;
    const int64_t nrec = nch * kBwdWarps;
    Scratch rec(dom ? N * nrec * kDomRec + N : 1, st);
    double* d = dom ? rec.p : nullptr;
    double* fl = dom ? rec.p + N * nrec * kDomRec : nullptr;
    if (dom) check(cudaMemsetAsync(fl, 0, size_t(N) * sizeof(double), st), "pair_backward flags");
    const int gf = grid_for(N, 8);
    switch (a.op) {
      case PairOp::kl:
        pair_bwd_kernel<In, 0><<<g, kBwdThreads, 0, st>>>(a, d, fl);
        if (dom) pair_dom_fix_kernel<In, 0><<<gf, kBwdThreads, 0, st>>>(a, d, nrec, fl);
        break;
      case PairOp::tv: pair_bwd_kernel<In, 1><<<g, kBwdThreads, 0, st>>>(a, d, fl); break;
      case PairOp::js:
        pair_bwd_kernel<In, 2><<<g, kBwdThreads, 0, st>>>(a, d, fl);
        if (dom) pair_dom_fix_kernel<In, 2><<<gf, kBwdThreads, 0, st>>>(a, d, nrec, fl);
        break;
    }
  });
  check(cudaGetLastError(), "pair_backward launch");
}

std::string device_name() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return "";
  cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, dev) != cudaSuccess) return "";
  return std::string(p.name) + " (sm_" + std::to_string(p.major) + std::to_string(p.minor) + ")";
}

}  // namespace cuda
}  // namespace trmath
