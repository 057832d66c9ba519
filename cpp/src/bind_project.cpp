// trmath: bindings of the KL-ball projection (TROLL). The exact-KL kernel runs first over the
// batch (KL(pi_new || pi_old), normalisers, row status); the per-row root finding and the
// implicit-gradient backward are in project_kernels.cpp (one copy per instruction set).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <algorithm>
#include <cstring>
#include <vector>

#include "desc.hpp"
#include "project_args.hpp"

namespace py = pybind11;

namespace trmath {

const KernelTable& kernels();
namespace isa_generic {
void project_kl_forward_rows(const ProjFwd& a, const double* kst);
void project_kl_backward_rows(const ProjBwd& a);
void sparse_tail_rows(const View& z, const View& w, double* out, double* mass);
void project_tv_forward_rows(const TvMix& a);
void project_tv_backward_rows(const TvMix& a);
}  // namespace isa_generic
#if defined(TRMATH_HAVE_AVX2)
namespace isa_avx2 {
void project_kl_forward_rows(const ProjFwd& a, const double* kst);
void project_kl_backward_rows(const ProjBwd& a);
void sparse_tail_rows(const View& z, const View& w, double* out, double* mass);
void project_tv_forward_rows(const TvMix& a);
void project_tv_backward_rows(const TvMix& a);
}  // namespace isa_avx2
#endif
#if defined(TRMATH_HAVE_AVX512)
namespace isa_avx512 {
void project_kl_forward_rows(const ProjFwd& a, const double* kst);
void project_kl_backward_rows(const ProjBwd& a);
void sparse_tail_rows(const View& z, const View& w, double* out, double* mass);
void project_tv_forward_rows(const TvMix& a);
void project_tv_backward_rows(const TvMix& a);
}  // namespace isa_avx512
#endif

namespace {

// The projection kernels of the instruction set the exact kernels use (chosen in dispatch.cpp).
bool use_isa(const char* isa) { return std::strcmp(kernels().isa, isa) == 0; }

}  // namespace

// Calls isa_<set>::fn(args...) for the exact kernels' instruction set (the AVX-512 projection
// kernels also serve the exact kernels' avx512_bf16 build).
#if defined(TRMATH_HAVE_AVX512)
#define TRMATH_PROJ_AVX512(fn, ...) \
  if (use_isa("avx512") || use_isa("avx512_bf16")) return isa_avx512::fn(__VA_ARGS__);
#else
#define TRMATH_PROJ_AVX512(fn, ...)
#endif
#if defined(TRMATH_HAVE_AVX2)
#define TRMATH_PROJ_AVX2(fn, ...) \
  if (!use_isa("generic")) return isa_avx2::fn(__VA_ARGS__);
#else
#define TRMATH_PROJ_AVX2(fn, ...)
#endif
#define TRMATH_PROJ_CALL(fn, ...)        \
  TRMATH_PROJ_AVX512(fn, __VA_ARGS__)    \
  TRMATH_PROJ_AVX2(fn, __VA_ARGS__)      \
  isa_generic::fn(__VA_ARGS__);

namespace {

void forward_rows_any(const ProjFwd& a, const double* kst) { TRMATH_PROJ_CALL(project_kl_forward_rows, a, kst) }
void tail_rows_any(const View& z, const View& w, double* out, double* mass) {
  TRMATH_PROJ_CALL(sparse_tail_rows, z, w, out, mass)
}
void tv_forward_any(const TvMix& a) { TRMATH_PROJ_CALL(project_tv_forward_rows, a) }
void tv_backward_any(const TvMix& a) { TRMATH_PROJ_CALL(project_tv_backward_rows, a) }

// The exact-KL kernel's statistics of every row, then the projection (GIL released).
void project_forward(const ProjFwd& a) {
  const int64_t rows = a.z.rows();
  std::vector<double> kout(size_t(std::max<int64_t>(rows, 1)));
  std::vector<double> kst(size_t(std::max<int64_t>(rows, 1)) * kPairStats);
  PairFwd p;
  p.z = a.z;
  p.w = a.w;
  p.T = a.T;
  p.op = PairOp::kl;
  p.out = kout.data();
  p.stats = kst.data();
  p.status = a.status;
  kernels().pair_fwd(p);
  for (int64_t r = 0; r < rows; ++r) a.status[r] &= kErrorBits;
  forward_rows_any(a, kst.data());
}

// A contiguous float64 [rows, S1] view of buf.
View f64_rows(const double* buf, int64_t rows, int64_t S1) {
  View v;
  v.data = reinterpret_cast<const char*>(buf);
  v.dtype = DType::f64;
  v.ndim = 2;
  v.shape[0] = rows;
  v.shape[1] = S1;
  v.strides[0] = S1;
  v.strides[1] = 1;
  return v;
}

}  // namespace

void register_project(py::module_& m) {
  // TV projection: the log-mixture of each row pair at per-row constants prm [rows, 5] (see
  // project_args.hpp), and its backward (the mixture's part of the gradient, dL/dlam).
  m.def("project_tv_mix_forward", [](const Desc& z, const Desc& w, double T, uintptr_t prm, uintptr_t out) {
    TvMix a = tv_mix_args(z, w, T, prm);
    a.out = reinterpret_cast<void*>(out);
    py::gil_scoped_release nogil;
    tv_forward_any(a);
  });
  m.def("project_tv_mix_backward", [](const Desc& z, const Desc& w, double T, uintptr_t prm, uintptr_t g,
                                      uintptr_t dz, uintptr_t dw, uintptr_t dlam) {
    TvMix a = tv_mix_args(z, w, T, prm);
    a.g = reinterpret_cast<const double*>(g);
    a.dz = reinterpret_cast<void*>(dz);
    a.dw = reinterpret_cast<void*>(dw);
    a.dlam = reinterpret_cast<double*>(dlam);
    py::gil_scoped_release nogil;
    tv_backward_any(a);
  });
  m.def("project_kl_forward", [](const Desc& z, const Desc& w, double eps, double T, uintptr_t out,
                                 uintptr_t stats, uintptr_t status) {
    ProjFwd a = proj_fwd_args(z, w, eps, T, out, stats, status);
    py::gil_scoped_release nogil;
    project_forward(a);
  });
  // The sparse projection without a graph, in one call: tails appended (float64 scratch), the
  // exact-KL statistics and the projection of the S + 1 categories, written as float (16/32-bit
  // inputs) or double into out [rows, S + 1], and eta [rows]. Returns the number of rows that
  // are not valid -- the exact kernel's error bits, infeasible, or either row's log-mass s
  // outside -inf < s <= slack -- for which the caller takes the general path (and its errors).
  m.def("project_kl_sparse_forward", [](const Desc& z, const Desc& w, double eps, double slack,
                                        uintptr_t out, uintptr_t eta) -> int64_t {
    View vz = make_view(z, "new_logprobs"), vw = make_view(w, "old_logprobs");
    check_same(vz, vw, "new_logprobs", "old_logprobs");
    if (!(eps > 0) || !std::isfinite(eps)) throw std::invalid_argument("epsilon must be finite and > 0");
    py::gil_scoped_release nogil;
    const int64_t rows = vz.rows(), S1 = vz.V() + 1;
    // Scratch kept by the calling thread between calls while it is small (up to 4 MiB; a fresh
    // allocation of that size would be mapped and faulted in page by page): the float64 rows
    // with tails [2, rows, S + 1], their log-masses [2, rows], statistics and status.
    const size_t nt = size_t(rows) * size_t(S1) * 2, ns = size_t(rows) * (2 + kProjStats);
    thread_local std::vector<double> keep;
    thread_local std::vector<int> keep_status;
    std::vector<double> big;
    std::vector<double>& buf = (nt + ns) * sizeof(double) <= (size_t(4) << 20) ? keep : big;
    if (buf.size() < nt + ns) buf.resize(nt + ns);
    if (keep_status.size() < size_t(rows)) keep_status.resize(size_t(rows));
    double* tails = buf.data();
    double* mass = tails + nt;
    double* stats = mass + 2 * rows;
    int* status = keep_status.data();
    std::fill(status, status + rows, 0);
    tail_rows_any(vz, vw, tails, mass);
    ProjFwd a;
    a.z = f64_rows(tails, rows, S1);
    a.w = f64_rows(tails + rows * S1, rows, S1);
    a.eps = eps;
    a.T = 1.0;
    a.out = reinterpret_cast<void*>(out);
    a.stats = stats;
    a.status = status;
    a.out_float = vz.dtype != DType::f64;
    project_forward(a);
    double* e = reinterpret_cast<double*>(eta);
    const double ninf = -std::numeric_limits<double>::infinity();
    int64_t bad = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const double sz = mass[r], sw = mass[rows + r];
      e[r] = stats[r * kProjStats];
      bad += status[r] != 0 || !(sz > ninf && sz <= slack) || !(sw > ninf && sw <= slack);
    }
    return bad;
  });
  // The sparse projection's inputs (log-probabilities of S tokens, rows of z and w) as float64
  // [2, rows, S + 1] with the tail buckets appended; mass [2, rows] = log sum e^x of each row
  // (for the caller's checks).
  m.def("sparse_tails", [](const Desc& z, const Desc& w, uintptr_t out, uintptr_t mass) {
    View vz = make_view(z, "new_logprobs"), vw = make_view(w, "old_logprobs");
    check_same(vz, vw, "new_logprobs", "old_logprobs");
    py::gil_scoped_release nogil;
    double* o = reinterpret_cast<double*>(out);
    double* s = reinterpret_cast<double*>(mass);
    TRMATH_PROJ_CALL(sparse_tail_rows, vz, vw, o, s)
  });
  m.def("project_kl_backward", [](const Desc& z, const Desc& w, double T, uintptr_t stats,
                                  uintptr_t g, uintptr_t dz, uintptr_t dw) {
    ProjBwd a = proj_bwd_args(z, w, T, stats, g, dz, dw);
    py::gil_scoped_release nogil;
    TRMATH_PROJ_CALL(project_kl_backward_rows, a)
  });
}

}  // namespace trmath
