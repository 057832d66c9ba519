// trmath: bindings of the coarse-grained (Binary / Top-K) family.
//
// The coarse divergences themselves need no kernel: their inputs are [..., K] log-probability
// vectors (K small), evaluated in float64 by trmath/_coarse_impl.py. The full-row work of the
// Top-K builders is (a) the top-k search of each row, here, and (b) the log-partition of each
// row, the exact family's fused kernel. Neither builds an [N, V] temporary.
//
// topk_rows: per row, the k largest logits in one streaming pass. A min-heap of k (value, index)
// pairs holds the best so far; a block of 64 elements is skipped after one vectorisable max when
// its largest value does not beat the heap's smallest, so the cost is one read of the row plus
// O(k log k) per insertion (insertions are rare after the first blocks on any row whose order is
// not adversarial). Ties are broken by the lower index, so the result is a deterministic function
// of the row, whatever the thread count. Output ids are sorted by value (descending), then index.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <limits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "trmath/vec.hpp"
#include "desc.hpp"
#include "view.hpp"

namespace py = pybind11;

namespace trmath {
namespace {

using simd::bf16_t;
using simd::f16_t;
using simd::bf16_to_float;
using simd::f16_to_float;

template <class In> inline double to_double(In x);
template <> inline double to_double<float>(float x) { return x; }
template <> inline double to_double<double>(double x) { return x; }
template <> inline double to_double<bf16_t>(bf16_t x) { return bf16_to_float(x.bits); }
template <> inline double to_double<f16_t>(f16_t x) { return f16_to_float(x.bits); }

struct Entry {
  double v;
  int64_t i;
};
// "a is worse than b": lower value, or the same value at a higher index.
inline bool worse(const Entry& a, const Entry& b) { return a.v < b.v || (a.v == b.v && a.i > b.i); }

// Min-heap (the worst entry at the root) over h[0..k).
inline void sift_down(Entry* h, int64_t k, int64_t j) {
  for (;;) {
    int64_t c = 2 * j + 1;
    if (c >= k) return;
    if (c + 1 < k && worse(h[c + 1], h[c])) ++c;
    if (!worse(h[c], h[j])) return;
    std::swap(h[c], h[j]);
    j = c;
  }
}

constexpr int64_t kBlock = 64;

template <class In>
void topk_row(const In* x, int64_t stride, int64_t V, int64_t k, Entry* h, int64_t* ids_out) {
  // Fill with the first k elements (NaN compares false everywhere: it is treated as -inf here;
  // rows with NaN are rejected, or give NaN log-probs, in the caller's validation).
  for (int64_t i = 0; i < k; ++i) {
    double v = to_double(x[i * stride]);
    h[i] = Entry{v == v ? v : -__builtin_inf(), i};
  }
  for (int64_t j = k / 2 - 1; j >= 0; --j) sift_down(h, k, j);
  int64_t i = k;
  auto consider = [&](int64_t n) {
    const double v = to_double(x[n * stride]);
    if (v > h[0].v) {  // strictly: an equal value at a higher index is worse
      h[0] = Entry{v, n};
      sift_down(h, k, 0);
    }
  };
  if (stride == 1) {
    // Blocks whose maximum does not beat the heap's worst value are skipped after one pass
    // over them (a max that the compiler vectorises for float and double inputs).
    for (; i + kBlock <= V; i += kBlock) {
      double m = -__builtin_inf();
      if constexpr (std::is_same<In, float>::value || std::is_same<In, double>::value) {
        // Started at -inf, so a NaN anywhere in the block is passed over like -inf (as in
        // consider()), never carried as the block's maximum.
        In mm = -std::numeric_limits<In>::infinity();
        for (int64_t n = 0; n < kBlock; ++n) mm = x[i + n] > mm ? x[i + n] : mm;
        m = double(mm);
      } else {
        float mm = -std::numeric_limits<float>::infinity();
        for (int64_t n = 0; n < kBlock; ++n) {
          const float v = float(to_double(x[i + n]));
          mm = v > mm ? v : mm;
        }
        m = mm;
      }
      if (!(m > h[0].v)) continue;
      for (int64_t n = i; n < i + kBlock; ++n) consider(n);
    }
  }
  for (; i < V; ++i) consider(i);
  std::sort(h, h + k, [](const Entry& a, const Entry& b) { return worse(b, a); });
  for (int64_t j = 0; j < k; ++j) ids_out[j] = h[j].i;
}

template <class In>
void topk_all(const View& z, int64_t k, int64_t* ids) {
  const int64_t rows = z.rows(), V = z.V(), s = z.vstride();
  parallel_for(rows, [&](int64_t r) {
    std::vector<Entry> heap(static_cast<size_t>(k));
    const In* x = reinterpret_cast<const In*>(z.data) + z.row_offset(r);
    topk_row<In>(x, s, V, k, heap.data(), ids + r * k);
  });
}

}  // namespace

void register_coarse(py::module_& m) {
  m.def(
      "topk_rows",
      [](const Desc& zd, int64_t k, uintptr_t ids) {
        const View z = make_view(zd, "p_logits");
        if (k < 1 || k > z.V()) throw std::invalid_argument("k: must be in [1, V]");
        if (z.rows() == 0) return;
        int64_t* out = reinterpret_cast<int64_t*>(ids);
        py::gil_scoped_release release;
        switch (z.dtype) {
          case DType::f32: topk_all<float>(z, k, out); break;
          case DType::f64: topk_all<double>(z, k, out); break;
          case DType::bf16: topk_all<bf16_t>(z, k, out); break;
          case DType::f16: topk_all<f16_t>(z, k, out); break;
        }
      },
      "Indices [rows, k] of the k largest logits of each row (value descending, then index).");
}

}  // namespace trmath
