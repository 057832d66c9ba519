// trmath: helpers shared by the CUDA translation units (cuda_exact.cu, cuda_topk.cu,
// cuda_project.cu): storage types of the 16-bit formats, row addressing of the typed views,
// series coefficients in constant memory, deterministic block reductions, launch helpers.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "view.hpp"

namespace trmath {
namespace cuda {
namespace common {

// 16-bit storage (the bits of a bfloat16 / float16 value).
struct bf16s { uint16_t bits; };
struct f16s { uint16_t bits; };

// Rows of a view: every index but the last.
__host__ __device__ __forceinline__ int64_t nrows(const View& v) {
  int64_t n = 1;
  for (int d = 0; d + 1 < v.ndim; ++d) n *= v.shape[d];
  return n;
}

// Element offset of row r (row-major over the leading dimensions, any strides).
__device__ __forceinline__ int64_t row_offset(const View& v, int64_t r) {
  int64_t off = 0;
  for (int d = v.ndim - 2; d >= 0; --d) {
    const int64_t i = r % v.shape[d];
    r /= v.shape[d];
    off += i * v.strides[d];
  }
  return off;
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 16-bit float bits to float.
__device__ __forceinline__ float h2f(unsigned short u) {
  float f;
  asm("{ .reg .f16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(u));
  return f;
}

// One stored element as double (exact: every format converts exactly).
__device__ __forceinline__ double load_d(const float* p) { return double(__ldg(p)); }
__device__ __forceinline__ double load_d(const double* p) { return __ldg(p); }
__device__ __forceinline__ double load_d(const bf16s* p) {
  return double(__uint_as_float(uint32_t(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16));
}
__device__ __forceinline__ double load_d(const f16s* p) {
  return double(h2f(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// Stores of one value in each storage format (round to nearest even; NaN stays NaN).
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(double* p, double v) { *p = v; }
__device__ __forceinline__ uint16_t to_bf16(float v) {
  uint32_t u = __float_as_uint(v);
  return (v != v) ? uint16_t(0x7fc0u) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ uint16_t to_f16(float v) {
  unsigned short h;
  asm("{ .reg .f16 t; cvt.rn.f16.f32 t, %1; mov.b16 %0, t; }" : "=h"(h) : "f"(v));
  return h;
}
__device__ __forceinline__ void store1(bf16s* p, float v) { *reinterpret_cast<unsigned short*>(p) = to_bf16(v); }
__device__ __forceinline__ void store1(f16s* p, float v) { *reinterpret_cast<unsigned short*>(p) = to_f16(v); }

// ---- series coefficients in constant memory (from the generated host tables) ------------------
template <class S, int N>
struct Poly {
  S c[N];
};
template <class S, int N>
constexpr Poly<S, N> mk(const double (&a)[N]) {
  Poly<S, N> p{};
  for (int i = 0; i < N; ++i) p.c[i] = S(a[i]);
  return p;
}
template <class S, int N>
__device__ __forceinline__ S horner(S x, const Poly<S, N>& p) {
  S r = p.c[N - 1];
#pragma unroll
  for (int k = N - 2; k >= 0; --k) r = r * x + p.c[k];
  return r;
}

// The same with the coefficients as instruction immediates (float: FFMA takes a 32-bit
// immediate), for the element loops: a constant-memory coefficient the compiler does not fold
// into the FFMA costs a load (LDC) and a register pair per use. A is a generated table
// (coefficients.hpp); float(A[k]) rounds each coefficient as mk<float> does, and the evaluation
// order is horner()'s, so the two give the same bits.
template <const auto& A, int K>
__device__ __forceinline__ float horner_imm_from(float x, float r) {
  if constexpr (K < 0) {
    return r;
  } else {
    constexpr float c = float(A[K]);
    return horner_imm_from<A, K - 1>(x, r * x + c);
  }
}
template <const auto& A>
__device__ __forceinline__ float horner_imm(float x) {
  constexpr int N = int(sizeof(A) / sizeof(A[0]));
  constexpr float top = float(A[N - 1]);
  return horner_imm_from<A, N - 2>(x, top);
}

// ---- block reductions (fixed tree: deterministic) -------------------------------------------------
// Every thread gets the block's sums (maxima); the tree depends on blockDim.x alone.
template <int K>
__device__ void block_sum(double (&v)[K]) {
  __shared__ double red[K][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double t = v[k];
    for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
    if (lane == 0) red[k][warp] = t;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double t = lane < nw ? red[k][lane] : 0.0;
      for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
      if (lane == 0) red[k][0] = t;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = red[k][0];
  __syncthreads();
}

template <int K>
__device__ void block_max(double (&v)[K], int& flags) {
  __shared__ double red[K][32];
  __shared__ int fl[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  int f = flags;
  for (int o = 16; o > 0; o >>= 1) f |= __shfl_down_sync(0xffffffffu, f, o);
  if (lane == 0) fl[warp] = f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double t = v[k];
    for (int o = 16; o > 0; o >>= 1) t = fmax(t, __shfl_down_sync(0xffffffffu, t, o));
    if (lane == 0) red[k][warp] = t;
  }
  __syncthreads();
  if (warp == 0) {
    int g = lane < nw ? fl[lane] : 0;
    for (int o = 16; o > 0; o >>= 1) g |= __shfl_down_sync(0xffffffffu, g, o);
    if (lane == 0) fl[0] = g;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double t = lane < nw ? red[k][lane] : -INFINITY;
      for (int o = 16; o > 0; o >>= 1) t = fmax(t, __shfl_down_sync(0xffffffffu, t, o));
      if (lane == 0) red[k][0] = t;
    }
  }
  __syncthreads();
  flags = fl[0];
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = red[k][0];
  __syncthreads();
}

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("trmath CUDA: ") + what + ": " + cudaGetErrorString(e));
}

// Stream-ordered scratch of n doubles, freed in stream order after the kernels that use it.
struct Scratch {
  double* p = nullptr;
  cudaStream_t st;
  Scratch(int64_t n, cudaStream_t s) : st(s) {
    // Keep freed blocks in the device's pool: without a release threshold the pool returns them
    // at every synchronisation and the next call maps them again.
    static uint64_t tuned = 0;  // bit per device
    int dev = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && dev < 64 && !(tuned & (uint64_t(1) << dev))) {
      cudaMemPool_t pool;
      if (cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess) {
        uint64_t keep = UINT64_MAX;
        cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
      }
      tuned |= uint64_t(1) << dev;
    }
    check(cudaMallocAsync(reinterpret_cast<void**>(&p), size_t(std::max<int64_t>(n, 1)) * sizeof(double), st),
          "scratch allocation");
  }
  ~Scratch() { cudaFreeAsync(p, st); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Blocks for `work` items: at most per_sm per multiprocessor (grid-stride loops take the rest,
// which changes nothing in a row's result).
inline int grid_for(int64_t work, int64_t per_sm) {
  int dev = 0, sms = 132;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  int64_t g = std::max<int64_t>(1, std::min<int64_t>(work, int64_t(sms) * per_sm));
  return int(std::min<int64_t>(g, 1 << 30));
}

// f(tag) with a value of the storage type of dt.
template <class F>
void by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::f32: f(float{}); break;
    case DType::f64: f(double{}); break;
    case DType::bf16: f(bf16s{}); break;
    case DType::f16: f(f16s{}); break;
  }
}

}  // namespace common
}  // namespace cuda
}  // namespace trmath
