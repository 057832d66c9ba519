// trmath: compile-time configuration shared by the CPU and CUDA builds.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TRMATH_HD __host__ __device__ __forceinline__
#else
#define TRMATH_HD inline __attribute__((always_inline))
#endif

#define TRMATH_INLINE inline __attribute__((always_inline))
#define TRMATH_LAMBDA_INLINE __attribute__((always_inline))

namespace trmath {

// Element types the kernels read natively.
enum class DType : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3 };

// Per-row status bits, reported by the validated entry points.
enum RowStatus : int {
  kOk = 0,
  kNanA = 1,        // NaN in the first logits argument
  kPosInfA = 2,     // +inf in the first logits argument
  kAllNegInfA = 4,  // every logit of the first argument is -inf
  kNanB = 8,
  kPosInfB = 16,
  kAllNegInfB = 32,
  kTokenRange = 64,  // token id outside [0, V)
  kQZeroP = 128,     // (not an error) some q_i = 0 < p_i: KL(p||q) = +inf
};
constexpr int kErrorBits = 127;

// Segment length: a row is reduced in fixed segments whose partial results are combined in
// order, so a row's result never depends on the batch, its position or the number of threads.
constexpr int64_t kSegment = 16384;

}  // namespace trmath
