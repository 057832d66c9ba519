// trmath: typed-view descriptors as the bindings receive them from Python --
// (address, dtype code, shape, strides in elements) -- and their checked conversion to a View.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "view.hpp"

namespace trmath {

using Desc = std::tuple<uintptr_t, int, std::vector<int64_t>, std::vector<int64_t>>;

// A View of the descriptor `d`; `name` (the Python argument) prefixes every error.
inline View make_view(const Desc& d, const char* name) {
  View v;
  v.data = reinterpret_cast<const char*>(std::get<0>(d));
  const int code = std::get<1>(d);
  if (code < 0 || code > 3) throw std::invalid_argument(std::string(name) + ": unsupported dtype code");
  v.dtype = static_cast<DType>(code);
  const auto& shape = std::get<2>(d);
  const auto& strides = std::get<3>(d);
  if (shape.empty() || shape.size() > size_t(kMaxDim) || shape.size() != strides.size())
    throw std::invalid_argument(std::string(name) + ": rank must be 1.." + std::to_string(kMaxDim));
  v.ndim = int(shape.size());
  for (int i = 0; i < v.ndim; ++i) {
    if (shape[i] < 0) throw std::invalid_argument(std::string(name) + ": negative extent");
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  if (v.V() < 1) throw std::invalid_argument(std::string(name) + ": empty vocabulary axis");
  return v;
}

// Two views that must describe arrays of one shape and dtype (the two policies of a pair).
inline void check_same(const View& a, const View& b, const char* aname, const char* bname) {
  const std::string both = std::string(aname) + " and " + bname;
  if (a.ndim != b.ndim || a.dtype != b.dtype) throw std::invalid_argument(both + " must have the same rank and dtype");
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i]) throw std::invalid_argument(both + " differ in shape");
}

}  // namespace trmath
