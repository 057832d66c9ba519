// trmath: a cache of large CPU output buffers (gradients [N, V], projected rows [N, V]).
//
// A fresh allocation of 100+ MB is mapped by the kernel page by page on first touch, and each page
// is zeroed before the kernel writes it: for a KL backward that costs about as much as computing
// both gradients. Buffers handed out here come back when the tensor that owns them is freed and
// are reused by the next request of a similar size, already mapped. The tensor is created from a
// DLPack capsule (torch.from_dlpack), whose deleter returns the buffer; no torch symbol is
// linked. The cache holds at most `limit` bytes of free buffers (TRMATH_BUFFER_CACHE_MB, or
// set_buffer_cache(); 0 disables it) and can be emptied at any time.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "desc.hpp"

namespace py = pybind11;

namespace trmath {
namespace {

// ---- DLPack (v0.8 ABI, the unversioned "dltensor" capsule) ------------------------------------
struct DLDevice { int32_t device_type, device_id; };
struct DLDataType { uint8_t code, bits; uint16_t lanes; };
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};
constexpr int32_t kDLCPU = 1;
constexpr uint8_t kDLFloat = 2, kDLBfloat = 4;

constexpr size_t kAlign = size_t(1) << 21;  // 2 MiB: huge-page aligned start
constexpr size_t kPage = 4096;              // capacities are whole small pages

struct Free {
  void* p;
  size_t cap;
};

struct Pool {
  std::mutex mu;
  std::vector<Free> free;  // most recently returned last
  size_t cached = 0;       // bytes in `free`
  size_t limit;
  uint64_t hits = 0, misses = 0;
  Pool() {
    const char* env = std::getenv("TRMATH_BUFFER_CACHE_MB");
    limit = size_t(1) << 30;  // 1 GiB
    if (env && *env) {
      char* end = nullptr;
      const double mb = std::strtod(env, &end);
      if (end != env && mb >= 0) limit = size_t(mb * 1048576.0);
    }
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: deleters may run during interpreter exit
  return *p;
}

// Huge pages are advised for the whole 2 MiB pages of the buffer only: a partly used last huge
// page would be made resident in full by its first touch, up to 2 MiB the caller never asked for.
void* fresh(size_t cap) {
  void* p = nullptr;
  if (posix_memalign(&p, kAlign, cap) != 0 || !p) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const size_t whole = cap / kAlign * kAlign;
  if (whole) madvise(p, whole, MADV_HUGEPAGE);  // before first touch; harmless where THP is off
#endif
  return p;
}

// A buffer of at least `nbytes`: the smallest free one no larger than twice the request, or a
// fresh one (capacity rounded up to a whole small page).
void* acquire(size_t nbytes, size_t& cap) {
  Pool& P = pool();
  {
    std::lock_guard<std::mutex> lock(P.mu);
    int best = -1;
    for (int i = 0; i < int(P.free.size()); ++i) {
      const size_t c = P.free[i].cap;
      if (c >= nbytes && c <= 2 * nbytes && (best < 0 || c < P.free[best].cap)) best = i;
    }
    if (best >= 0) {
      void* p = P.free[best].p;
      cap = P.free[best].cap;
      P.free.erase(P.free.begin() + best);
      P.cached -= cap;
      ++P.hits;
      return p;
    }
    ++P.misses;
  }
  cap = (nbytes + kPage - 1) / kPage * kPage;
  return fresh(cap);
}

// Drop the oldest free buffers until the cache is within its limit (called with the lock held;
// the caller frees `drop` after unlocking).
void trim_locked(Pool& P, std::vector<void*>& drop) {
  size_t k = 0;
  while (P.cached > P.limit && k < P.free.size()) {
    drop.push_back(P.free[k].p);
    P.cached -= P.free[k].cap;
    ++k;
  }
  P.free.erase(P.free.begin(), P.free.begin() + k);
}

void release(void* p, size_t cap) {
  Pool& P = pool();
  std::vector<void*> drop;
  {
    std::lock_guard<std::mutex> lock(P.mu);
    if (cap <= P.limit) {
      P.free.push_back({p, cap});
      P.cached += cap;
      p = nullptr;
      trim_locked(P, drop);
    }
  }
  if (p) std::free(p);
  for (void* q : drop) std::free(q);
}

struct Managed {
  DLManagedTensor m;
  std::vector<int64_t> shape, strides;
  size_t cap;
};

void managed_deleter(DLManagedTensor* self) {
  Managed* h = static_cast<Managed*>(self->manager_ctx);
  release(self->dl_tensor.data, h->cap);
  delete h;
}

void capsule_destructor(PyObject* cap) {
  // A capsule torch consumed is renamed "used_dltensor"; the tensor then owns the buffer.
  if (PyCapsule_IsValid(cap, "used_dltensor")) return;
  auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  if (m) m->deleter(m);
  else PyErr_Clear();
}

DLDataType dl_dtype(int code) {
  switch (static_cast<DType>(code)) {
    case DType::f16: return {kDLFloat, 16, 1};
    case DType::bf16: return {kDLBfloat, 16, 1};
    case DType::f32: return {kDLFloat, 32, 1};
    case DType::f64: return {kDLFloat, 64, 1};
  }
  throw std::invalid_argument("pooled_empty: unsupported dtype code " + std::to_string(code));
}

}  // namespace

void register_bufpool(py::module_& m) {
  // An uninitialised contiguous CPU array of `shape` and dtype `code` as a DLPack capsule for
  // torch.from_dlpack, its memory taken from (and returned on free to) the buffer cache.
  m.def("pooled_empty", [](const std::vector<int64_t>& shape, int code) {
    const DLDataType dt = dl_dtype(code);
    size_t n = 1;
    for (int64_t s : shape) {
      if (s < 0) throw std::invalid_argument("pooled_empty: negative size");
      n *= size_t(s);
    }
    const size_t nbytes = std::max<size_t>(n * (dt.bits / 8), 1);
    auto* h = new Managed();
    h->shape = shape;
    h->strides.assign(shape.size(), 1);
    for (int i = int(shape.size()) - 2; i >= 0; --i) h->strides[i] = h->strides[i + 1] * std::max<int64_t>(shape[i + 1], 1);
    try {
      h->m.dl_tensor.data = acquire(nbytes, h->cap);
    } catch (...) {
      delete h;
      throw;
    }
    h->m.dl_tensor.device = {kDLCPU, 0};
    h->m.dl_tensor.ndim = int32_t(shape.size());
    h->m.dl_tensor.dtype = dt;
    h->m.dl_tensor.shape = h->shape.data();
    h->m.dl_tensor.strides = h->strides.data();
    h->m.dl_tensor.byte_offset = 0;
    h->m.manager_ctx = h;
    h->m.deleter = managed_deleter;
    PyObject* cap = PyCapsule_New(&h->m, "dltensor", capsule_destructor);
    if (!cap) {
      managed_deleter(&h->m);
      throw py::error_already_set();
    }
    return py::reinterpret_steal<py::object>(cap);
  });
  m.def("buffer_cache_limit", [] { return pool().limit; });
  m.def("set_buffer_cache_limit", [](size_t bytes) {
    Pool& P = pool();
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(P.mu);
      P.limit = bytes;
      trim_locked(P, drop);
    }
    for (void* q : drop) std::free(q);
  });
  // (cached bytes, cached buffers, hits, misses)
  m.def("buffer_cache_info", [] {
    Pool& P = pool();
    std::lock_guard<std::mutex> lock(P.mu);
    return py::make_tuple(P.cached, P.free.size(), P.hits, P.misses);
  });
  m.def("empty_buffer_cache", [] {
    Pool& P = pool();
    std::vector<Free> drop;
    {
      std::lock_guard<std::mutex> lock(P.mu);
      drop.swap(P.free);
      P.cached = 0;
    }
    for (const Free& f : drop) std::free(f.p);
  });
}

}  // namespace trmath
