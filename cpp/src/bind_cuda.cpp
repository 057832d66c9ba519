// trmath: bindings of the CUDA kernels (built only with -DTRMATH_CUDA=ON). The same typed
// views as the CPU bindings, holding device addresses, plus the caller's stream. Every call
// releases the GIL; kernels are queued on the stream and the call returns at once.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_api.hpp"
#include "desc.hpp"

namespace py = pybind11;

namespace trmath {
namespace {
template <class T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }
}  // namespace

void register_cuda(py::module_& m) {
  m.def("cuda_device_name", &cuda::device_name, "Name of the current CUDA device, or an empty string.");
  m.def("cuda_single_forward",
        [](const Desc& z, uintptr_t tokens, double T, int op, uintptr_t out0, uintptr_t out1,
           uintptr_t stats, uintptr_t status, uintptr_t stream) {
          SingleFwd a;
          a.z = make_view(z, "logits");
          a.tokens = ptr<const int64_t>(tokens);
          a.T = T;
          a.op = static_cast<SingleOp>(op);
          a.out0 = ptr<void>(out0);
          a.out1 = ptr<void>(out1);
          a.stats = ptr<double>(stats);
          a.status = ptr<int>(status);
          if ((a.op == SingleOp::logprob || a.op == SingleOp::logprob_entropy) && !a.tokens)
            throw std::invalid_argument("tokens required");
          py::gil_scoped_release nogil;
          cuda::single_forward(a, stream);
        });
  m.def("cuda_pair_forward", [](const Desc& z, const Desc& w, double T, int op, uintptr_t out,
                                uintptr_t stats, uintptr_t status, uintptr_t stream) {
    PairFwd a;
    a.z = make_view(z, "p_logits");
    a.w = make_view(w, "q_logits");
    check_same(a.z, a.w, "p_logits", "q_logits");
    a.T = T;
    a.op = static_cast<PairOp>(op);
    a.out = ptr<void>(out);
    a.stats = ptr<double>(stats);
    a.status = ptr<int>(status);
    py::gil_scoped_release nogil;
    cuda::pair_forward(a, stream);
  });
  m.def("cuda_single_backward", [](const Desc& z, uintptr_t tokens, double T, int op, uintptr_t stats,
                                   uintptr_t g0, uintptr_t g1, uintptr_t dz, uintptr_t stream) {
    SingleBwd a;
    a.z = make_view(z, "logits");
    a.tokens = ptr<const int64_t>(tokens);
    a.T = T;
    a.op = static_cast<SingleOp>(op);
    a.stats = ptr<const double>(stats);
    a.g0 = ptr<const double>(g0);
    a.g1 = ptr<const double>(g1);
    a.dz = ptr<void>(dz);
    py::gil_scoped_release nogil;
    cuda::single_backward(a, stream);
  });
  m.def("cuda_pair_backward", [](const Desc& z, const Desc& w, double T, int op, uintptr_t stats,
                                 uintptr_t g, uintptr_t dz, uintptr_t dw, uintptr_t stream) {
    PairBwd a;
    a.z = make_view(z, "p_logits");
    a.w = make_view(w, "q_logits");
    check_same(a.z, a.w, "p_logits", "q_logits");
    a.T = T;
    a.op = static_cast<PairOp>(op);
    a.stats = ptr<const double>(stats);
    a.g = ptr<const double>(g);
    a.dz = ptr<void>(dz);
    a.dw = ptr<void>(dw);
    py::gil_scoped_release nogil;
    cuda::pair_backward(a, stream);
  });
}

}  // namespace trmath
