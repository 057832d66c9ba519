// trmath: arguments of the KL-projection kernels (project_kernels.cpp), shared with the bindings.
#pragma once

#include <cmath>
#include <stdexcept>

#include "desc.hpp"
#include "trmath/project_solve.hpp"
#include "view.hpp"

namespace trmath {

// Per-row statistics and the infeasible status bit (see trmath/project_solve.hpp).
constexpr int kProjStats = projsolve::kStats;
constexpr int kProjInfeasible = projsolve::kInfeasible;

struct ProjFwd {
  View z, w;
  double eps = 0, T = 1;
  void* out = nullptr;      // contiguous [rows, V]: float (16/32-bit inputs) or double
  double* stats = nullptr;  // [rows, kProjStats]
  int* status = nullptr;    // [rows], the exact-KL kernel's error bits on entry
  bool out_float = false;   // float output for float64 inputs too (the sparse projection's
                            // float64 rows with tails, from 16/32-bit log-probabilities)
};

struct ProjBwd {
  View z, w;
  double T = 1;
  const double* stats = nullptr;  // [rows, kProjStats] from the forward
  const double* g = nullptr;      // contiguous [rows, V] float64
  void* dz = nullptr;             // contiguous [rows, V] in the input dtype, or null
  void* dw = nullptr;
};

// The TV projection's log-mixture (project_tv; trmath/project.hpp): per-row constants
// prm[rows, 5] = (ca, cb, lse_p, lse_q, lam); the forward writes out, the backward dz and dw
// (the mixture's part of the gradient) and dlam (dL/dlam through the mixture, rows outside the
// ball).
constexpr int kTvMixPrm = 5;
struct TvMix {
  View z, w;
  double T = 1;
  const double* prm = nullptr;  // [rows, kTvMixPrm]
  void* out = nullptr;          // forward: contiguous [rows, V], float (16/32-bit inputs) or double
  const double* g = nullptr;    // backward: contiguous [rows, V] float64
  void* dz = nullptr;           // backward: contiguous [rows, V] in the input dtype, or null
  void* dw = nullptr;
  double* dlam = nullptr;       // backward: [rows]
};

// Checked arguments from the bindings' Python arguments (CPU and CUDA bindings alike).
inline ProjFwd proj_fwd_args(const Desc& z, const Desc& w, double eps, double T, uintptr_t out, uintptr_t stats,
                             uintptr_t status) {
  ProjFwd a;
  a.z = make_view(z, "new_logits");
  a.w = make_view(w, "old_logits");
  check_same(a.z, a.w, "new_logits", "old_logits");
  if (!(eps > 0) || !std::isfinite(eps)) throw std::invalid_argument("epsilon must be finite and > 0");
  if (!(T > 0) || !std::isfinite(T)) throw std::invalid_argument("temperature must be finite and > 0");
  a.eps = eps;
  a.T = T;
  a.out = reinterpret_cast<void*>(out);
  a.stats = reinterpret_cast<double*>(stats);
  a.status = reinterpret_cast<int*>(status);
  return a;
}

inline ProjBwd proj_bwd_args(const Desc& z, const Desc& w, double T, uintptr_t stats, uintptr_t g, uintptr_t dz,
                             uintptr_t dw) {
  ProjBwd a;
  a.z = make_view(z, "new_logits");
  a.w = make_view(w, "old_logits");
  check_same(a.z, a.w, "new_logits", "old_logits");
  a.T = T;
  a.stats = reinterpret_cast<const double*>(stats);
  a.g = reinterpret_cast<const double*>(g);
  a.dz = reinterpret_cast<void*>(dz);
  a.dw = reinterpret_cast<void*>(dw);
  return a;
}

inline TvMix tv_mix_args(const Desc& z, const Desc& w, double T, uintptr_t prm) {
  TvMix a;
  a.z = make_view(z, "new_logits");
  a.w = make_view(w, "old_logits");
  check_same(a.z, a.w, "new_logits", "old_logits");
  if (!(T > 0) || !std::isfinite(T)) throw std::invalid_argument("temperature must be finite and > 0");
  a.T = T;
  a.prm = reinterpret_cast<const double*>(prm);
  return a;
}

}  // namespace trmath
