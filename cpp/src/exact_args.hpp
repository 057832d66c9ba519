// trmath: argument structs of the exact reductions built from the bindings' Python arguments
// (typed views and addresses), shared by the CPU (bind_exact.cpp) and CUDA (bind_cuda.cpp)
// bindings. Addresses are host or device memory as the caller's tensors are.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "desc.hpp"
#include "view.hpp"

namespace trmath {

template <class T> T* addr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline SingleFwd single_fwd_args(const Desc& z, uintptr_t tokens, double T, int op, uintptr_t out0,
                                 uintptr_t out1, uintptr_t stats, uintptr_t status) {
  SingleFwd a;
  a.z = make_view(z, "logits");
  a.tokens = addr<const int64_t>(tokens);
  a.T = T;
  a.op = static_cast<SingleOp>(op);
  a.out0 = addr<void>(out0);
  a.out1 = addr<void>(out1);
  a.stats = addr<double>(stats);
  a.status = addr<int>(status);
  if ((a.op == SingleOp::logprob || a.op == SingleOp::logprob_entropy) && !a.tokens)
    throw std::invalid_argument("tokens required");
  return a;
}

inline PairFwd pair_fwd_args(const Desc& z, const Desc& w, double T, int op, uintptr_t out, uintptr_t stats,
                             uintptr_t status) {
  PairFwd a;
  a.z = make_view(z, "p_logits");
  a.w = make_view(w, "q_logits");
  check_same(a.z, a.w, "p_logits", "q_logits");
  a.T = T;
  a.op = static_cast<PairOp>(op);
  a.out = addr<void>(out);
  a.stats = addr<double>(stats);
  a.status = addr<int>(status);
  return a;
}

inline SingleBwd single_bwd_args(const Desc& z, uintptr_t tokens, double T, int op, uintptr_t stats,
                                 uintptr_t g0, uintptr_t g1, uintptr_t dz) {
  SingleBwd a;
  a.z = make_view(z, "logits");
  a.tokens = addr<const int64_t>(tokens);
  a.T = T;
  a.op = static_cast<SingleOp>(op);
  a.stats = addr<const double>(stats);
  a.g0 = addr<const double>(g0);
  a.g1 = addr<const double>(g1);
  a.dz = addr<void>(dz);
  return a;
}

inline PairBwd pair_bwd_args(const Desc& z, const Desc& w, double T, int op, uintptr_t stats, uintptr_t g,
                             uintptr_t dz, uintptr_t dw) {
  PairBwd a;
  a.z = make_view(z, "p_logits");
  a.w = make_view(w, "q_logits");
  check_same(a.z, a.w, "p_logits", "q_logits");
  a.T = T;
  a.op = static_cast<PairOp>(op);
  a.stats = addr<const double>(stats);
  a.g = addr<const double>(g);
  a.dz = addr<void>(dz);
  a.dw = addr<void>(dw);
  return a;
}

}  // namespace trmath
