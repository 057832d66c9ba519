// trmath: bindings of the CUDA kernels (built only with -DTRMATH_CUDA=ON). The same typed
// views as the CPU bindings, holding device addresses, plus the caller's stream. Every call
// releases the GIL; kernels are queued on the stream and the call returns at once.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_api.hpp"
#include "desc.hpp"
#include "exact_args.hpp"
#include "project_args.hpp"

namespace py = pybind11;

namespace trmath {

void register_cuda(py::module_& m) {
  m.def("cuda_device_name", &cuda::device_name, "Name of the current CUDA device, or an empty string.");
  m.def("cuda_single_forward",
        [](const Desc& z, uintptr_t tokens, double T, int op, uintptr_t out0, uintptr_t out1,
           uintptr_t stats, uintptr_t status, uintptr_t stream) {
          SingleFwd a = single_fwd_args(z, tokens, T, op, out0, out1, stats, status);
          py::gil_scoped_release nogil;
          cuda::single_forward(a, stream);
        });
  m.def("cuda_pair_forward", [](const Desc& z, const Desc& w, double T, int op, uintptr_t out,
                                uintptr_t stats, uintptr_t status, uintptr_t stream) {
    PairFwd a = pair_fwd_args(z, w, T, op, out, stats, status);
    py::gil_scoped_release nogil;
    cuda::pair_forward(a, stream);
  });
  m.def("cuda_single_backward", [](const Desc& z, uintptr_t tokens, double T, int op, uintptr_t stats,
                                   uintptr_t g0, uintptr_t g1, uintptr_t dz, uintptr_t stream) {
    SingleBwd a = single_bwd_args(z, tokens, T, op, stats, g0, g1, dz);
    py::gil_scoped_release nogil;
    cuda::single_backward(a, stream);
  });
  m.def("cuda_pair_backward", [](const Desc& z, const Desc& w, double T, int op, uintptr_t stats,
                                 uintptr_t g, uintptr_t dz, uintptr_t dw, uintptr_t stream) {
    PairBwd a = pair_bwd_args(z, w, T, op, stats, g, dz, dw);
    py::gil_scoped_release nogil;
    cuda::pair_backward(a, stream);
  });
  m.def("cuda_project_kl_forward", [](const Desc& z, const Desc& w, double eps, double T, uintptr_t out,
                                      uintptr_t stats, uintptr_t status, uintptr_t stream) {
    ProjFwd a = proj_fwd_args(z, w, eps, T, out, stats, status);
    py::gil_scoped_release nogil;
    cuda::project_kl_forward(a, stream);
  });
  m.def("cuda_project_kl_backward", [](const Desc& z, const Desc& w, double T, uintptr_t stats, uintptr_t g,
                                       uintptr_t dz, uintptr_t dw, uintptr_t stream) {
    ProjBwd a = proj_bwd_args(z, w, T, stats, g, dz, dw);
    py::gil_scoped_release nogil;
    cuda::project_kl_backward(a, stream);
  });
  m.attr("cuda_topk_max_k") = cuda::kTopkMaxK;
  m.def(
      "cuda_topk_rows",
      [](const Desc& zd, int64_t k, uintptr_t ids, uintptr_t stream) {
        const View z = make_view(zd, "p_logits");
        if (k < 1 || k > z.V()) throw std::invalid_argument("k: must be in [1, V]");
        if (k > cuda::kTopkMaxK)
          throw std::invalid_argument("k: the CUDA top-k search takes k <= " + std::to_string(cuda::kTopkMaxK));
        if (z.V() > int64_t(INT32_MAX)) throw std::invalid_argument("p_logits: the CUDA top-k search takes V < 2^31");
        py::gil_scoped_release nogil;
        cuda::topk_rows(z, k, reinterpret_cast<int64_t*>(ids), stream);
      },
      "Indices [rows, k] of the k largest logits of each row (value descending, then index), as "
      "topk_rows gives them on the CPU; ids is a contiguous int64 device buffer.");
}

}  // namespace trmath
