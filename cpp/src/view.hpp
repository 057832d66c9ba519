// trmath: typed strided views over caller memory (torch tensors, numpy arrays).
#pragma once

#include <cstdint>
#include <functional>

#include "trmath/config.hpp"

namespace trmath {

constexpr int kMaxDim = 8;

struct View {
  const char* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t shape[kMaxDim] = {};
  int64_t strides[kMaxDim] = {};  // in elements

  int64_t V() const { return shape[ndim - 1]; }
  int64_t vstride() const { return strides[ndim - 1]; }
  int64_t rows() const {
    int64_t n = 1;
    for (int d = 0; d + 1 < ndim; ++d) n *= shape[d];
    return n;
  }
  // Element offset of row r (leading axes unravelled in C order).
  int64_t row_offset(int64_t r) const {
    int64_t off = 0;
    for (int d = ndim - 2; d >= 0; --d) {
      int64_t i = r % shape[d];
      r /= shape[d];
      off += i * strides[d];
    }
    return off;
  }
};

inline int64_t dtype_size(DType t) {
  return t == DType::f64 ? 8 : t == DType::f32 ? 4 : 2;
}

// Arguments of the forward and backward entry points (one struct per family).
// Per-row statistics saved for the backward: [lse, H, M, log A] for single-row reductions (M
// the row's largest logit, log A = log sum exp((z - M)/T): log p = (z - M)/T - log A keeps its
// relative accuracy where p -> 1, which z/T - lse, rounded at the size of lse, does not);
// [lse_p, lse_q, a, b, m, m_lo, (TV only) 2P- + P0, -(2P+ + P0), P- - P+, the same for q]
// for pairs (a, b per divergence; m + m_lo the log-ratio centre).
constexpr int kSingleStats = 4;
constexpr int kPairStats = 12;

enum class SingleOp : int { lse = 0, entropy = 1, logprob = 2, logprob_entropy = 3 };
enum class PairOp : int { kl = 0, tv = 1, js = 2 };

struct SingleFwd {
  View z;
  const int64_t* tokens = nullptr;  // [rows], for logprob ops
  double T = 1.0;
  SingleOp op = SingleOp::lse;
  void* out0 = nullptr;  // float (or double for f64 inputs) [rows]
  void* out1 = nullptr;  // entropy for logprob_entropy
  double* stats = nullptr;  // [rows, kSingleStats]
  int* status = nullptr;    // [rows]
};

struct SingleBwd {
  View z;
  const int64_t* tokens = nullptr;
  double T = 1.0;
  SingleOp op = SingleOp::lse;
  const double* stats = nullptr;
  const double* g0 = nullptr;  // [rows]
  const double* g1 = nullptr;  // [rows] or null
  void* dz = nullptr;          // contiguous [rows, V] in z's dtype
};

struct PairFwd {
  View z, w;
  double T = 1.0;
  PairOp op = PairOp::kl;
  void* out = nullptr;
  double* stats = nullptr;  // [rows, kPairStats]
  int* status = nullptr;
};

struct PairBwd {
  View z, w;
  double T = 1.0;
  PairOp op = PairOp::kl;
  const double* stats = nullptr;
  const double* g = nullptr;
  void* dz = nullptr;  // may be null
  void* dw = nullptr;  // may be null
};

struct KernelTable {
  const char* isa;
  void (*single_fwd)(const SingleFwd&);
  void (*single_bwd)(const SingleBwd&);
  void (*pair_fwd)(const PairFwd&);
  void (*pair_bwd)(const PairBwd&);
};

// Thread pool (threadpool.cpp).
int num_threads();
void set_num_threads(int n);
// Calls f(i) for i in [0, n) on the pool; the caller participates. Safe to call from
// several threads at once (a caller that finds the pool busy runs its loop itself).
void parallel_for(int64_t n, const std::function<void(int64_t)>& f);

}  // namespace trmath
