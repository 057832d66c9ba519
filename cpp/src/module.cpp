// trmath._core: the compiled core. Private; imported only by trmath/_backend.py.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace trmath {
void register_exact(py::module_& m);
void register_coarse(py::module_& m);
void register_estimators(py::module_& m);
void register_project(py::module_& m);
void register_bufpool(py::module_& m);
#if defined(TRMATH_WITH_CUDA)
void register_cuda(py::module_& m);
#endif
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "trmath compiled core (private; use the trmath package)";
  trmath::register_exact(m);
  trmath::register_coarse(m);
  trmath::register_estimators(m);
  trmath::register_project(m);
  trmath::register_bufpool(m);
#if defined(TRMATH_WITH_CUDA)
  trmath::register_cuda(m);
#endif
}
