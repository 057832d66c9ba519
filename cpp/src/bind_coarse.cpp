// trmath: bindings of the coarse-grained (Binary / Top-K) family.
//
// The coarse divergences need no kernel of their own: their inputs are [..., K] log-probability
// vectors (K small), evaluated in float64 by trmath/_coarse_impl.py, and the only full-row work
// -- the log-partition of each row, read once without [N, V] temporaries -- is the exact
// family's fused token_logprobs / logsumexp kernel (bind_exact.cpp). The top-K search is
// torch.topk, which also reads the row in place. Nothing is registered here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace trmath {
void register_coarse(py::module_& m) { (void)m; }
}  // namespace trmath
