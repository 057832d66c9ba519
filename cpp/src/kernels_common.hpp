// trmath: what the two halves of the CPU drivers of the exact reductions share (kernels_fwd.cpp,
// the forward passes; kernels_bwd.cpp, the backward passes and the table). Both files are
// compiled once per instruction set (TRMATH_ISA = generic, avx2, ...) and the matching table is
// chosen at run time. Two translation units, not one: the builds compile them in parallel (the
// instrumented build of a single file was the longest compile of the CI by far). Everything
// below is in an unnamed namespace, so each file has its own copy.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef TRMATH_ISA
#error "TRMATH_ISA must be defined"
#endif
#define TRMATH_CAT2(a, b) a##b
#define TRMATH_CAT(a, b) TRMATH_CAT2(a, b)
// Every header entity that touches vector types lives in namespace trmath::simd; renaming it
// per instruction set keeps the copies compiled with different flags (and vector calling
// conventions) from being merged by the linker.
#define simd TRMATH_CAT(simd_, TRMATH_ISA)

#include "trmath/ddouble.hpp"
#include "trmath/exact.hpp"
#include "trmath/rowfinish.hpp"
#include "view.hpp"

#define TRMATH_NS TRMATH_CAT(isa_, TRMATH_ISA)
#define TRMATH_STR2(a) #a
#define TRMATH_STR(a) TRMATH_STR2(a)

