// trmath: CPU kernels of the KL-ball projection (TROLL). Compiled once per instruction set,
// like kernels_fwd.cpp; cpp/src/bind_project.cpp picks the copy matching the exact kernels in use.
//
// Forward, per row (rows are spread over the thread pool; each row is reduced by one thread in
// a fixed order, so a row's result does not depend on the number of threads or on the batch),
// after the exact-KL kernel has given KL(pi_new || pi_old) and the normalisers of every row:
// the solver of trmath/project_solve.hpp (shared with the CUDA kernels) over the vectorised
// passes of trmath/project.hpp. Backward (implicit gradient): two passes per row. No [N, V]
// temporary besides the outputs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#ifndef TRMATH_ISA
#error "TRMATH_ISA must be defined"
#endif
#define TRMATH_CAT2(a, b) a##b
#define TRMATH_CAT(a, b) TRMATH_CAT2(a, b)
#define simd TRMATH_CAT(simd_, TRMATH_ISA)

#include "project_args.hpp"
#include "trmath/project.hpp"

#define TRMATH_NS TRMATH_CAT(isa_, TRMATH_ISA)

namespace trmath {
namespace TRMATH_NS {
namespace {

using namespace simd;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <class In>
const In* row_ptr(const View& v, int64_t r) {
  return reinterpret_cast<const In*>(v.data) + v.row_offset(r);
}

// One row's passes for the shared solver (trmath/project_solve.hpp).
template <class In, class Out>
struct CpuRow {
  const In *z, *w;
  int64_t sz, sw, V;
  double invT;
  Out* out;
  double* S;
  int* status;
  ProjNorm norm(bool swapped, double c, double cd) const {
    return swapped ? proj_norm_pass(w, sw, z, sz, V, invT, c, cd, false)
                   : proj_norm_pass(z, sz, w, sw, V, invT, c, cd, true);
  }
  ProjMoments interp(double lse_q, double cd, double t, double c, double d0) const {
    return proj_interp_pass(z, sz, w, sw, V, invT, lse_q, cd, t, c, d0);
  }
  ProjPhi phi(double lse_q, double cd, double t, double lam_r, bool moments, double d0) const {
    return proj_phi_pass(z, sz, w, sw, V, invT, lse_q, cd, t, lam_r, moments, d0);
  }
  ProjMax max(double lse_q, double cd, double t) const { return proj_max_pass(z, sz, w, sw, V, invT, lse_q, cd, t); }
  void write(double lse_p, double lse_q, double t, double lam, bool inside) const {
    proj_write_pass(z, sz, w, sw, V, invT, lse_p, lse_q, t, lam, inside, out);
  }
  void fail(int bits) const {
    *status |= bits;
    for (int64_t i = 0; i < V; ++i) out[i] = Out(kNaN);
    for (int j = 0; j < kProjStats; ++j) S[j] = kNaN;
  }
  void finish(const double (&st)[kProjStats]) const {
    for (int j = 0; j < kProjStats; ++j) S[j] = st[j];
  }
};

template <class In, class Out>
void forward_rows(const ProjFwd& a, const double* kst) {
  const int64_t V = a.z.V(), rows = a.z.rows();
  const int64_t sz = a.z.vstride(), sw = a.w.vstride();
  const double invT = 1.0 / a.T;
  parallel_for(rows, [&](int64_t r) {
    CpuRow<In, Out> row{row_ptr<In>(a.z, r), row_ptr<In>(a.w, r), sz, sw, V, invT,
                        static_cast<Out*>(a.out) + r * V, a.stats + kProjStats * r, a.status + r};
    projsolve::forward_row(row, kst + kPairStats * r, a.status[r], a.eps);
  });
}

template <class In>
void backward_rows(const ProjBwd& a) {
  const int64_t V = a.z.V(), rows = a.z.rows();
  const int64_t sz = a.z.vstride(), sw = a.w.vstride();
  const double invT = 1.0 / a.T;
  parallel_for(rows, [&](int64_t r) {
    const In* z = row_ptr<In>(a.z, r);
    const In* w = row_ptr<In>(a.w, r);
    const double* S = a.stats + kProjStats * r;
    const double* g = a.g + r * V;
    In* dz = a.dz ? static_cast<In*>(a.dz) + r * V : nullptr;
    In* dw = a.dw ? static_cast<In*>(a.dw) + r * V : nullptr;
    const double t = S[1], lse_p = S[2], lse_q = S[3];
    const bool inside = projsolve::grad_inside(S);
    const ProjGradSums q = proj_grad_sums(z, sz, w, sw, g, V, invT, lse_p - lse_q, lse_q, t, S[4], S[5], inside);
    const projsolve::GradPlan p = projsolve::grad_plan(S, q);
    proj_grad_write(z, sz, w, sw, g, V, invT, lse_p, lse_q, t, p.lam, p.mu, inside, p.SG, p.kappa, dz, dw);
    if (std::isnan(S[0])) {
      for (int64_t i = 0; i < V; ++i) {
        if (dz) proj_store(dz + i, kNaN);
        if (dw) proj_store(dw + i, kNaN);
      }
    }
  });
}

template <class In, class Out>
void tvmix_forward_rows(const TvMix& a) {
  const int64_t V = a.z.V(), rows = a.z.rows();
  const int64_t sz = a.z.vstride(), sw = a.w.vstride();
  const double invT = 1.0 / a.T;
  parallel_for(rows, [&](int64_t r) {
    const double* P = a.prm + kTvMixPrm * r;
    tvmix_write_pass(row_ptr<In>(a.z, r), sz, row_ptr<In>(a.w, r), sw, V, invT, P[0], P[1],
                     static_cast<Out*>(a.out) + r * V);
  });
}

template <class In>
void tvmix_backward_rows(const TvMix& a) {
  const int64_t V = a.z.V(), rows = a.z.rows();
  const int64_t sz = a.z.vstride(), sw = a.w.vstride();
  const double invT = 1.0 / a.T;
  parallel_for(rows, [&](int64_t r) {
    const double* P = a.prm + kTvMixPrm * r;
    const In* z = row_ptr<In>(a.z, r);
    const In* w = row_ptr<In>(a.w, r);
    const double* g = a.g + r * V;
    const TvMixSums q = tvmix_grad_sums(z, sz, w, sw, g, V, invT, P[0], P[1], P[4]);
    a.dlam[r] = q.s3;
    tvmix_grad_write(z, sz, w, sw, g, V, invT, P[0], P[1], P[2], P[3], q.s1, q.s2,
                     a.dz ? static_cast<In*>(a.dz) + r * V : nullptr, a.dw ? static_cast<In*>(a.dw) + r * V : nullptr);
  });
}

// One row of log-probabilities x (S entries) to float64 out[0 .. S) with its tail bucket
// out[S] = log(1 - sum e^x) appended (project_kl_sparse). Returns the log-mass
// s = log sum e^x (NaN if some entry is NaN, +inf if one is +inf, -inf if all are -inf); the
// tail is computed from min(s, 0): log(-expm1(s)) near s = 0, log1p(-e^s) below -log 2, each
// accurate to a few ulps there.
template <class In>
double tail_row(const In* x, int64_t vs, int64_t S, double* out) {
  const double inf = std::numeric_limits<double>::infinity();
  d4 mv4 = splat<d4>(-inf);
  l4 nan4 = l4{};
  int64_t i0 = 0;
  if (vs == 1) {
    for (; i0 + 4 <= S; i0 += 4) {
      const d4 v = Load4<In>::load(x + i0);
      std::memcpy(out + i0, &v, sizeof v);
      nan4 |= v != v;
      mv4 = vmax(v, mv4);  // a NaN v leaves mv4 (it is flagged in nan4)
    }
  }
  double m = -inf;
  bool nan = false;
  for (int i = 0; i < 4; ++i) {
    m = mv4[i] > m ? mv4[i] : m;
    nan |= nan4[i] != 0;
  }
  for (int64_t i = i0; i < S; ++i) {
    const double v = to_double(x[i * vs]);
    out[i] = v;
    nan |= v != v;
    m = v > m ? v : m;
  }
  double s;
  if (nan) {
    s = kNaN;
  } else if (m == inf || m == -inf) {
    s = m;
  } else {
    d4 acc = splat<d4>(0.0);
    const d4 mv = splat<d4>(m);
    int64_t i = 0;
    for (; i + 4 <= S; i += 4) {
      d4 v;
      std::memcpy(&v, out + i, sizeof v);
      acc += exp_d(v - mv);
    }
    if (i < S) {
      d4 v = splat<d4>(-inf);  // exp_d(-inf) = 0 pads the last vector
      for (int64_t j = 0; i + j < S; ++j) v[j] = out[i + j];
      acc += exp_d(v - mv);
    }
    s = m + std::log(hsum(acc));
  }
  const double c = s > 0.0 ? 0.0 : s;  // NaN stays NaN
  out[S] = c > -0.6931471805599453 ? std::log(-std::expm1(c)) : std::log1p(-std::exp(c));
  return s;
}

template <class In>
void tail_row_of(const View& v, int64_t r, double* out, double* mass) {
  const int64_t S = v.V();
  mass[r] = tail_row(row_ptr<In>(v, r), v.vstride(), S, out + r * (S + 1));
}

template <class F>
void by_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f16: return f(f16_t{}, float{});
    case DType::bf16: return f(bf16_t{}, float{});
    case DType::f32: return f(float{}, float{});
    case DType::f64: return f(double{}, double{});
  }
}

}  // namespace

