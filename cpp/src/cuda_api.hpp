// trmath: host entry points of the CUDA kernels (cpp/src/cuda_exact.cu, cpp/src/cuda_topk.cu,
// cpp/src/cuda_project.cu).
// Views hold device addresses; `stream` is the caller's cudaStream_t (0: the legacy default
// stream). Kernels are queued on that stream and nothing waits for them.
#pragma once

#include <cstdint>
#include <string>

#include "project_args.hpp"
#include "view.hpp"

namespace trmath {
namespace cuda {

void single_forward(const SingleFwd& a, uintptr_t stream);
void single_backward(const SingleBwd& a, uintptr_t stream);
void pair_forward(const PairFwd& a, uintptr_t stream);
void pair_backward(const PairBwd& a, uintptr_t stream);
// The KL-ball projection (cuda_project.cu): the exact-KL kernels, then one block per row of the
// shared solver (trmath/project_solve.hpp); a.status holds the rows' status on return.
void project_kl_forward(const ProjFwd& a, uintptr_t stream);
void project_kl_backward(const ProjBwd& a, uintptr_t stream);
// Largest k that topk_rows takes (the size of its shared-memory sort).
constexpr int kTopkMaxK = 2048;
// ids [rows, k] (contiguous int64): the k largest logits of each row of z, by value (descending)
// then index (ascending), as the CPU kernel (bind_coarse.cpp) gives them. Needs 1 <= k <= V,
// k <= kTopkMaxK and V < 2^31; throws std::invalid_argument otherwise.
void topk_rows(const View& z, int64_t k, int64_t* ids, uintptr_t stream);
// Name and compute capability of the current device ("" without a usable device).
std::string device_name();

}  // namespace cuda
}  // namespace trmath