namespace trmath {
namespace TRMATH_NS {
namespace {

using namespace simd;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- segment access -----------------------------------------------------------------------
template <class In>
struct RowReader {
  const View& v;
  int64_t V, nseg;
  explicit RowReader(const View& view) : v(view), V(view.V()), nseg((view.V() + kSegment - 1) / kSegment) {}
  int64_t seg_len(int64_t s) const { return std::min(kSegment, V - s * kSegment); }
  // Pointer to segment s of row r, contiguous; gathers strided rows into `buf`.
  const In* seg(int64_t r, int64_t s, std::vector<In>& buf) const {
    const In* base = reinterpret_cast<const In*>(v.data) + v.row_offset(r);
    int64_t vs = v.vstride();
    int64_t n = seg_len(s);
    if (vs == 1) return base + s * kSegment;
    if (int64_t(buf.size()) < n) buf.resize(n);
    const In* p = base + s * kSegment * vs;
    for (int64_t i = 0; i < n; ++i) buf[i] = p[i * vs];
    return buf.data();
  }
  // Segment s of row r if it can be prefetched in place (contiguous rows), else null.
  const In* prefetch(int64_t r, int64_t s) const {
    if (r < 0 || v.vstride() != 1) return nullptr;
    return reinterpret_cast<const In*>(v.data) + v.row_offset(r) + s * kSegment;
  }
  // What a thread reads after segment s of row r: the row's next segment, or the first segment
  // of its next row (next_row, -1 if none). Requested while segment s is summed from cache, it
  // arrives in L2 just before the next maxima pass reads it (a segment pair is 2 x 64 KiB in
  // float32, so both fit; a whole row ahead did not, and was read back from L3).
  const In* prefetch_after(int64_t r, int64_t s, int64_t next_row) const {
    return s + 1 < nseg ? prefetch(r, s + 1) : prefetch(next_row, 0);
  }
  double element(int64_t r, int64_t i) const {
    const In* base = reinterpret_cast<const In*>(v.data) + v.row_offset(r);
    return to_double(base[i * v.vstride()]);
  }
};

template <class In>
std::vector<In>& scratch(int which) {
  thread_local std::vector<In> bufs[2];
  return bufs[which];
}

// Lanes used for a dtype: float lanes for 16/32-bit inputs (16 of them where the build has
// AVX-512, else 8), double lanes for float64.
#if defined(TRMATH_HAVE_LANES16)
template <class In> struct LanesFor { using type = FloatLanes16<In>; };
#else
template <class In> struct LanesFor { using type = FloatLanes<In>; };
#endif
template <> struct LanesFor<double> { using type = DoubleLanes<double>; };

// ---- executor -------------------------------------------------------------------------------
// An algorithm exposes: nseg, bool next(row) (prepare the row's next pass, false when done),
// void run(row, seg, Partial&, next_row) (next_row: the row this thread takes next, or -1, for
// prefetching), void consume(row, const Partial*). Rows are independent and
// every pass combines its segment partials in order, so the result of a row is the same
// whichever thread computes which segment.
template <class Algo>
void execute(Algo& algo, int64_t N) {
  const int64_t nseg = algo.nseg;
  const int nt = num_threads();
  if (nseg == 1 || N >= 4 * int64_t(nt)) {
    // Rows in contiguous chunks, so a thread knows its next row and can prefetch it; 32 chunks
    // per thread, so the threads finish within ~3 % of each other (8 per thread left one
    // thread a chunk, 6 % of the work at N = 263, behind the other).
    const int64_t chunk = std::max<int64_t>(1, N / (32 * int64_t(nt)));
    const int64_t nchunks = (N + chunk - 1) / chunk;
    parallel_for(nchunks, [&](int64_t c) {
      thread_local std::vector<Partial> parts;
      if (int64_t(parts.size()) < nseg) parts.resize(nseg);
      const int64_t r1 = std::min(N, (c + 1) * chunk);
      for (int64_t r = c * chunk; r < r1; ++r) {
        const int64_t next = r + 1 < r1 ? r + 1 : -1;
        typename Algo::St st;
        while (algo.next(r, st)) {
          for (int64_t s = 0; s < nseg; ++s) {
            partial_zero(parts[s]);
            algo.run(r, s, parts[s], next, st);
          }
          algo.consume(r, st, parts.data());
        }
      }
    });
    return;
  }
  std::vector<Partial> parts(N * nseg);
  std::vector<typename Algo::St> sts(N);
  std::vector<int64_t> active;
  for (;;) {
    active.clear();
    for (int64_t r = 0; r < N; ++r)
      if (algo.next(r, sts[r])) active.push_back(r);
    if (active.empty()) break;
    int64_t na = int64_t(active.size());
    parallel_for(na * nseg, [&](int64_t u) {
      int64_t r = active[u / nseg], s = u % nseg;
      partial_zero(parts[r * nseg + s]);
      algo.run(r, s, parts[r * nseg + s], -1, sts[r]);
    });
    for (int64_t r : active) algo.consume(r, sts[r], &parts[r * nseg]);
  }
}

// The segment kernels of the sum passes are functions of their own, not inlined into the
// drivers: each variant then gets its own register allocation instead of sharing one with every
// other variant inlined beside it in the same driver function.
template <class L, PairTerms kTerms, bool kMasked>
__attribute__((noinline)) void sum2(const typename L::Storage* z, const typename L::Storage* w,
                                    int64_t n, const PairParams& P, Partial& out,
                                    const typename L::Storage* pf, const typename L::Storage* pg) {
  // T = 1 (the common case) skips the exact-but-serial scaling of every logit difference.
  if (P.invT == 1.0) seg_sum2<L, kTerms, kMasked, true>(z, w, n, P, out, pf, pg);
  else seg_sum2<L, kTerms, kMasked, false>(z, w, n, P, out, pf, pg);
}

template <class L, bool kEntropy>
__attribute__((noinline)) void online1(const typename L::Storage* z, int64_t n, double invT,
                                       double& mx, Partial& out, int& flags,
                                       const typename L::Storage* pf) {
  seg_online1<L, kEntropy>(z, n, invT, mx, out, flags, kNanA, kPosInfA, pf);
}

template <class T>
void put(void* out, int64_t i, double v) {
  static_cast<T*>(out)[i] = T(v);
}

}  // namespace
}  // namespace TRMATH_NS
}  // namespace trmath
