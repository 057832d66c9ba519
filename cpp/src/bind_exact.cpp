// trmath: bindings of the exact reductions. Arrays arrive as typed views
// (address, dtype code, shape, strides in elements) so the core never links against torch and
// reads torch tensors and numpy arrays in place. Every call releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "desc.hpp"
#include "exact_args.hpp"
#include "view.hpp"

namespace py = pybind11;

namespace trmath {

const KernelTable& kernels();

// (index, value) of the first nonzero status, or (-1, 0).
static std::pair<int64_t, int> first_nonzero(const int* status, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (status[i] != 0) return {i, status[i]};
  return {-1, 0};
}

void register_exact(py::module_& m) {
  m.def("isa", [] { return std::string(kernels().isa); }, "Instruction set of the kernels in use.");
  // Widths of the per-row statistics the forwards write and the backwards read (the Python
  // side allocates them: a mismatch would be a buffer overrun, so it checks these at import).
  m.attr("single_stats") = kSingleStats;
  m.attr("pair_stats") = kPairStats;
  m.def("num_threads", &num_threads);
  m.def("set_num_threads", [](int n) {
    if (n < 1) throw std::invalid_argument("num_threads must be >= 1");
    set_num_threads(n);
  });
  m.def("segment", [] { return kSegment; });
  // Ask for transparent huge pages on a fresh, untouched allocation (Linux, THP in "madvise"
  // mode): writing a 100 MB gradient then takes ~50 page faults instead of ~25000, which
  // otherwise cost several times the kernel itself. Harmless where unsupported.
  m.def("advise_hugepages", [](uintptr_t p, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = uintptr_t(1) << 21;
    uintptr_t start = (p + huge - 1) & ~(huge - 1), end = (p + nbytes) & ~(huge - 1);
    if (end > start) return madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE) == 0;
#endif
    (void)p;
    (void)nbytes;
    return false;
  });

  // The forwards return (row, status) of the first row whose status is not 0, or (-1, 0): the
  // caller needs no tensor operation to learn that every row was valid. A null status address
  // means the caller does not want it: it goes to scratch here, which saves the caller a tensor
  // allocation (one of a short call's largest fixed costs). A null stats address (an eager call
  // without gradients) reaches the kernels, which then skip what only a backward reads (the
  // statistics' logarithms; JS's two halves, summed as one).
  m.def("single_forward",
        [](const Desc& z, uintptr_t tokens, double T, int op, uintptr_t out0, uintptr_t out1,
           uintptr_t stats, uintptr_t status) {
          SingleFwd a = single_fwd_args(z, tokens, T, op, out0, out1, stats, status);
          py::gil_scoped_release nogil;
          std::vector<int> ss;
          if (!a.status) {
            ss.resize(a.z.rows());
            a.status = ss.data();
          }
          kernels().single_fwd(a);
          return first_nonzero(a.status, a.z.rows());
        });
  m.def("pair_forward", [](const Desc& z, const Desc& w, double T, int op, uintptr_t out,
                           uintptr_t stats, uintptr_t status) {
    PairFwd a = pair_fwd_args(z, w, T, op, out, stats, status);
    py::gil_scoped_release nogil;
    std::vector<int> ss;
    if (!a.status) {
      ss.resize(a.z.rows());
      a.status = ss.data();
    }
    kernels().pair_fwd(a);
    return first_nonzero(a.status, a.z.rows());
  });
  m.def("single_backward", [](const Desc& z, uintptr_t tokens, double T, int op, uintptr_t stats,
                              uintptr_t g0, uintptr_t g1, uintptr_t dz) {
    SingleBwd a = single_bwd_args(z, tokens, T, op, stats, g0, g1, dz);
    py::gil_scoped_release nogil;
    kernels().single_bwd(a);
  });
  m.def("pair_backward", [](const Desc& z, const Desc& w, double T, int op, uintptr_t stats,
                            uintptr_t g, uintptr_t dz, uintptr_t dw) {
    PairBwd a = pair_bwd_args(z, w, T, op, stats, g, dz, dw);
    py::gil_scoped_release nogil;
    kernels().pair_bwd(a);
  });
}

}  // namespace trmath
