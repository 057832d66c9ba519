// trmath: CUDA kernel of the Top-K search (topk_rows), the device twin of the CPU kernel in
// cpp/src/bind_coarse.cpp. Per row, the ids of the k largest logits, sorted by value (descending)
// then by index (ascending): ties go to the lower index, so the ids are a deterministic function
// of the row and equal, bit for bit, to the CPU kernel's.
//
// One thread block owns one row (rows beyond the grid are taken in a grid-stride loop); the row
// is read in place (any dtype, any strides) and nothing of size [N, V] is written.
//
//  1. Keys. Each logit maps to an unsigned integer whose order is the logits' order, with the
//     CPU kernel's equality -0 == +0 (both take the key of +0), and -inf is the smallest
//     ordinary key (masked logits are ordered like any other value, ties to the lower index).
//     NaN takes the key of -inf, as in the CPU kernel (rows holding NaN are invalid input:
//     validation rejects them, or they give NaN log-probabilities). 16-bit formats use their
//     own 16 bits (two passes below), float32 its 32, float64 its 64.
//  2. Radix select, 8 bits at a time from the top: one read of the row per digit builds a
//     256-bin histogram (shared memory) of the digit over the elements whose higher digits
//     equal the prefix chosen so far; the bin holding the k-th largest key extends the prefix,
//     and the elements in higher bins are counted as strictly larger (G in total). It stops
//     when every key is resolved, or earlier when the chosen bin must be taken whole (then the
//     remaining digits cannot matter). At the end the kept set is: every element whose key,
//     cut to the resolved digits, is above the prefix (exactly G of them), plus the first
//     need = k - G elements *in index order* among those equal to the prefix (when the loop
//     stopped early, that is all of them).
//  3. Collection: one more read of the row, in index order: each tile of the row is split into
//     consecutive per-thread runs, and a block-wide exclusive scan of the per-thread counts
//     gives every kept element a slot that depends only on its index -- the larger ones fill
//     slots [0, G) in index order, the ties slots [G, k) in index order, and a tie past the
//     first `need` gets none. No atomics decide any slot, so which ties are kept is fixed.
//  4. The k (key, index) pairs are sorted in shared memory by a bitonic sort on the total order
//     (key descending, index ascending), padded to a power of two with entries that sort last,
//     and the first k indices are written out. The order being total (indices are distinct),
//     the result does not depend on the order in which the pairs were collected.
//
// k is at most kTopkMaxK (cuda_api.hpp), the size of the sort buffer; trmath/_backend.py takes
// larger k through a deterministic torch path with the same order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda_api.hpp"
#include "cuda_common.cuh"

