// trmath: bindings of the coarse-grained (Binary / Top-K) helpers. Placeholder until filled.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace trmath {
void register_coarse(py::module_& m) { (void)m; }
}  // namespace trmath
