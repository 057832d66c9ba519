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
}  // namespace isa_generic
#if defined(TRMATH_HAVE_AVX2)
namespace isa_avx2 {
void project_kl_forward_rows(const ProjFwd& a, const double* kst);
void project_kl_backward_rows(const ProjBwd& a);
void sparse_tail_rows(const View& z, const View& w, double* out, double* mass);
}  // namespace isa_avx2
#endif
#if defined(TRMATH_HAVE_AVX512)
namespace isa_avx512 {
void project_kl_forward_rows(const ProjFwd& a, const double* kst);
void project_kl_backward_rows(const ProjBwd& a);
void sparse_tail_rows(const View& z, const View& w, double* out, double* mass);
}  // namespace isa_avx512
#endif

namespace {

// The projection kernels of the instruction set the exact kernels use (chosen in dispatch.cpp).
bool use_isa(const char* isa) { return std::strcmp(kernels().isa, isa) == 0; }

}  // namespace

// Calls isa_<set>::fn(args...) for the exact kernels' instruction set.
#if defined(TRMATH_HAVE_AVX512)
#define TRMATH_PROJ_AVX512(fn, ...) \
  if (use_isa("avx512")) return isa_avx512::fn(__VA_ARGS__);
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

void register_project(py::module_& m) {
  m.def("project_kl_forward", [](const Desc& z, const Desc& w, double eps, double T, uintptr_t out,
                                 uintptr_t stats, uintptr_t status) {
    ProjFwd a = proj_fwd_args(z, w, eps, T, out, stats, status);
    py::gil_scoped_release nogil;
    const int64_t rows = a.z.rows();
    std::vector<double> kout(size_t(std::max<int64_t>(rows, 1)));
    std::vector<double> kst(size_t(std::max<int64_t>(rows, 1)) * kPairStats);
    PairFwd p;
    p.z = a.z;
    p.w = a.w;
    p.T = T;
    p.op = PairOp::kl;
    p.out = kout.data();
    p.stats = kst.data();
    p.status = a.status;
    kernels().pair_fwd(p);
    for (int64_t r = 0; r < rows; ++r) a.status[r] &= kErrorBits;
    TRMATH_PROJ_CALL(project_kl_forward_rows, a, kst.data())
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