namespace trmath {
namespace cuda {
namespace {

using namespace common;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
static_assert(kBins == 32 * 8, "the digit search gives each lane of one warp 8 bins");
static_assert(kThreads % 32 == 0 && kWarps <= 32, "block scan: at most 32 warps");
static_assert((kTopkMaxK & (kTopkMaxK - 1)) == 0, "the bitonic sort needs a power of two");

// ---- element storage and keys -------------------------------------------------------------------

// Order-preserving keys of IEEE bit patterns, NaN -> -inf, -0 -> +0.
__device__ __forceinline__ uint32_t key32(uint32_t u) {
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0xff800000u;
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ uint64_t key64(uint64_t u) {
  if ((u & 0x7fffffffffffffffull) > 0x7ff0000000000000ull) u = 0xfff0000000000000ull;
  if (u == 0x8000000000000000ull) u = 0ull;
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
// 16-bit formats: kInf is the bit pattern of +inf (0x7c00 for float16, 0x7f80 for bfloat16).
template <uint32_t kInf>
__device__ __forceinline__ uint32_t key16(uint32_t h) {
  h &= 0xffffu;
  if ((h & 0x7fffu) > kInf) h = kInf | 0x8000u;
  if (h == 0x8000u) h = 0u;
  return (h & 0x8000u) ? (~h & 0xffffu) : (h | 0x8000u);
}

// Keys<In>: E consecutive elements (16 bytes) per load, kept raw until converted to keys.
template <class In> struct Keys;
template <> struct Keys<float> {
  using K = uint32_t;
  using Raw = uint4;
  static constexpr int kBits = 32;
  static constexpr int E = 4;
  __device__ static Raw vec(const float* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  // Elements 0..n-1 at stride vs (n <= E); the rest are never looked at.
  __device__ static Raw gather(const float* p, int64_t vs, int n) {
    uint32_t o[E];
#pragma unroll
    for (int j = 0; j < E; ++j) o[j] = j < n ? __float_as_uint(__ldg(p + j * vs)) : 0u;
    return make_uint4(o[0], o[1], o[2], o[3]);
  }
  __device__ static void unpack(const Raw& v, K (&o)[E]) {
    o[0] = key32(v.x); o[1] = key32(v.y); o[2] = key32(v.z); o[3] = key32(v.w);
  }
};
template <> struct Keys<double> {
  using K = uint64_t;
  using Raw = double2;
  static constexpr int kBits = 64;
  static constexpr int E = 2;
  __device__ static Raw vec(const double* p) { return __ldg(reinterpret_cast<const double2*>(p)); }
  __device__ static Raw gather(const double* p, int64_t vs, int n) {
    return make_double2(n > 0 ? __ldg(p) : 0.0, n > 1 ? __ldg(p + vs) : 0.0);
  }
  __device__ static void unpack(const Raw& v, K (&o)[E]) {
    o[0] = key64(uint64_t(__double_as_longlong(v.x)));
    o[1] = key64(uint64_t(__double_as_longlong(v.y)));
  }
};
template <class In, uint32_t kInf>
struct Keys16 {
  using K = uint32_t;
  using Raw = uint4;
  static constexpr int kBits = 16;
  static constexpr int E = 8;
  __device__ static uint32_t bits(const In* p) { return __ldg(reinterpret_cast<const unsigned short*>(p)); }
  __device__ static Raw vec(const In* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ static Raw gather(const In* p, int64_t vs, int n) {
    uint32_t u[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lo = 2 * j < n ? bits(p + 2 * j * vs) : 0u;
      const uint32_t hi = 2 * j + 1 < n ? bits(p + (2 * j + 1) * vs) : 0u;
      u[j] = lo | (hi << 16);
    }
    return make_uint4(u[0], u[1], u[2], u[3]);
  }
  __device__ static void unpack(const Raw& v, K (&o)[E]) {
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      o[2 * j] = key16<kInf>(u[j]);
      o[2 * j + 1] = key16<kInf>(u[j] >> 16);
    }
  }
};
template <> struct Keys<f16s> : Keys16<f16s, 0x7c00u> {};
template <> struct Keys<bf16s> : Keys16<bf16s, 0x7f80u> {};

// Calls f(i0, keys, n) for tiles t = 0, 1, ... of kThreads * E elements: this thread's run is
// elements i0 = t * kThreads * E + threadIdx.x * E, ..., i0 + n - 1 (n in [0, E]; 0 past the end).
// Every thread makes the same calls, so f may synchronise the block; f returns true (the same
// value in every thread) to stop. The next tile is requested before f runs on the current one.
template <class In, class F>
__device__ __forceinline__ void for_tiles(const In* x, int64_t V, int64_t vs, bool vec, F&& f) {
  using KT = Keys<In>;
  using Raw = typename KT::Raw;
  constexpr int E = KT::E;
  constexpr int64_t kTile = int64_t(kThreads) * E;
  const int64_t ntiles = (V + kTile - 1) / kTile;
  auto load = [&](int64_t t, Raw& raw) -> int {
    const int64_t i0 = t * kTile + int64_t(threadIdx.x) * E;
    const int n = int(std::min<int64_t>(std::max<int64_t>(V - i0, 0), E));
    if (vec && n == E) {
      raw = KT::vec(x + i0);
    } else if (n > 0) {
      raw = KT::gather(x + i0 * vs, vs, n);
    }
    return n;
  };
  Raw cur{}, nxt{};
  int ncur = load(0, cur);
  for (int64_t t = 0; t < ntiles; ++t) {
    int nnext = 0;
    if (t + 1 < ntiles) nnext = load(t + 1, nxt);
    typename KT::K keys[E];
    KT::unpack(cur, keys);
    if (f(t * kTile + int64_t(threadIdx.x) * E, keys, ncur)) break;
    cur = nxt;
    ncur = nnext;
  }
}

// Exclusive prefix sum of v over the block (thread order), and the block's total. Called by
// every thread; `scratch` holds kWarps + 1 ints. Synchronises the block.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int w = lane < kWarps ? scratch[lane] : 0;
    int wincl = w;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, wincl, o);
      if (lane >= o) wincl += y;
    }
    if (lane < kWarps) scratch[lane] = wincl - w;
    if (lane == 31) scratch[kWarps] = wincl;
  }
  __syncthreads();
  const int excl = scratch[warp] + incl - v;
  total = scratch[kWarps];
  __syncthreads();  // scratch is reused by the next call
  return excl;
}

// One warp: the bin d of the histogram (bins taken from the top) where the running count of
// elements reaches `need`; sel = {d, elements in bins above d, elements in bin d}.
__device__ __forceinline__ void select_digit(const unsigned* hist, unsigned need, unsigned* sel) {
  const int lane = threadIdx.x & 31;
  unsigned c[8];
  unsigned sum = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = hist[kBins - 1 - 8 * lane - j];
    sum += c[j];
  }
  unsigned incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  unsigned run = incl - sum;  // elements in the bins above this lane's
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (run < need && run + c[j] >= need) {  // exactly one bin of the whole warp
      sel[0] = unsigned(kBins - 1 - 8 * lane - j);
      sel[1] = run;
      sel[2] = c[j];
    }
    run += c[j];
  }
}

