// trmath: arguments of the KL-projection kernels (project_kernels.cpp), shared with the bindings.
#pragma once

#include "view.hpp"

namespace trmath {

// Per-row statistics of the projection, saved for the backward:
// [eta, t, lse_p, lse_q, Lambda, mu, Var, KL(pi_new || pi_old)].
constexpr int kProjStats = 8;
// Status bit (beside the RowStatus bits): no distribution of the ball is at finite KL from pi_new.
constexpr int kProjInfeasible = 256;

struct ProjFwd {
  View z, w;
  double eps = 0, T = 1;
  void* out = nullptr;      // contiguous [rows, V]: float (16/32-bit inputs) or double
  double* stats = nullptr;  // [rows, kProjStats]
  int* status = nullptr;    // [rows], the exact-KL kernel's error bits on entry
};

struct ProjBwd {
  View z, w;
  double T = 1;
  const double* stats = nullptr;  // [rows, kProjStats] from the forward
  const double* g = nullptr;      // contiguous [rows, V] float64
  void* dz = nullptr;             // contiguous [rows, V] in the input dtype, or null
  void* dw = nullptr;
};

}  // namespace trmath