void project_kl_forward_rows(const ProjFwd& a, const double* kst) {
  if (a.out_float && a.z.dtype == DType::f64) return forward_rows<double, float>(a, kst);
  by_dtype(a.z.dtype, [&](auto in, auto o) { forward_rows<decltype(in), decltype(o)>(a, kst); });
}

void sparse_tail_rows(const View& z, const View& w, double* out, double* mass) {
  // Rows of z, then of w, over the pool: out is [2, rows, S + 1], mass [2, rows].
  const int64_t rows = z.rows(), S = z.V();
  parallel_for(2 * rows, [&](int64_t u) {
    const bool second = u >= rows;
    const View& v = second ? w : z;
    double* o = out + (second ? rows * (S + 1) : 0);
    double* m = mass + (second ? rows : 0);
    by_dtype(v.dtype, [&](auto in, auto) { tail_row_of<decltype(in)>(v, u - (second ? rows : 0), o, m); });
  });
}

void project_kl_backward_rows(const ProjBwd& a) {
  by_dtype(a.z.dtype, [&](auto in, auto) { backward_rows<decltype(in)>(a); });
}

void project_tv_forward_rows(const TvMix& a) {
  by_dtype(a.z.dtype, [&](auto in, auto o) { tvmix_forward_rows<decltype(in), decltype(o)>(a); });
}

void project_tv_backward_rows(const TvMix& a) {
  by_dtype(a.z.dtype, [&](auto in, auto) { tvmix_backward_rows<decltype(in)>(a); });
}

}  // namespace TRMATH_NS
}  // namespace trmath