// "a comes before b": larger key, or the same key at a lower index.
__device__ __forceinline__ bool before(uint64_t ka, uint32_t ia, uint64_t kb, uint32_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

template <class In>
__global__ void __launch_bounds__(kThreads, 2) topk_kernel(View z, int k, int64_t* ids) {
  using KT = Keys<In>;
  using K = typename KT::K;
  constexpr int E = KT::E;
  __shared__ unsigned s_hist[kBins];
  __shared__ unsigned s_sel[3];
  __shared__ int s_scan[kWarps + 1];
  __shared__ unsigned long long s_key[kTopkMaxK];
  __shared__ uint32_t s_idx[kTopkMaxK];

  const int64_t N = nrows(z), V = z.shape[z.ndim - 1], vs = z.strides[z.ndim - 1];
  const int tid = threadIdx.x;
  int n2 = 1;
  while (n2 < k) n2 <<= 1;

  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const In* x = reinterpret_cast<const In*>(z.data) + row_offset(z, r);
    const bool vec = vs == 1 && aligned16(x);

    // ---- radix select: the bucket (prefix, mask) of the k-th largest key -----------------------
    K prefix = 0, mask = 0;
    int need = k;  // elements still to take from the bucket
    for (int shift = KT::kBits - kDigitBits; shift >= 0; shift -= kDigitBits) {
      for (int b = tid; b < kBins; b += kThreads) s_hist[b] = 0u;
      __syncthreads();
      // (Plain shared-memory atomics: on an H200 they beat warp-aggregated ones (match.any),
      // even in the first pass, where most keys of a row share a few bins.)
      for_tiles<In>(x, V, vs, vec, [&](int64_t, const K (&key)[E], int n) {
#pragma unroll
        for (int j = 0; j < E; ++j)
          if (j < n && (key[j] & mask) == prefix) atomicAdd(&s_hist[(key[j] >> shift) & (kBins - 1)], 1u);
        return false;
      });
      __syncthreads();
      if (tid < 32) select_digit(s_hist, unsigned(need), s_sel);
      __syncthreads();
      const unsigned d = s_sel[0], above = s_sel[1], cnt = s_sel[2];
      need -= int(above);  // 1 <= need <= cnt
      prefix |= K(d) << shift;
      mask |= K(kBins - 1) << shift;
      if (unsigned(need) == cnt) break;  // the bucket is taken whole: lower digits cannot matter
      // (s_sel and s_hist are next written after the barrier that follows the zeroing, which
      // every thread reaches only after reading them here)
    }
    const int G = k - need;  // elements above the bucket

    // ---- collection in index order -------------------------------------------------------------
    int run_gt = 0, run_eq = 0;  // the same in every thread
    for_tiles<In>(x, V, vs, vec, [&](int64_t i0, const K (&key)[E], int n) {
      int cg = 0, ce = 0;
#pragma unroll
      for (int j = 0; j < E; ++j) {
        if (j < n) {
          const K m = key[j] & mask;
          cg += m > prefix;
          ce += m == prefix;
        }
      }
      // Both counts in one scan: each is at most kThreads * E = 4096 per tile.
      int total;
      const int ex = block_exclusive_scan((cg << 16) | ce, s_scan, total);
      int pg = run_gt + (ex >> 16), pe = run_eq + (ex & 0xffff);
#pragma unroll
      for (int j = 0; j < E; ++j) {
        if (j < n) {
          const K m = key[j] & mask;
          if (m > prefix) {
            if (pg < G) {  // always (exactly G elements lie above the bucket)
              s_key[pg] = key[j];
              s_idx[pg] = uint32_t(i0 + j);
            }
            ++pg;
          } else if (m == prefix) {
            if (pe < need) {
              s_key[G + pe] = key[j];
              s_idx[G + pe] = uint32_t(i0 + j);
            }
            ++pe;
          }
        }
      }
      run_gt += total >> 16;
      run_eq += total & 0xffff;
      return run_gt == G && run_eq >= need;  // all k found
    });
    for (int i = k + tid; i < n2; i += kThreads) {  // padding, sorted last
      s_key[i] = 0ull;
      s_idx[i] = 0xffffffffu;
    }
    __syncthreads();

    // ---- bitonic sort of s_key/s_idx[0, n2) by (key descending, index ascending) -------------
    for (int size = 2; size <= n2; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int i = tid; i < n2; i += kThreads) {
          const int j = i ^ stride;
          if (j > i) {
            const unsigned long long ka = s_key[i], kb = s_key[j];
            const uint32_t ia = s_idx[i], ib = s_idx[j];
            const bool fwd = (i & size) == 0;
            if (fwd ? before(kb, ib, ka, ia) : before(ka, ia, kb, ib)) {
              s_key[i] = kb;
              s_key[j] = ka;
              s_idx[i] = ib;
              s_idx[j] = ia;
            }
          }
        }
        __syncthreads();
      }
    }
    int64_t* out = ids + r * int64_t(k);
    for (int i = tid; i < k; i += kThreads) out[i] = int64_t(s_idx[i]);
    __syncthreads();  // shared memory is reused by the next row
  }
}

}  // namespace

void topk_rows(const View& z, int64_t k, int64_t* ids, uintptr_t stream) {
  const int64_t V = z.shape[z.ndim - 1];
  if (k < 1 || k > V) throw std::invalid_argument("k: must be in [1, V]");
  if (k > kTopkMaxK) throw std::invalid_argument("k: the CUDA top-k search takes k <= " + std::to_string(kTopkMaxK));
  if (V > int64_t(INT32_MAX)) throw std::invalid_argument("p_logits: the CUDA top-k search takes V < 2^31");
  const int64_t N = nrows(z);
  if (N == 0) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  by_dtype(z.dtype, [&](auto tag) {
    using In = decltype(tag);
    topk_kernel<In><<<grid_for(N, 4), kThreads, 0, st>>>(z, int(k), ids);
  });
  check(cudaGetLastError(), "topk_rows launch");
}

}  // namespace cuda
}  // namespace trmath
