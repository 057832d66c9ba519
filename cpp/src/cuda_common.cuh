// trmath: helpers shared by the CUDA translation units (cuda_exact.cu, cuda_topk.cu): storage
// types of the 16-bit formats, row addressing of the typed views, launch helpers.
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

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("trmath CUDA: ") + what + ": " + cudaGetErrorString(e));
}

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
