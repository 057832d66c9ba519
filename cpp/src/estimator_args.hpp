// trmath: arguments of the sampled KL estimators' element kernel (estimator_kernels.cpp),
// shared with the bindings (bind_estimators.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "view.hpp"

namespace trmath {

// k_{value_kind}(lr) and d k_{slope_kind} / d lr at lr = o - s, element by element over n
// contiguous elements of s and o (one dtype, `dtype`):
//   kind 1: k1 = -lr (slope -1);  2: k2 = lr^2 / 2 (slope lr);  3: k3 = expm1(lr) - lr
//   (slope expm1(lr)).
// Rules applied in the kernel (the Python layer validates before, or asks for these):
//   s = +-inf or o = +inf becomes NaN; a NaN s or o gives a NaN value and a NaN slope;
//   valid (optional, n bytes, 0 or 1): where 0, the value and the slope are 0.
struct KArgs {
  const void* s = nullptr;
  const void* o = nullptr;
  // Importance weighted (b not null, same dtype): the value is w k with w = exp(s - b); b = +-inf
  // becomes NaN, and validation treats b as it treats s (tol_b).
  const void* b = nullptr;
  const uint8_t* valid = nullptr;  // may be null
  DType dtype = DType::f32;
  int64_t n = 0;
  int value_kind = 3, slope_kind = 3;
  void* value = nullptr;    // n outputs: double if value64, else float
  bool value64 = false;
  double* slope = nullptr;  // n outputs, or null
  // Validation (check = true): *bad is set to 1 if some entry (where valid) has s NaN, above
  // tol_s or -inf, or o NaN or above tol_o (the Python layer then finds and names it).
  bool check = false;
  double tol_s = 0, tol_o = 0, tol_b = 0;
  int* bad = nullptr;
};

// The backward of a k_estimate call: gs = -g k'(lr), go = g k'(lr) with the slope k' of
// slope_kind recomputed from s and o (the same lanes and rules as the forward: NaN where the
// forward's value was NaN, 0 where valid is 0), rounded to the inputs' dtype (as float first
// for 16-bit inputs, as torch's conversion from float64 does). Importance weighted (b): of
// w k with w = exp(s - b), go = g w k', gs = g (w k - w k'), gb = -g w k (k of value_kind).
struct KBwdArgs {
  const void* s = nullptr;
  const void* o = nullptr;
  const void* b = nullptr;
  int value_kind = 3;
  void* gb = nullptr;
  const uint8_t* valid = nullptr;  // may be null
  DType dtype = DType::f32;
  int64_t n = 0;
  int slope_kind = 3;
  const void* g = nullptr;  // n values (or one, if g_scalar): double if g64, else float
  bool g64 = false, g_scalar = false;
  void* gs = nullptr;  // n outputs in dtype, or null
  void* go = nullptr;
};

// What the coarse-divergence kernels share: log-probabilities lp, lq of one dtype; kind 0 = TV,
// 1 = KL; an entry is bad where lp is NaN or above tol_p (lq: tol_q), and values in (0, tol]
// count as 0 (their gradient is 0). Forward (g null): the values (double if value64, else float)
// and *bad = 1 if anything was bad. Backward (g not null: double if g64, else float; one value if
// g_scalar): gp, gq (either may be null) = g times the partial derivatives, in the inputs' dtype.
struct CoarseArgs {
  const void* lp = nullptr;
  const void* lq = nullptr;
  DType dtype = DType::f32;
  int kind = 0;
  double tol_p = 0, tol_q = 0;
  void* value = nullptr;
  bool value64 = false;
  int* bad = nullptr;
  const void* g = nullptr;
  bool g64 = false, g_scalar = false;
  void* gp = nullptr;
  void* gq = nullptr;
};

// The binary coarse divergences (trmath/coarse.py), element by element over n contiguous entries:
// binary_tv |p - q|, binary_kl KL(Bern(p) || Bern(q)), p = e^lp, q = e^lq (the formulas in
// estimator_kernels.cpp). Values and gradients are NaN where an entry is bad.
struct BinArgs : CoarseArgs {
  int64_t n = 0;
};

// The Top-K coarse divergences of 16/32-bit log-probabilities (float64 inputs keep the
// double-double refinements of trmath/_coarse_impl.py): rows of K kept tokens, contiguous
// [rows, K]; topk_tv or topk_kl per row (g: one per row). A row is bad when an entry is, or when
// its kept mass exceeds exp(tol (1 + ln K)) (tol of its argument): value NaN; gradients NaN at a bad
// entry, 0 at a clamped one, NaN elsewhere in a bad row.
struct TopkArgs : CoarseArgs {
  int64_t rows = 0, K = 1;
};

// Sums over the valid entries of n contiguous log-probabilities s (rollout) and o (trainer) of
// one dtype, for the rollout-trainer mismatch diagnostics (trmath/objectives.py), with
// lr = o - s (an exact two-sum hi + lo, as k_estimate): out[0] = sum lr, out[1] = sum k3(lr),
// out[2] = M = max lr, out[3] = max |lr|, out[4] = sum e^(lr - M), out[5] = sum e^(2 (lr - M)).
// Sums in double lanes over fixed chunks, combined in chunk order (the result does not depend on
// the thread count). s = +-inf or o = +inf count as NaN (k_estimate's rule); a NaN entry makes
// every output NaN. No valid entry: out[2] = -inf, the others 0.
struct MismatchArgs {
  const void* s = nullptr;
  const void* o = nullptr;
  const uint8_t* valid = nullptr;  // may be null (all valid)
  DType dtype = DType::f32;
  int64_t n = 0;
  double* out = nullptr;  // 6 values
};

}  // namespace trmath
