// trmath: CUDA kernels of the KL-ball projection (TROLL), forward and backward.
//
// The same algorithm as the CPU kernels (cpp/src/project_kernels.cpp): the exact-KL kernels give
// KL(pi_new || pi_old) and the normalisers of every row, then one block per row runs the shared
// solver of trmath/project_solve.hpp. Each of the solver's passes is a block-wide loop over the
// row (thread j takes elements j, j + blockDim.x, ...) with float64 sums, reduced over the block
// by a fixed tree (common::block_sum): every thread holds the same sums, so every thread takes
// the same branches of the solver, and a row's result never depends on the batch or its
// position. The per-element formulas are project.hpp's, in float64 (the device's exp is within
// 1 ulp, the CPU's 4-lane exp within 2 ulp: results agree with the CPU kernels to rounding, not
// bit for bit). Backward (implicit gradient): two passes per row, the same formulas as the CPU's.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda_api.hpp"
#include "cuda_common.cuh"
#include "project_args.hpp"
#include "trmath/coefficients.hpp"
#include "trmath/project_solve.hpp"

namespace trmath {
namespace cuda {
namespace {

using namespace common;
namespace ps = projsolve;

constexpr int kProjThreads = 256;
__constant__ Poly<double, coef::em2_d_n> c_em2 = mk<double>(coef::em2_d);

template <class In>
__device__ __forceinline__ const In* row_ptr(const View& v, int64_t r) {
  return reinterpret_cast<const In*>(v.data) + row_offset(v, r);
}

// One row's passes for the shared solver; every member function is called by all threads of the
// block (each pass ends in a block reduction) and returns the same value in every thread.
template <class In, class Out>
struct GpuRow {
  const In *z, *w;
  int64_t sz, sw, V;
  double invT;
  Out* out;
  double* S;
  int* status;

  // Calls f(i, z_i, w_i) for the thread's elements.
  template <class F>
  __device__ void each(F&& f) const {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) f(i, load_d(z + i * sz), load_d(w + i * sw));
  }

