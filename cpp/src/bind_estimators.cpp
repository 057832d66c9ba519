// trmath: binding of the sampled KL estimators' element kernel (estimator_kernels.cpp, one copy
// per instruction set). The Python layer (trmath/_backend.py) hands contiguous buffers of one
// dtype and allocates the outputs.
#include <pybind11/pybind11.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "estimator_args.hpp"

namespace py = pybind11;

namespace trmath {

const KernelTable& kernels();
namespace isa_generic {
void k_estimate(const KArgs& a);
void k_estimate_backward(const KBwdArgs& a);
void binary_coarse(const BinArgs& a);
void topk_coarse(const TopkArgs& a);
void mismatch_sums(const MismatchArgs& a);
}  // namespace isa_generic
#if defined(TRMATH_HAVE_AVX2)
namespace isa_avx2 {
void k_estimate(const KArgs& a);
void k_estimate_backward(const KBwdArgs& a);
void binary_coarse(const BinArgs& a);
void topk_coarse(const TopkArgs& a);
void mismatch_sums(const MismatchArgs& a);
}  // namespace isa_avx2
#endif
#if defined(TRMATH_HAVE_AVX512)
namespace isa_avx512 {
void k_estimate(const KArgs& a);
void k_estimate_backward(const KBwdArgs& a);
void binary_coarse(const BinArgs& a);
void topk_coarse(const TopkArgs& a);
void mismatch_sums(const MismatchArgs& a);
}  // namespace isa_avx512
#endif

namespace {

// The copy of the instruction set the exact kernels use (chosen in dispatch.cpp; the AVX-512
// copy also serves their avx512_bf16 build).
#if defined(TRMATH_HAVE_AVX512)
#define TRMATH_EST_AVX512(fn, a) \
  if (std::strcmp(isa, "avx512") == 0 || std::strcmp(isa, "avx512_bf16") == 0) return isa_avx512::fn(a);
#else
#define TRMATH_EST_AVX512(fn, a)
#endif
#if defined(TRMATH_HAVE_AVX2)
#define TRMATH_EST_AVX2(fn, a) \
  if (std::strcmp(isa, "generic") != 0) return isa_avx2::fn(a);
#else
#define TRMATH_EST_AVX2(fn, a)
#endif
#define TRMATH_EST_CALL(fn, a)       \
  const char* isa = kernels().isa; \
  TRMATH_EST_AVX512(fn, a)         \
  TRMATH_EST_AVX2(fn, a)           \
  (void)isa;                       \
  isa_generic::fn(a);

void k_estimate_any(const KArgs& a) { TRMATH_EST_CALL(k_estimate, a) }
void k_estimate_backward_any(const KBwdArgs& a) { TRMATH_EST_CALL(k_estimate_backward, a) }
void binary_coarse_any(const BinArgs& a) { TRMATH_EST_CALL(binary_coarse, a) }
void topk_coarse_any(const TopkArgs& a) { TRMATH_EST_CALL(topk_coarse, a) }
void mismatch_sums_any(const MismatchArgs& a) { TRMATH_EST_CALL(mismatch_sums, a) }

// The fields the coarse kernels share, checked (`work`: the call has elements to touch).
void fill_coarse(CoarseArgs& a, const char* fn, bool work, uintptr_t lp, uintptr_t lq, int dtype, int kind,
                 double tol_p, double tol_q, uintptr_t value, bool value64, uintptr_t g, bool g64, bool g_scalar,
                 uintptr_t gp, uintptr_t gq) {
  const std::string name(fn);
  if (dtype < 0 || dtype > 3) throw std::invalid_argument(name + ": unsupported dtype code");
  if (kind < 0 || kind > 1) throw std::invalid_argument(name + ": kind must be 0 (tv) or 1 (kl)");
  if (work && (!lp || !lq || (!g && !value))) throw std::invalid_argument(name + ": null buffer");
  a.lp = reinterpret_cast<const void*>(lp);
  a.lq = reinterpret_cast<const void*>(lq);
  a.dtype = static_cast<DType>(dtype);
  a.kind = kind;
  a.tol_p = tol_p;
  a.tol_q = tol_q;
  a.value = reinterpret_cast<void*>(value);
  a.value64 = value64;
  a.g = reinterpret_cast<const void*>(g);
  a.g64 = g64;
  a.g_scalar = g_scalar;
  a.gp = reinterpret_cast<void*>(gp);
  a.gq = reinterpret_cast<void*>(gq);
}

// Runs fn(a) without the GIL; whether it found a bad entry.
template <class Args>
bool run_released(void (*fn)(const Args&), Args& a) {
  int bad = 0;
  a.bad = &bad;
  {
    py::gil_scoped_release release;
    fn(a);
  }
  return bad != 0;
}

}  // namespace

void register_estimators(py::module_& m) {
  m.def(
      "k_estimate",
      [](uintptr_t s, uintptr_t o, uintptr_t b, uintptr_t valid, int dtype, int64_t n, int value_kind,
         int slope_kind, uintptr_t value, bool value64, uintptr_t slope, bool check, double tol_s, double tol_o,
         double tol_b) {
        if (dtype < 0 || dtype > 3) throw std::invalid_argument("k_estimate: unsupported dtype code");
        if (value_kind < 1 || value_kind > 3 || slope_kind < 1 || slope_kind > 3)
          throw std::invalid_argument("k_estimate: kinds must be 1, 2 or 3");
        if (n < 0) throw std::invalid_argument("k_estimate: negative size");
        if (n > 0 && (!s || !o || !value)) throw std::invalid_argument("k_estimate: null buffer");
        KArgs a;
        a.s = reinterpret_cast<const void*>(s);
        a.o = reinterpret_cast<const void*>(o);
        a.b = reinterpret_cast<const void*>(b);
        a.valid = reinterpret_cast<const uint8_t*>(valid);
        a.dtype = static_cast<DType>(dtype);
        a.n = n;
        a.value_kind = value_kind;
        a.slope_kind = slope_kind;
        a.value = reinterpret_cast<void*>(value);
        a.value64 = value64;
        a.slope = reinterpret_cast<double*>(slope);
        a.check = check;
        a.tol_s = tol_s;
        a.tol_o = tol_o;
        a.tol_b = tol_b;
        int bad = 0;
        a.bad = &bad;
        {
          py::gil_scoped_release release;
          k_estimate_any(a);
        }
        return bad != 0;
      },
      "k1/k2/k3 of lr = o - s element by element (and the slope of a kind), over n contiguous "
      "elements of one dtype; returns whether validation (check) found a bad entry. See "
      "cpp/src/estimator_args.hpp.");
  m.def(
      "k_estimate_backward",
      [](uintptr_t s, uintptr_t o, uintptr_t b, uintptr_t valid, int dtype, int64_t n, int value_kind,
         int slope_kind, uintptr_t g, bool g64, bool g_scalar, uintptr_t gs, uintptr_t go, uintptr_t gb) {
        if (dtype < 0 || dtype > 3) throw std::invalid_argument("k_estimate_backward: unsupported dtype code");
        if (value_kind < 1 || value_kind > 3 || slope_kind < 1 || slope_kind > 3)
          throw std::invalid_argument("k_estimate_backward: kinds must be 1, 2 or 3");
        if (n < 0) throw std::invalid_argument("k_estimate_backward: negative size");
        if (n > 0 && (!s || !o || !g)) throw std::invalid_argument("k_estimate_backward: null buffer");
        KBwdArgs a;
        a.s = reinterpret_cast<const void*>(s);
        a.o = reinterpret_cast<const void*>(o);
        a.b = reinterpret_cast<const void*>(b);
        a.value_kind = value_kind;
        a.gb = reinterpret_cast<void*>(gb);
        a.valid = reinterpret_cast<const uint8_t*>(valid);
        a.dtype = static_cast<DType>(dtype);
        a.n = n;
        a.slope_kind = slope_kind;
        a.g = reinterpret_cast<const void*>(g);
        a.g64 = g64;
        a.g_scalar = g_scalar;
        a.gs = reinterpret_cast<void*>(gs);
        a.go = reinterpret_cast<void*>(go);
        py::gil_scoped_release release;
        k_estimate_backward_any(a);
      },
      "Gradients -g k'(lr) and g k'(lr) of a k_estimate call, the slope recomputed; see "
      "cpp/src/estimator_args.hpp.");
  m.def(
      "binary_coarse",
      [](uintptr_t lp, uintptr_t lq, int dtype, int64_t n, int kind, double tol_p, double tol_q, uintptr_t value,
         bool value64, uintptr_t g, bool g64, bool g_scalar, uintptr_t gp, uintptr_t gq) {
        if (n < 0) throw std::invalid_argument("binary_coarse: negative size");
        BinArgs a;
        a.n = n;
        fill_coarse(a, "binary_coarse", n > 0, lp, lq, dtype, kind, tol_p, tol_q, value, value64, g, g64, g_scalar,
                    gp, gq);
        return run_released(binary_coarse_any, a);
      },
      "binary_tv (kind 0) or binary_kl (kind 1) element by element: the value (g = 0), or the "
      "gradients g * d/dlp, g * d/dlq; returns whether an entry was bad (NaN or above its "
      "tolerance). See cpp/src/estimator_args.hpp.");
  m.def(
      "topk_coarse",
      [](uintptr_t lp, uintptr_t lq, int dtype, int64_t rows, int64_t K, int kind, double tol_p, double tol_q,
         uintptr_t value, bool value64, uintptr_t g, bool g64, bool g_scalar, uintptr_t gp, uintptr_t gq) {
        if (rows < 0 || K < 1) throw std::invalid_argument("topk_coarse: rows >= 0 and K >= 1 required");
        TopkArgs a;
        a.rows = rows;
        a.K = K;
        fill_coarse(a, "topk_coarse", rows > 0, lp, lq, dtype, kind, tol_p, tol_q, value, value64, g, g64,
                    g_scalar, gp, gq);
        return run_released(topk_coarse_any, a);
      },
      "topk_tv (kind 0) or topk_kl (kind 1) of [rows, K] log-probabilities (16/32-bit): the value "
      "per row (g = 0), or the gradients; returns whether a row was bad. See "
      "cpp/src/estimator_args.hpp.");
  m.def(
      "mismatch_sums",
      [](uintptr_t s, uintptr_t o, uintptr_t valid, int dtype, int64_t n, uintptr_t out) {
        if (dtype < 0 || dtype > 3) throw std::invalid_argument("mismatch_sums: unsupported dtype code");
        if (n < 0) throw std::invalid_argument("mismatch_sums: negative size");
        if (!out || (n > 0 && (!s || !o))) throw std::invalid_argument("mismatch_sums: null buffer");
        MismatchArgs a;
        a.s = reinterpret_cast<const void*>(s);
        a.o = reinterpret_cast<const void*>(o);
        a.valid = reinterpret_cast<const uint8_t*>(valid);
        a.dtype = static_cast<DType>(dtype);
        a.n = n;
        a.out = reinterpret_cast<double*>(out);
        py::gil_scoped_release release;
        mismatch_sums_any(a);
      },
      "Sums of the mismatch diagnostics over the valid entries of s (rollout) and o (trainer) "
      "log-probabilities: sum lr, sum k3, max lr, max |lr|, sum e^(lr - max), sum e^(2 (lr - "
      "max)) into 6 doubles; see cpp/src/estimator_args.hpp.");
}

}  // namespace trmath
