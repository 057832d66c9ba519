// trmath: bindings of the trust-region projections. Placeholder until filled.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace trmath {
void register_project(py::module_& m) { (void)m; }
}  // namespace trmath