  // Not swapped, also the sums of e d and e d^2 over the common support (d = (z - w)/T - cd).
  __device__ ps::Norm norm(bool swapped, double c, double cd) const {
    double v[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    each([&](int64_t, double zi, double wi) {
      const double a = swapped ? wi : zi, b = swapped ? zi : wi;  // sums of e^{b/T - c}
      if (b > -INFINITY) {
        const double e = exp(b * invT - c);
        v[0] += e;
        if (a > -INFINITY) {
          v[1] += e;
          const double d = (zi - wi) * invT - cd, ed = e * d;
          v[3] += ed;
          v[4] += ed * d;
        } else {
          v[2] += e;
        }
      }
    });
    block_sum<5>(v);
    if (swapped) return {v[0], v[1], v[2]};
    return {v[0], v[1], v[2], v[3], v[4]};
  }

  __device__ ps::Moments interp(double lse_q, double cd, double t, double c, double d0) const {
    double v[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    each([&](int64_t, double zi, double wi) {
      if (!(zi > -INFINITY && wi > -INFINITY)) return;
      const double d = (zi - wi) * invT - cd, b = wi * invT - lse_q;
      const double u = t * d - c, e = exp(b + u), dc = d - d0, edc = e * dc, edc2 = edc * dc;
      v[0] += e;
      v[1] += e * u;
      v[2] += edc;
      v[3] += edc2;
      v[4] += edc2 * dc;
    });
    block_sum<5>(v);
    return {v[0], v[1], v[2], v[3], v[4]};
  }

  // With moments, also sum p_i (d_i - d0)^k, k = 1..5, p_i = q_i + (p_i - q_i).
  __device__ ps::Phi phi(double lse_q, double cd, double t, double lam_r, bool moments, double d0) const {
    double v[7] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    each([&](int64_t, double zi, double wi) {
      if (!(zi > -INFINITY && wi > -INFINITY)) return;
      const double d = (zi - wi) * invT - cd, b = wi * invT - lse_q, r = t * d - lam_r;
      const double qt = exp(b);
      double ph, sg;
      if (fabs(r) < 1.0) {
        const double e2 = r * r * horner(r, c_em2), em1 = r + e2;
        ph = qt * (r * em1 - e2);
        sg = qt * em1;
      } else {
        const double pt = exp(b + r);
        ph = pt * (r - 1.0) + qt;
        sg = pt - qt;
      }
      v[0] += ph;
      v[1] += sg;
      if (moments) {
        const double dc = d - d0, e1 = (qt + sg) * dc, e2m = e1 * dc, e3 = e2m * dc, e4 = e3 * dc;
        v[2] += e1;
        v[3] += e2m;
        v[4] += e3;
        v[5] += e4;
        v[6] += e4 * dc;
      }
    });
    if (!moments) {
      double u[2] = {v[0], v[1]};
      block_sum<2>(u);
      return {u[0], u[1]};
    }
    block_sum<7>(v);
    return {v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
  }

  // The largest b_i + t d_i over the common support and its d_i (ties: the lowest index).
  __device__ ps::Max max(double lse_q, double cd, double t) const {
    double y = -INFINITY, dv = 0.0;
    int64_t at = INT64_MAX;
    each([&](int64_t i, double zi, double wi) {
      if (!(zi > -INFINITY && wi > -INFINITY)) return;
      const double d = (zi - wi) * invT - cd, yi = (wi * invT - lse_q) + t * d;
      if (yi > y) {
        y = yi;
        dv = d;
        at = i;
      }
    });
    __shared__ double sy[32], sd[32];
    __shared__ long long si[32];
    long long ai = at;
    // Lane 0 gets the warp's best (y, d, index): the largest y, ties to the lowest index.
    auto warp_best = [&] {
      for (int o = 16; o > 0; o >>= 1) {
        const double y2 = __shfl_down_sync(0xffffffffu, y, o), d2 = __shfl_down_sync(0xffffffffu, dv, o);
        const long long i2 = __shfl_down_sync(0xffffffffu, ai, o);
        if (y2 > y || (y2 == y && i2 < ai)) {
          y = y2;
          dv = d2;
          ai = i2;
        }
      }
    };
    warp_best();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
      sy[warp] = y;
      sd[warp] = dv;
      si[warp] = ai;
    }
    __syncthreads();
    if (warp == 0) {
      y = lane < nw ? sy[lane] : -INFINITY;
      dv = lane < nw ? sd[lane] : 0.0;
      ai = lane < nw ? si[lane] : LLONG_MAX;
      warp_best();
      if (lane == 0) {
        sy[0] = y;
        sd[0] = dv;
      }
    }
    __syncthreads();
    ps::Max m;
    m.y = sy[0];
    m.d = sd[0];
    __syncthreads();
    return m;
  }

  __device__ void write(double lse_p, double lse_q, double t, double lam, bool inside) const {
    const double cd = lse_p - lse_q;
    each([&](int64_t i, double zi, double wi) {
      double r;
      if (inside) {
        r = zi > -INFINITY ? zi * invT - lse_p : -INFINITY;
      } else {
        const double d = (zi - wi) * invT - cd;
        r = (zi > -INFINITY && wi > -INFINITY) ? (wi * invT - lse_q) + t * d - lam : -INFINITY;
      }
      out[i] = Out(r);
    });
  }

  __device__ void fail(int bits) const {
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) out[i] = Out(NAN);
    if (threadIdx.x == 0) {
      *status |= bits;
      for (int j = 0; j < ps::kStats; ++j) S[j] = NAN;
    }
  }

  __device__ void finish(const double (&st)[ps::kStats]) const {
    if (threadIdx.x == 0)
      for (int j = 0; j < ps::kStats; ++j) S[j] = st[j];
  }
};

template <class In, class Out>
__global__ void __launch_bounds__(kProjThreads) proj_fwd_kernel(ProjFwd a, const double* kst) {
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1];
  const int64_t sz = a.z.strides[a.z.ndim - 1], sw = a.w.strides[a.w.ndim - 1];
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    // The exact-KL kernel's status keeps only its error bits (as on the CPU).
    const int st = a.status[r] & kErrorBits;
    __syncthreads();
    if (threadIdx.x == 0) a.status[r] = st;
    GpuRow<In, Out> row{row_ptr<In>(a.z, r), row_ptr<In>(a.w, r), sz, sw, V, 1.0 / a.T,
                        static_cast<Out*>(a.out) + r * V, a.stats + kProjStats * r, a.status + r};
    ps::forward_row(row, kst + kPairStats * r, st, a.eps);
    __syncthreads();
  }
}

template <class In>
__global__ void __launch_bounds__(kProjThreads) proj_bwd_kernel(ProjBwd a) {
  using SOut = typename std::conditional<std::is_same<In, double>::value, double, float>::type;
  const int64_t N = nrows(a.z), V = a.z.shape[a.z.ndim - 1];
  const int64_t sz = a.z.strides[a.z.ndim - 1], sw = a.w.strides[a.w.ndim - 1];
  const double invT = 1.0 / a.T;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const In* z = row_ptr<In>(a.z, r);
    const In* w = row_ptr<In>(a.w, r);
    const double* S = a.stats + kProjStats * r;
    const double* g = a.g + r * V;
    In* dz = a.dz ? static_cast<In*>(a.dz) + r * V : nullptr;
    In* dw = a.dw ? static_cast<In*>(a.dw) + r * V : nullptr;
    const double t = S[1], lse_p = S[2], lse_q = S[3], lam = S[4], mu = S[5];
    const bool inside = ps::grad_inside(S), nan_row = S[0] != S[0];
    const double cd = lse_p - lse_q;
    // Pass 1: sums of G over the support and of G (d - mu); for an active row also the moments
    // of pi~ at (t, lam).
    double v[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const double zi = load_d(z + i * sz), wi = load_d(w + i * sw);
      const bool ok = inside ? zi > -INFINITY : (zi > -INFINITY && wi > -INFINITY);
      if (!ok) continue;
      const double gi = g[i], d = (zi - wi) * invT - cd, dc = d - mu;
      v[0] += gi;
      v[1] += gi * dc;
      if (!inside) {
        const double e = exp((wi * invT - lse_q) + t * d - lam), edc = e * dc;
        v[2] += e;
        v[3] += edc;
        v[4] += edc * dc;
      }
    }
    block_sum<5>(v);
    const ps::GradSums q{v[0], v[1], v[2], v[3], v[4]};
    const ps::GradPlan p = ps::grad_plan(S, q);
    // Pass 2: the gradients.
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
      const double zi = load_d(z + i * sz), wi = load_d(w + i * sw), gi = g[i];
      double gz, gw;
      if (inside) {
        gz = zi > -INFINITY ? (gi - exp(zi * invT - lse_p) * p.SG) * invT : 0.0;
        gw = 0.0;
      } else {
        const bool ok = zi > -INFINITY && wi > -INFINITY;
        const double d = ok ? (zi - wi) * invT - cd : 0.0, b = wi * invT - lse_q;
        const double pt = ok ? exp(b + t * d - p.lam) : 0.0;
        const double po = wi > -INFINITY ? exp(b) : 0.0;
        const double dc = ok ? d - p.mu : 0.0, rr = ok ? gi - pt * p.SG : 0.0;
        gz = (t * rr - (p.kappa * t * t) * (pt * dc)) * invT;
        gw = ((1.0 - t) * rr - p.kappa * ((t * (1.0 - t)) * (pt * dc) - pt + po)) * invT;
      }
      if (nan_row) gz = gw = NAN;
      if (dz) store1(dz + i, SOut(gz));
      if (dw) store1(dw + i, SOut(gw));
    }
  }
}

}  // namespace

void project_kl_forward(const ProjFwd& a, uintptr_t stream) {
  const int64_t N = nrows(a.z);
  if (N == 0) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  // KL(pi_new || pi_old) and the normalisers of every row, from the exact-KL kernels.
  Scratch buf(N * (kPairStats + 1), st);
  PairFwd p;
  p.z = a.z;
  p.w = a.w;
  p.T = a.T;
  p.op = PairOp::kl;
  p.out = buf.p + N * kPairStats;
  p.stats = buf.p;
  p.status = a.status;
  pair_forward(p, stream);
  const int g = grid_for(N, 8);
  by_dtype(a.z.dtype, [&](auto tag) {
    using In = decltype(tag);
    if constexpr (std::is_same<In, double>::value) proj_fwd_kernel<In, double><<<g, kProjThreads, 0, st>>>(a, buf.p);
    else proj_fwd_kernel<In, float><<<g, kProjThreads, 0, st>>>(a, buf.p);
  });
  check(cudaGetLastError(), "project_kl_forward launch");
}

void project_kl_backward(const ProjBwd& a, uintptr_t stream) {
  const int64_t N = nrows(a.z);
  if (N == 0 || a.z.shape[a.z.ndim - 1] == 0 || (!a.dz && !a.dw)) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int g = grid_for(N, 8);
  by_dtype(a.z.dtype, [&](auto tag) {
    using In = decltype(tag);
    proj_bwd_kernel<In><<<g, kProjThreads, 0, st>>>(a);
  });
  check(cudaGetLastError(), "project_kl_backward launch");
}

}  // namespace cuda
}  // namespace trmath
