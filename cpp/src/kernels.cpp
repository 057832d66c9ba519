// trmath: CPU drivers of the exact reductions. This file is compiled once per instruction
// set (TRMATH_ISA = generic, avx2, ...) and the matching table is chosen at run time.
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

// ---- single-row reductions -------------------------------------------------------------------
// Single-row segments up to this length take two passes from L1 (seg_max, then seg_sum1) instead
// of the one-read pass with per-lane maxima (seg_online1), whose fixed cost (moving and merging
// the lane maxima) dominates short rows. Measured crossovers (AVX2, 2 threads, rows streamed
// from memory and L3-resident): float lanes 2-3x faster at V <= 1000, 1.2-1.4x at 2048, even
// at 4096, 0.8x at 8192; double lanes 1.2-1.7x at V <= 257, even at 512, 0.85x at 1000.
template <class In>
constexpr int64_t kShortSegment = std::is_same<In, double>::value ? 512 : 4096;

template <class In>
struct SingleAlgo {
  using L = typename LanesFor<In>::type;
  using OutT = typename std::conditional<std::is_same<In, double>::value, double, float>::type;
  enum Stage : int { kStart, kSum, kSumDouble, kSumDD, kDone };
  struct St {
    int stage = kStart;
    int flags = 0;
    double M = 0, zt = 0, A = 0, B = 0, k = 1, lse_dd = 0;  // A: the sum R below the maxima
    double logA = 0;  // log_sum(), once next() has computed it for the final sums
    bool has_dd = false, has_logA = false;
  };
  const SingleFwd& a;
  RowReader<In> rd;
  int64_t nseg;
  double invT, a_T;
  bool want_h, want_lp, want_lse;

  SingleAlgo(const SingleFwd& args, int64_t N)
      : a(args), rd(args.z), nseg(rd.nseg), invT(1.0 / args.T), a_T(args.T) {
    want_h = a.op == SingleOp::entropy || a.op == SingleOp::logprob_entropy;
    want_lp = a.op == SingleOp::logprob || a.op == SingleOp::logprob_entropy;
    want_lse = a.op == SingleOp::lse;
  }

  // Pass 1 reads each segment once from memory: its maximum, then (from cache) its sums
  // relative to that maximum; segments are merged by exact rescaling in double.
  bool next(int64_t r, St& s) {
    switch (s.stage) {
      case kStart: s.stage = kSum; return true;
      case kSum:
      case kSumDouble: {
        if (s.flags) return finish(r, s);
        if (want_lse) {
          // lse = M/T + log A cancels when lse ~ 0 (log-probabilities passed as logits).
          // Float exponentials leave ~2e-7 absolute error in log A, double ones ~2e-16: when
          // the cancellation would amplify that beyond the error bound, redo the row wider.
          double logA = log_sum(s);
          double lse = s.M * invT + logA;
          double cond = (std::fabs(s.M * invT) + std::fabs(logA)) / std::fabs(lse);
          bool in_double = s.stage == kSumDouble || std::is_same<In, double>::value;
          if (!in_double && cond > 4.0) {
            s.stage = kSumDouble;
            return true;
          }
          if (in_double && cond > 1000.0) {
            s.stage = kSumDD;
            return true;
          }
          s.logA = logA;
          s.has_logA = true;
        }
        return finish(r, s);
      }
      case kSumDD: return finish(r, s);
      default: return false;
    }
  }

  void run(int64_t r, int64_t sg, Partial& p, int64_t next, const St& s) {
    const In* z = rd.seg(r, sg, scratch<In>(0));
    int64_t n = rd.seg_len(sg);
    if (s.stage == kSum) {
      const In* pf = rd.prefetch_after(r, sg, next);
      double Ms;
      Partial q;
      partial_zero(q);
      if (n <= kShortSegment<In>) {
        // A short segment (from L1): its maximum, then its sums about it. The single pass
        // below keeps per-lane maxima and merges the lanes at the end, a fixed cost that
        // dominates a row of a few dozen logits.
        seg_max<L>(z, n, Ms, p.flags, kNanA, kPosInfA);
        p.v[0] = Ms;
        if (p.flags || Ms == -kInf) return;
        if (want_h) seg_sum1<L, true>(z, n, Ms, invT, q);
        else seg_sum1<L, false>(z, n, Ms, invT, q);
      } else {
        if (want_h) online1<L, true>(z, n, invT, Ms, q, p.flags, pf);
        else online1<L, false>(z, n, invT, Ms, q, p.flags, pf);
        p.v[0] = Ms;
        if (p.flags || Ms == -kInf) return;
      }
      p.v[1] = q.v[0];  // R_s
      p.v[2] = q.v[1];  // B_s
      p.v[3] = q.v[2];  // k_s
    } else if (s.stage == kSumDouble) {
      seg_sum1<DoubleLanes<In>, false>(z, n, s.M, invT, p);
    } else {
      // Double-double: sum of exp((z - M)/T) with every term correct to ~1e-30 relative; the
      // maxima (terms exactly 1) counted apart (dd::log_count_plus).
      dd::DD acc{0.0, 0.0};
      double kmax = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        double zi = to_double(z[i]);
        if (zi == -kInf) continue;
        if (zi == s.M) {
          kmax += 1.0;
          continue;
        }
        dd::DD a = dd::two_sum(zi, -s.M);
        if (a_T != 1.0) a = dd::div(a, a_T);
        acc = dd::add(acc, dd::exp(a));
      }
      p.v[0] = acc.hi;
      p.v[1] = acc.lo;
      p.v[2] = kmax;
    }
  }

  void consume(int64_t r, St& s, const Partial* parts) {
    if (s.stage == kSum) {
      double M = -kInf;
      int flags = 0;
      for (int64_t k = 0; k < nseg; ++k) {
        M = std::max(M, parts[k].v[0]);
        flags |= parts[k].flags;
      }
      if (!(flags & (kNanA | kPosInfA)) && M == -kInf) flags |= kAllNegInfA;
      if (want_lp && !flags) {
        int64_t t = a.tokens[r];
        if (t < 0 || t >= rd.V) flags |= kTokenRange;
        else s.zt = rd.element(r, t);
      }
      s.M = M;
      s.flags = flags;
      if (flags) return;
      // Rescale each segment to the row maximum: f_s = exp((M_s - M)/T); a segment whose
      // maximum is below M contributes all of its mass (k_s + R_s) to the rest R.
      double k = 0, R = 0, B = 0;
      for (int64_t j = 0; j < nseg; ++j) {
        const Partial& q = parts[j];
        if (q.v[0] == -kInf) continue;
        if (q.v[0] == M) {
          k += q.v[3];
          R += q.v[1];
          B += q.v[2];
          continue;
        }
        double d = (M - q.v[0]) * invT;
        double f = std::exp(-d);
        double As = q.v[3] + q.v[1];
        R += As * f;
        B += f * (q.v[2] + d * As);
      }
      s.k = k;
      s.A = R;
      s.B = B;
    } else if (s.stage == kSumDouble) {
      double R = 0, k = 0;
      for (int64_t j = 0; j < nseg; ++j) {
        R += parts[j].v[0];
        k += parts[j].v[2];
      }
      s.A = R;
      s.k = k;
    } else {
      dd::DD A{0.0, 0.0};
      double kmax = 0.0;
      for (int64_t k = 0; k < nseg; ++k) {
        A = dd::add(A, dd::DD{parts[k].v[0], parts[k].v[1]});
        kmax += parts[k].v[2];
      }
      dd::DD lse = dd::add(dd::div(dd::DD{s.M, 0.0}, a_T), dd::log_count_plus(kmax, A));
      s.lse_dd = lse.hi + lse.lo;
      s.has_dd = true;
    }
  }

  // log(k + R) = log k + log1p(R / k): exact when the row is nearly deterministic.
  static double log_sum(const St& s) {
    return (s.k == 1.0 ? 0.0 : std::log(s.k)) + std::log1p(s.A / s.k);  // log 1 = +0 exactly
  }

  bool finish(int64_t r, St& s) {
    s.stage = kDone;
    double lse = kNaN, H = kNaN, lp = kNaN, M = kNaN, logA = kNaN;
    if (!s.flags) {
      logA = s.has_logA ? s.logA : log_sum(s);
      M = s.M;
      lse = s.has_dd ? s.lse_dd : s.M * invT + logA;
      H = want_h ? s.B / (s.k + s.A) + logA : 0.0;
      lp = (s.zt - s.M) * invT - logA;
    }
    if (a.status) a.status[r] = s.flags;
    if (a.stats) {
      double* st = a.stats + kSingleStats * r;
      st[0] = lse;
      st[1] = H;
      st[2] = M;
      st[3] = logA;
    }
    switch (a.op) {
      case SingleOp::lse: put<OutT>(a.out0, r, lse); break;
      case SingleOp::entropy: put<OutT>(a.out0, r, H); break;
      case SingleOp::logprob: put<OutT>(a.out0, r, lp); break;
      case SingleOp::logprob_entropy:
        put<OutT>(a.out0, r, lp);
        put<OutT>(a.out1, r, H);
        break;
    }
    return false;
  }
};

// ---- pair reductions ----------------------------------------------------------------------------
// Partial flag of the maxima passes (never an error, never in a row's status): a segment holds a
// -inf or huge logit, so the row's passes keep their masks (seg_sum2's kMasked).
constexpr int kLowSeen = 1 << 12;
// Segments this long (float lanes) centre the first pass at their mean log-ratio (run()); a
// shorter one keeps Mz_s - Mw_s, which lets a one-segment row merge without exponentials.
constexpr int64_t kMeanCentreMin = 2048;

template <class In>
struct PairAlgo {
  using L = typename LanesFor<In>::type;
  using OutT = typename std::conditional<std::is_same<In, double>::value, double, float>::type;
  static constexpr bool kDouble = std::is_same<In, double>::value;
  // The sum kernels take a PairTerms, never an int: a stage once named kCentre shadowed
  // PairTerms::kCentre, and the centring passes computed JS terms (its value 3 = kJS).
  // kRSum: a KL row with some q_i = 0 < p_i (KL = +inf) whose statistics a backward will read:
  // one pass of the centring sums at the row's centre, so that lse_p counts the mass where q = 0
  // (the KL passes leave it out: their value is +inf whatever it is).
  enum Stage : int { kStart, kFused, kMax, kRecentre, kFull, kRSum, kDone };
  struct St {
    int stage = kStart;
    int flags = 0;
    int iter = 0;
    bool fallback = false;  // the fused first pass could not be combined: use global maxima
    bool masked = true;     // some logit is -inf or huge: the passes keep their guards
    double mag = 0;         // sum of |terms| of the combined Phi (cancellation check)
    double Mz = 0, Mw = 0, m = 0, mlo = 0;  // centre m + mlo (logit units)
    double mlo_pass = 0;                     // mlo of the last full pass (TV's backward)
    double s[12] = {};
  };
  const PairFwd& a;
  RowReader<In> rz, rw;
  int64_t nseg;
  double invT;

  PairAlgo(const PairFwd& args, int64_t N)
      : a(args), rz(args.z), rw(args.w), nseg(rz.nseg), invT(1.0 / args.T) {}

  bool next(int64_t r, St& s) {
    switch (s.stage) {
      case kStart: s.stage = kFused; return true;
      case kFused:
        if (s.flags & kErrorBits) return finish(r, s);
        s.m = s.Mz - s.Mw;  // centre in logit units
        if (s.fallback) {
          s.stage = a.op == PairOp::kl ? kFull : kRecentre;
          return true;
        }
        if (a.op == PairOp::kl) {
          // Accept the fused pass if the merge of the segments amplified the float error of
          // its terms (~1.2e-7 relative) at most 32 times (~4e-6, inside the 1e-5 bound; it
          // grows as 3 (delta/sigma)^2 with the segment centres' spread delta) and Phi/E - psi
          // loses so few more bits that the product stays within the same bound (pair_accept).
          const double kMerge = 32.0;
          if (s.mag <= kMerge * s.s[2] && accept(s, s.s[2] > 0 ? s.mag / s.s[2] : 1.0)) return finish(r, s);
          if (s.mag > kMerge * s.s[2]) s.mlo = a.T * std::log1p(s.s[1] / s.s[0]);
          s.stage = kFull;
          s.mlo_pass = s.mlo;
          return true;
        }
        s.stage = kRecentre;
        return next(r, s);
      case kMax:
        if (s.flags & kErrorBits) return finish(r, s);
        s.m = s.Mz - s.Mw;  // centre in logit units
        s.stage = a.op == PairOp::kl ? kFull : kRecentre;
        return true;
      case kRecentre: {
        double Zt = (s.s[1] + s.s[7]) / s.s[0];
        s.mlo += a.T * std::log1p(Zt);
        s.stage = kFull;
        s.mlo_pass = s.mlo;
        return true;
      }
      case kFull: {
        if (accept(s) || s.iter >= 3) return finish(r, s);
        ++s.iter;
        s.mlo_pass = s.mlo;
        return true;
      }
      case kRSum: return finish(r, s);
      default: return false;
    }
  }

  // Is the last full pass accurate enough at its centre? Otherwise re-centre (s.mlo updated).
  bool accept(St& s, double amp = 1.0) { return pair_accept(int(a.op), kDouble, a.T, s.s, s.flags, s.mlo, amp); }

  void run(int64_t r, int64_t sg, Partial& p, int64_t next, const St& s) {
    const In* z = rz.seg(r, sg, scratch<In>(0));
    const In* w = rw.seg(r, sg, scratch<In>(1));
    int64_t n = rz.seg_len(sg);
    const In* pf = rz.prefetch_after(r, sg, next);
    const In* pg = rw.prefetch_after(r, sg, next);
    if (s.stage == kFused) {
      // Pass 1 reads each segment once: its maxima, then (from cache) its sums about its own
      // centre, Mz_s - Mw_s or (below) the mean of z - w; consume() merges the segments exactly.
      double Mzs, Mws, mean = 0.0;
      if (!kDouble && n >= kMeanCentreMin) {
        seg_max2<L>(z, w, n, Mzs, Mws, mean, p.flags, kNanA, kPosInfA, kNanB, kPosInfB, kLowSeen);
      } else {
        seg_max<L>(z, n, Mzs, p.flags, kNanA, kPosInfA, kLowSeen);
        seg_max<L>(w, n, Mws, p.flags, kNanB, kPosInfB, kLowSeen);
      }
      p.v[5] = Mzs;
      p.v[6] = Mws;
      if ((p.flags & kErrorBits) || Mzs == -kInf || Mws == -kInf) return;
      PairParams P{Mzs, Mws, invT, Mzs - Mws, 0.0, 1.0};
      const bool masked = (p.flags & kLowSeen) != 0;
      if (!kDouble && !masked && n >= kMeanCentreMin) {
        // Centre a long segment of finite logits at the mean of z - w (a float, so the centre
        // is exact and its residual 0) rather than at Mz_s - Mw_s, the difference of what are
        // often two tokens' logits: on rows that differ by noise of 0.3 that difference is off
        // by ~0.3, and one vector in seven then holds a |x| >= 1 lane (p's exponential, a
        // mispredicted branch); at the mean, one in sixty. consume_fused() moves the segment's
        // sums to the row's centre exactly whatever the segment's centre (v[9], flag v[10]).
        const double c = double(float(mean));
        const double shift = (c - P.m) * invT;  // e^-shift scales pt: kept within e^+-8
        if (std::fabs(shift) <= 8.0) {
          P.m = c;
          P.g = std::exp(-shift);
          p.v[9] = c;
          p.v[10] = 1.0;
        }
      }
      if (a.op == PairOp::kl) {
        if (masked) sum2<L, kKL, true>(z, w, n, P, p, pf, pg);
        else sum2<L, kKL, false>(z, w, n, P, p, pf, pg);
      } else {
        if (masked) sum2<L, PairTerms::kCentre, true>(z, w, n, P, p, pf, pg);
        else sum2<L, PairTerms::kCentre, false>(z, w, n, P, p, pf, pg);
      }
      return;
    }
    if (s.stage == kMax) {
      seg_max<L>(z, n, p.v[0], p.flags, kNanA, kPosInfA, kLowSeen);
      seg_max<L>(w, n, p.v[1], p.flags, kNanB, kPosInfB, kLowSeen);
      return;
    }
    PairParams P;
    P.Mz = s.Mz;
    P.Mw = s.Mw;
    P.invT = invT;
    P.m = s.m;
    P.mlo = s.mlo;
    P.g = std::exp((((s.Mz - s.Mw) - s.m) - s.mlo) * invT);
    const bool centre = s.stage == kRecentre || s.stage == kRSum;
    if (s.masked) full<true>(z, w, n, P, p, pf, pg, centre);
    else full<false>(z, w, n, P, p, pf, pg, centre);
  }

  template <bool kMasked>
  void full(const In* z, const In* w, int64_t n, const PairParams& P, Partial& p, const In* pf,
            const In* pg, bool centre) {
    if (centre) {
      sum2<L, PairTerms::kCentre, kMasked>(z, w, n, P, p, pf, pg);
      return;
    }
    switch (a.op) {
      case PairOp::kl: sum2<L, kKL, kMasked>(z, w, n, P, p, pf, pg); break;
      // TV's value alone: the side masses only its backward needs are summed there
      // (tv_side_masses), at the centre this pass used.
      case PairOp::tv: sum2<L, kTVv, kMasked>(z, w, n, P, p, pf, pg); break;
      // JS: both halves when the backward will need them (statistics kept), else their sum.
      case PairOp::js:
        if (a.stats) sum2<L, kJS, kMasked>(z, w, n, P, p, pf, pg);
        else sum2<L, kJSv, kMasked>(z, w, n, P, p, pf, pg);
        break;
    }
  }

  // phi(d) = d e^d - e^d + 1 >= 0 in double for |d| < 1: its Taylor series (19 terms,
  // truncation < 1e-17 relative), so it keeps full relative accuracy as d -> 0.
  static double phi(double d) {
    double p = coef::phi_d[coef::phi_d_n - 1];
    for (int k = coef::phi_d_n - 2; k >= 0; --k) p = p * d + coef::phi_d[k];
    return d * d * p;
  }

  void consume_fused(St& s, const Partial* parts) {
    double Mz = -kInf, Mw = -kInf;
    int flags = 0;
    for (int64_t k = 0; k < nseg; ++k) {
      Mz = std::max(Mz, parts[k].v[5]);
      Mw = std::max(Mw, parts[k].v[6]);
      flags |= parts[k].flags;
      if ((parts[k].v[5] == -kInf) != (parts[k].v[6] == -kInf)) s.fallback = true;
    }
    s.masked = (flags & kLowSeen) != 0;
    flags &= ~kLowSeen;
    if (!(flags & (kNanA | kPosInfA)) && Mz == -kInf) flags |= kAllNegInfA;
    if (!(flags & (kNanB | kPosInfB)) && Mw == -kInf) flags |= kAllNegInfB;
    s.Mz = Mz;
    s.Mw = Mw;
    s.flags = flags;
    if ((flags & kErrorBits) || s.fallback) {
      s.flags &= kErrorBits;
      return;
    }
    // Move each segment to the common centre m = Mz - Mw and maximum Mw:
    //   delta = (m_s - m)/T, f = exp((Mw_s - Mw)/T), f e^delta = exp((Mz_s - Mz)/T) <= 1,
    //   Q += f A_s,  Z += f e^d Z_s + f expm1(d) A_s,  R += f e^d R_s,
    //   Phi += f e^d Phi_s + d f e^d Z_s + f A_s phi(d)     (phi(x + d) expanded exactly).
    double Q = 0, Z = 0, Phi = 0, R = 0, mag = 0;
    for (int64_t k = 0; k < nseg; ++k) {
      const Partial& q = parts[k];
      if (q.v[5] == -kInf) continue;
      if (q.v[5] == Mz && q.v[6] == Mw && q.v[10] == 0.0) {
        // The segment holds both row maxima (a one-segment row always does): d = 0 and
        // f = f e^d = 1, so the general step below reduces to plain sums, bitwise.
        Q += q.v[0];
        Z += q.v[1];
        if (a.op == PairOp::kl) {
          Phi += q.v[2];
          mag += q.v[2];
        } else {
          R += q.v[7];
        }
        continue;
      }
      // d = (Mz_s - Mz) - (Mw_s - Mw), each difference exact as a two-sum: with one rounding
      // at the end, d keeps full relative accuracy when the centres differ by 1e-14 next to
      // logits of size 10 (near-identical float64 rows, KL ~ 1e-28).
      double d, f = std::exp((q.v[6] - Mw) * invT), fe;
      if (q.v[10] == 0.0) {  // the segment's centre is Mz_s - Mw_s
        const dd::DD dz_ = dd::two_sum(q.v[5], -Mz), dw_ = dd::two_sum(q.v[6], -Mw);
        d = ((dz_.hi - dw_.hi) + (dz_.lo - dw_.lo)) * invT;
        fe = std::exp((q.v[5] - Mz) * invT);
      } else {  // centre c_s (v[9], exact): d = (c_s - Mz + Mw) / T, one rounding near 0
        const dd::DD t = dd::two_sum(q.v[9], -Mz);
        d = ((t.hi + Mw) + t.lo) * invT;
        fe = std::exp((q.v[6] - Mw) * invT + d);  // f e^d <= e^8 (run() bounds the shift)
      }
      // f expm1(d) and f phi(d) without overflow of e^d (f e^d <= 1 at the centre Mz_s - Mw_s,
      // <= e^8 at a mean centre).
      double f_em1 = d < 1.0 ? f * std::expm1(d) : fe - f;
      double f_phi = std::fabs(d) < 1.0 ? f * phi(d) : fe * (d - 1.0) + f;
      Q += f * q.v[0];
      Z += fe * q.v[1] + f_em1 * q.v[0];
      if (a.op == PairOp::kl) {
        double t1 = fe * q.v[2], t2 = d * fe * q.v[1], t3 = q.v[0] * f_phi;
        Phi += t1 + t2 + t3;
        mag += t1 + std::fabs(t2) + t3;
      } else {
        R += fe * q.v[7];
      }
    }
    s.s[0] = Q;
    s.s[1] = Z;
    s.s[2] = Phi;
    s.s[7] = R;
    s.mag = mag;
  }

  void consume(int64_t r, St& s, const Partial* parts) {
    if (s.stage == kFused) {
      consume_fused(s, parts);
      return;
    }
    if (s.stage == kMax) {
      double Mz = -kInf, Mw = -kInf;
      int flags = 0;
      for (int64_t k = 0; k < nseg; ++k) {
        Mz = std::max(Mz, parts[k].v[0]);
        Mw = std::max(Mw, parts[k].v[1]);
        flags |= parts[k].flags;
      }
      s.masked = (flags & kLowSeen) != 0;
      flags &= ~kLowSeen;
      if (!(flags & (kNanA | kPosInfA)) && Mz == -kInf) flags |= kAllNegInfA;
      if (!(flags & (kNanB | kPosInfB)) && Mw == -kInf) flags |= kAllNegInfB;
      s.Mz = Mz;
      s.Mw = Mw;
      s.flags = flags;
      return;
    }
    // Slot 7 gathers R = sum of p where q = 0 (only in centre/TV/JS passes).
    double acc[12] = {};
    int flags = 0;
    const bool kl = s.stage == kFull && a.op == PairOp::kl;
    for (int64_t k = 0; k < nseg; ++k) {
      for (int j = 0; j < 12; ++j) acc[j] += parts[k].v[j];
      flags |= parts[k].flags;
    }
    for (int j = 0; j < 12; ++j) s.s[j] = acc[j];
    if (kl) s.s[7] = 0.0;
    s.flags |= flags;
  }

  bool finish(int64_t r, St& s) {
    if (a.op == PairOp::kl && a.stats && (s.flags & kQZeroP) && !(s.flags & kErrorBits) &&
        s.stage != kRSum) {
      s.stage = kRSum;
      return true;
    }
    s.stage = kDone;
    if (a.status) a.status[r] = s.flags & kErrorBits;
    double* stats = a.stats ? a.stats + kPairStats * r : nullptr;
    double out = pair_finish(int(a.op), a.T, s.s, s.flags, s.Mz, s.Mw, s.m, s.mlo, stats);
    if (stats && a.op == PairOp::tv) {
      // The side masses are left to the backward: it needs the pass's maxima and centre. (Without
      // them columns 2-3 do not hold a = P+ - P-, b = Q+ - Q- either; no TV backward reads them,
      // and they stay finite for the torch backward's check of bad rows.)
      const bool ok = !(s.flags & kErrorBits);
      stats[6] = ok ? s.Mz : kNaN;
      stats[7] = ok ? s.Mw : kNaN;
      stats[8] = ok ? s.mlo_pass : kNaN;
      stats[9] = stats[10] = stats[11] = kNaN;
    }
    put<OutT>(a.out, r, out);
    return false;
  }
};

// ---- backward ------------------------------------------------------------------------------------
#if defined(TRMATH_HAVE_LANES16)
// 16 gradients at once (store_full below): float as is; bfloat16 rounded to nearest even with a
// NaN kept as a quiet NaN of its own high half, as the 8-lane store does; float16 by the
// conversion instruction (round to nearest even).
TRMATH_INLINE void store16(float* dst, f16v v) { std::memcpy(dst, &v, 64); }
TRMATH_INLINE void store16(bf16_t* dst, f16v v) {
#if defined(__AVX512BF16__)
  // One instruction rounds 16 floats to nearest even, NaN kept quiet with its high half (as
  // below), but it flushes subnormal inputs to zero: a vector holding one takes the path below.
  const __m512 x = (__m512)v;
  if (__builtin_expect(_mm512_fpclass_ps_mask(x, 0x20) == 0, 1)) {  // 0x20: subnormal
    const __m256bh h = _mm512_cvtneps_pbh(x);
    std::memcpy(dst, &h, 32);
    return;
  }
#endif
  typedef uint32_t u16w __attribute__((vector_size(64)));
  const u16w u = (u16w)v;
  const u16w hi = u >> 16;
  const u16w r = (u + 0x7fffu + (hi & 1u)) >> 16;
  const u16w b = (v != v) ? (hi | 0x40u) : r;
  const __m256i h = _mm512_cvtepi32_epi16((__m512i)b);
  std::memcpy(dst, &h, 32);
}
TRMATH_INLINE void store16(f16_t* dst, f16v v) {
  const __m256i h = _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT);
  std::memcpy(dst, &h, 32);
}
#endif

// Full-width store of a gradient vector at dst + i (i + W <= n), converted to the storage type in
// registers (the 16-bit conversions round to nearest even; NaN stays NaN).
// (Non-temporal stores were measured here and dropped: a single gradient gained ~15 %, but two
// gradients whose buffers share their address modulo 8 KiB -- equal-sized allocations usually
// do -- ran 2.2x slower than cached stores.)
template <class L>
TRMATH_INLINE void store_full8(typename L::Storage* dst, typename L::V v) {
  using In = typename L::Storage;
  if constexpr (std::is_same<In, float>::value || std::is_same<In, double>::value) {
    std::memcpy(dst, &v, sizeof(v));
  } else if constexpr (std::is_same<In, bf16_t>::value) {
    // Round to nearest even: add 0x7fff plus the lowest kept bit, keep the high half; a NaN
    // (whose payload the carry could turn into an infinity or a zero) keeps its high half with
    // the quiet bit set.
    const u8 u = (u8)v;
    const u8 hi = u >> 16;
    const u8 r = (u + 0x7fffu + (hi & 1u)) >> 16;
#if defined(__AVX2__)
    // The same in intrinsics: an unordered compare finds the NaNs (the generic unsigned compare
    // costs three instructions on AVX2) and one pack narrows both halves.
    __m256 x;
    std::memcpy(&x, &v, 32);
    __m256i ri, qi;
    const u8 qn = hi | 0x40u;
    std::memcpy(&ri, &r, 32);
    std::memcpy(&qi, &qn, 32);
    const __m256i b = _mm256_blendv_epi8(ri, qi, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    std::memcpy(dst, &h, 16);
#else
    const u8 qn = hi | 0x40u;
    const u8 b = (u & 0x7fffffffu) > 0x7f800000u ? qn : r;
    const u16x8 b16 = __builtin_convertvector(b, u16x8);
    std::memcpy(dst, &b16, 16);
#endif
  } else {
#if defined(__F16C__)
    __m256 x;
    std::memcpy(&x, &v, 32);
    const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
    std::memcpy(dst, &h, 16);
#else
    for (int k = 0; k < L::W; ++k) store_from_float(dst + k, v[k]);
#endif
  }
}

template <class L>
TRMATH_INLINE void store_full(typename L::Storage* dst, typename L::V v) {
#if defined(TRMATH_HAVE_LANES16)
  if constexpr (L::W == 16) store16(dst, v);
  else store_full8<L>(dst, v);
#else
  store_full8<L>(dst, v);
#endif
}

template <class L>
TRMATH_INLINE void store_lanes(typename L::Storage* dst, int64_t n, int64_t i, typename L::V v) {
  if (i + L::W <= n) store_full<L>(dst + i, v);
  else
    for (int k = 0; k < L::W && i + k < n; ++k) store_from_float(dst + i + k, v[k]);
}

// One segment of a single-row backward, a function per (op, dtype, kUnitT) like pair_bwd_seg:
// the op and every statistic are loop invariants held in registers (read through the argument
// struct, they were reloaded after every store, which may alias anything as far as the compiler
// knows). t: the token's index in this segment, or -1.
template <class L, SingleOp kOp, bool kUnitT>
__attribute__((noinline)) void single_bwd_seg(const typename L::Storage* z, int64_t n, double lse,
                                              double H, double Mx, double logA, double T,
                                              double g0d, double g1d, int64_t t, double lpt,
                                              typename L::Storage* out) {
  using V = typename L::V;
  using S = typename L::S;
  using Mask = typename L::Mask;
  const double invT = 1.0 / T;
  const S g0 = S(g0d * invT), g1 = S(g1d * invT);
  const S ninf = -std::numeric_limits<S>::infinity();
  const double M = lse * T;
  // log p + H = (z - Mx)/T - (log A - H): z - Mx exact (Mx the row's largest logit, an input
  // value), then the row's constant c = log A - H (two floats in float lanes). Formed as
  // z/T - lse first and H added after, it cancelled on near-uniform rows, where log p and -H are
  // both about -log V (relative error 1.7e-4 at V = 1000 for logits of spread 1e-3 in float32);
  // formed about (lse - H) T, the rounding of that constant at the size of lse (1e-16 |lse|)
  // was all of log p + H on peaked rows (H ~ 1e-11: 3e-4 relative in float64). Now both are
  // errors relative to the result.
  const double c = logA - H;
  const S ch = S(c), cl = S(c - double(ch));
  if (std::isnan(lse)) {  // NaN statistics (an invalid row) propagate
    const V nan = splat<V>(std::numeric_limits<S>::quiet_NaN());
    for (int64_t i = 0; i < n; i += L::W) store_lanes<L>(out, n, i, nan);
    return;
  }
  // One vector's gradient; full vectors and the partial last one in separate loops (as in
  // pair_bwd_seg: the main loop's stores stay in registers).
  auto grad = [&](int64_t i, V zv) TRMATH_LAMBDA_INLINE {
    auto wa = L::template shifted<kUnitT>(zv, M, invT);
    V p = L::exp(wa);
    V res;
    if constexpr (kOp == SingleOp::lse) {
      res = g0 * p;
    } else if constexpr (kOp == SingleOp::entropy) {
      const Mask live = zv > ninf;
      V lp = (L::narrow(L::template shifted_max<kUnitT>(zv, Mx, invT)) - ch) - cl;
      res = live ? -g0 * p * lp : splat<V>(S(0));
    } else {
      const Mask live = zv > ninf;
      V ent{};
      if constexpr (kOp == SingleOp::logprob_entropy) {
        V lp = (L::narrow(L::template shifted_max<kUnitT>(zv, Mx, invT)) - ch) - cl;
        ent = live ? p * lp : splat<V>(S(0));
      }
      res = -g0 * p - g1 * ent;
      // The token's own entry (1 - p_t) g0 / T from -expm1(log p_t): g0 - g0 p_t cancelled
      // where p_t -> 1 (0 for p_t > 1 - 3e-8 in float; 1 - p_t ~ 1e-16 in float64).
      if (t >= i && t < i + L::W) res[t - i] = S(-(g0d * invT) * std::expm1(lpt)) - g1 * ent[t - i];
    }
    return res;
  };
  int64_t i = 0;
  for (; i + L::W <= n; i += L::W) store_full<L>(out + i, grad(i, L::load(z + i)));
  if (i < n) store_lanes<L>(out, n, i, grad(i, load_tail<L>(z + i, n - i)));
}

template <class In, SingleOp kOp>
void single_bwd_run(const SingleBwd& a) {
  using L = typename LanesFor<In>::type;
  RowReader<In> rd(a.z);
  const int64_t N = a.z.rows(), nseg = rd.nseg, Vn = rd.V;
  In* dz = static_cast<In*>(a.dz);
  parallel_for(N * nseg, [&](int64_t u) {
    int64_t r = u / nseg, sg = u % nseg;
    const In* z = rd.seg(r, sg, scratch<In>(0));
    int64_t n = rd.seg_len(sg);
    In* out = dz + r * Vn + sg * kSegment;
    const double* st = a.stats + kSingleStats * r;
    const double lse = st[0], H = st[1], Mx = st[2], logA = st[3];
    const double g1 = a.g1 ? a.g1[r] : 0.0;
    const int64_t t = a.tokens ? a.tokens[r] - sg * kSegment : -1;
    // log p_t = (z_t - M)/T - log A: z_t - M is exact (0 for the top token), so log p_t keeps its
    // relative accuracy as p_t -> 1 (the forward's own formula).
    const double lpt = (t >= 0 && t < n) ? (to_double(z[t]) - Mx) * (1.0 / a.T) - logA : 0.0;
    if (a.T == 1.0) single_bwd_seg<L, kOp, true>(z, n, lse, H, Mx, logA, a.T, a.g0[r], g1, t, lpt, out);
    else single_bwd_seg<L, kOp, false>(z, n, lse, H, Mx, logA, a.T, a.g0[r], g1, t, lpt, out);
  });
}

template <class In>
void single_bwd_impl(const SingleBwd& a) {
  switch (a.op) {
    case SingleOp::lse: single_bwd_run<In, SingleOp::lse>(a); break;
    case SingleOp::entropy: single_bwd_run<In, SingleOp::entropy>(a); break;
    case SingleOp::logprob: single_bwd_run<In, SingleOp::logprob>(a); break;
    case SingleOp::logprob_entropy: single_bwd_run<In, SingleOp::logprob_entropy>(a); break;
  }
}

// One segment of a pair backward: the gradient terms of op kOp for the logits whose gradient is
// wanted (kZ, kW). A function per (op, dtype, outputs), so each loop carries only its own terms:
// a switch over the op inside the loop, and terms computed for an output nobody asked for,
// used to cost more than the exponentials. kUnitT: T = 1, and the scalings by 1/T (exact then,
// but on every dependency chain of the loop) are skipped.
// The dominant-token entries of KL's and JS's gradients. KL and JS are invariant to a shift of
// either row of logits, so each gradient row sums to 0; at a token j holding more than half of p
// (or of q) the direct formula, e.g. p_j (eps_j - KL) / T, is a small difference of numbers of
// the size p_j (|eps_j| + KL): on a peaked row (p_j = 1 - 1e-9) all of the entry is their
// rounding (float lanes: -1.9e-6 for an exact 2.7e-9). Each segment also sums its other
// entries (and their magnitudes, for the choice below) and notes such a token; the row's entry
// is then minus the sum of the others where that is the more accurate (pair_bwd_run), as the
// torch backend does. Side 0: dz, side 1: dw.
struct DomPart {
  double rest[2] = {0.0, 0.0};  // sum of the segment's entries but the dominant one
  double size[2] = {0.0, 0.0};  // sum of their magnitudes
  double prob[2] = {0.0, 0.0};  // the dominant token's probability (0: none in the segment)
  double direct[2] = {0.0, 0.0};  // its entry by the direct formula, as stored
  int64_t at[2] = {-1, -1};     // its index within the segment
};

template <class L, PairOp kOp, bool kZ, bool kW, bool kUnitT>
__attribute__((noinline)) void pair_bwd_seg(const typename L::Storage* z,
                                            const typename L::Storage* w, int64_t n,
                                            const double* t, double T, double gr,
                                            typename L::Storage* oz, typename L::Storage* ow,
                                            DomPart* dom) {
  using V = typename L::V;
  using S = typename L::S;
  using Mask = typename L::Mask;
  const double invT = 1.0 / T;
  const double lse_p = t[0], lse_q = t[1];
  const S sa = S(t[2]), sb = S(t[3]);
  const S ca = S(kLn2 - t[2]), cb = S(kLn2 - t[3]);  // JS: log 2 - KL(p||m), log 2 - KL(q||m)
  const S g = S(gr * invT);
  const S zero(0), half(0.5), one(1);
  const S ninf = -std::numeric_limits<S>::infinity();
  const bool bad = std::isnan(lse_p) || std::isnan(lse_q);
  // Every statistic the loop uses is read here, into locals: the gradient stores may alias
  // any memory as far as the compiler knows, so a t[k] read inside the loop was reloaded (and
  // its float conversions redone) after every store.
  const double m = t[4], mlo = t[5], mlo_kl = t[5] + T * t[2];
  // TV: s_j - sum_i p_i s_i from the side masses (no cancellation; tv_side_masses).
  const double d[6] = {t[6], t[7], t[8], t[9], t[10], t[11]};
  if (bad) {  // NaN statistics (an invalid row) propagate
    const V nan = splat<V>(std::numeric_limits<S>::quiet_NaN());
    for (int64_t i = 0; i < n; i += L::W) {
      if constexpr (kZ) store_lanes<L>(oz, n, i, nan);
      if constexpr (kW) store_lanes<L>(ow, n, i, nan);
    }
    return;
  }
  // KL = +inf (some q_i = 0 < p_i): d/dz is undefined, NaN wherever p_j > 0; d/dw keeps its
  // formula (q - p) / T. A row whose upstream gradient is 0 (selected out of the loss) gets 0, not
  // 0 * NaN: the NaN of an infinite KL must not poison the gradients of the other rows.
  const bool kl_inf = kOp == PairOp::kl && std::isinf(t[2]);
  if (kl_inf && gr == 0.0) {
    const V z0 = splat<V>(S(0));
    for (int64_t i = 0; i < n; i += L::W) {
      if constexpr (kZ) store_lanes<L>(oz, n, i, z0);
      if constexpr (kW) store_lanes<L>(ow, n, i, z0);
    }
    return;
  }
  // The gradients of one vector of logits (gz, gw zero-initialised by the caller). The full
  // vectors and the last, partial one are separate loops, so the main loop stores in registers
  // (with the partial store's branch inside it, the vector went through the stack each time).
  constexpr bool kDomZ = kZ && kOp != PairOp::tv, kDomW = kW && kOp != PairOp::tv;
  auto grads = [&](V zv, V wv, V& gz, V& gw, V& pz, V& qw) TRMATH_LAMBDA_INLINE {
    Mask zl = zv > ninf, wl = wv > ninf;
    if constexpr (kOp == PairOp::kl) {
      // d KL/dz = p (eps - KL), with eps - KL formed exactly (the centre moved by T KL), not as a
      // float difference; d KL/dw = -(p - q), from q expm1(eps) where |eps| < 1.
      V eps, epsk;
      if constexpr (kW) L::template logratio2<false, kUnitT>(zv, wv, m, mlo, mlo_kl, invT, eps, epsk);
      else epsk = L::template logratio<false, kUnitT>(zv, wv, m, mlo_kl, invT);
      // With both gradients, p = q + q expm1(eps) where every lane has |eps| < 1: one
      // exponential per element instead of two (p to a few ulps, as from its own exponential).
      V p{};
      if constexpr (kW) {
        const V q = L::exp(L::template shifted<kUnitT>(wv, lse_q * T, invT));
        const Mask small = vabs(eps) < one;
        V em1;
        if constexpr (sizeof(S) == 4) em1 = eps + L::em2_series(eps);
        else em1 = L::expm1_series(eps);
        em1 = q * em1;
        if (any_lane(~small)) {
          p = L::exp(L::template shifted<kUnitT>(zv, lse_p * T, invT));
          em1 = small ? em1 : p - q;  // p - q
        } else if constexpr (kZ) {
          p = q + em1;
        }
        gw = (zl | wl) ? -g * em1 : splat<V>(zero);
        qw = q;
      }
      if constexpr (kZ) {
        if constexpr (!kW) p = L::exp(L::template shifted<kUnitT>(zv, lse_p * T, invT));
        gz = zl ? g * p * epsk : splat<V>(zero);
        if (__builtin_expect(kl_inf, 0)) gz = p > zero ? splat<V>(std::numeric_limits<S>::quiet_NaN()) : splat<V>(zero);
        pz = p;
      }
    } else if constexpr (kOp == PairOp::tv) {
      V eps = L::template logratio<false, kUnitT>(zv, wv, m, mlo, invT);
      Mask pos = eps > zero, neg = eps < zero;
      if constexpr (kZ) {
        V p = L::exp(L::template shifted<kUnitT>(zv, lse_p * T, invT));
        V dp = pos ? splat<V>(S(d[0])) : (neg ? splat<V>(S(d[1])) : splat<V>(S(d[2])));
        gz = (zl | wl) ? g * half * p * dp : splat<V>(zero);
      }
      if constexpr (kW) {
        V q = L::exp(L::template shifted<kUnitT>(wv, lse_q * T, invT));
        V dq = pos ? splat<V>(S(d[3])) : (neg ? splat<V>(S(d[4])) : splat<V>(S(d[5])));
        gw = (zl | wl) ? -g * half * q * dq : splat<V>(zero);
      }
    } else {
      V eps = L::template logratio<false, kUnitT>(zv, wv, m, mlo, invT);
      V p = L::exp(L::template shifted<kUnitT>(zv, lse_p * T, invT));
      V q = L::exp(L::template shifted<kUnitT>(wv, lse_q * T, invT));
      // log(p/m) = log(2 / (1 + e^-eps)) and log(q/m) = log(p/m) - eps: a series for
      // |eps| < kJsRadius (float lanes: 1, a degree 9 Chebyshev interpolant; double lanes: 1/2,
      // the Taylor series), the closed form only in vectors with a lane beyond.
      V ds;
      if constexpr (sizeof(S) == 4) ds = eps * estrin(eps, coef::jsd_fc);
      else ds = eps * estrin(eps, coef::jsd_d);
      // da = log(p/m) - KL(p||m), db = log(q/m) - KL(q||m). Beyond the series, log(p/m) is
      // log 2 - log1p(lo/hi) (+ eps where p < q), and where one row is nearly a point mass away
      // from the other, both it and the row scalar lie near log 2: their difference is taken
      // with log 2 - KL formed in double (ca, cb), not from two float-rounded numbers near log 2
      // (float lanes: errors of 1e-5 of the row's largest entry, p a point mass, q spread).
      V da = ds - sa, db = (ds - eps) - sb;
      const Mask small = vabs(eps) < S(L::kJsRadius);
      if (!all_lanes(small)) {
        V hi = vmax(p, q), lo = vmin(p, q);
        V lr = L::log1p_ratio(lo, hi);
        V ec = vmin(vmax(eps, splat<V>(S(-200))), splat<V>(S(200)));
        Mask ppos = p > q;
        V ca_l = ca - lr, cb_l = cb - lr;
        da = small ? da : (ppos ? ca_l : ca_l + ec);
        db = small ? db : (ppos ? cb_l - ec : cb_l);
      }
      if constexpr (kZ) gz = zl ? g * half * p * da : splat<V>(zero);
      if constexpr (kW) gw = wl ? g * half * q * db : splat<V>(zero);
      pz = p;
      qw = q;
    }
  };
  // The sums of the entries but a dominant one (DomPart), in float blocks moved to double as the
  // forward's sums are. A lane with probability > 1/2 is rare (one token of the row at most), so
  // its check is one compare per vector and the lane is found only then.
  Accs<L, kDomW ? 4 : 2> acc;
  double back[2] = {0.0, 0.0};
  auto note = [&](int side, int64_t i, V gv, V pv) TRMATH_LAMBDA_INLINE {
    V ga = gv;
    if (__builtin_expect(any_lane(pv > half), 0)) {
      // Rounding can put two tokens just above 1/2: the larger is the row's candidate, and an
      // entry set aside before is added back (back[]).
      for (int k = 0; k < L::W; ++k) {
        if (pv[k] > half && double(pv[k]) > dom->prob[side]) {
          if (dom->at[side] >= 0) back[side] += dom->direct[side];
          dom->prob[side] = double(pv[k]);
          dom->direct[side] = double(gv[k]);
          dom->at[side] = i + k;
        }
      }
      for (int k = 0; k < L::W; ++k)
        if (dom->at[side] == i + k) ga[k] = zero;
    }
    acc.blk[2 * side] += ga;
    acc.blk[2 * side + 1] += vabs(ga);
  };
  int64_t i = 0;
  for (; i + L::W <= n; i += L::W) {
    V gz{}, gw{}, pz{}, qw{};
    grads(L::load(z + i), L::load(w + i), gz, gw, pz, qw);
    if constexpr (kZ) store_full<L>(oz + i, gz);
    if constexpr (kW) store_full<L>(ow + i, gw);
    if constexpr (kDomZ) note(0, i, gz, pz);
    if constexpr (kDomW) note(1, i, gw, qw);
    if constexpr (kDomZ || kDomW) acc.step();
  }
  if (i < n) {
    V gz{}, gw{}, pz{}, qw{};
    grads(load_tail<L>(z + i, n - i), load_tail<L>(w + i, n - i), gz, gw, pz, qw);
    if constexpr (kZ) store_lanes<L>(oz, n, i, gz);
    if constexpr (kW) store_lanes<L>(ow, n, i, gw);
    // The padding lanes hold -inf logits: p = q = 0 and zero entries.
    if constexpr (kDomZ) note(0, i, gz, pz);
    if constexpr (kDomW) note(1, i, gw, qw);
  }
  if constexpr (kDomZ || kDomW) {
    acc.flush();
    for (int side = 0; side < (kDomW ? 2 : 1); ++side) {
      dom->rest[side] = acc.sum(2 * side) + back[side];
      dom->size[side] = acc.sum(2 * side + 1) + std::fabs(back[side]);
    }
  }
}

// TV backward, first pass: each row's side masses, as s_j - sum_i p_i s_i needs them (2P- + P0,
// -(2P+ + P0), P- - P+ and the same for q; never 1 - (P+ - P-), which cancels), summed by the
// forward's kernel at the maxima and centre of the forward's last pass (stats 6-8, with m in
// stats 4), so the signs are classified as the forward classified them. Written into
// columns 6-11 of a copy of the statistics.
template <class In>
void tv_side_masses(const PairBwd& a, std::vector<double>& out) {
  using L = typename LanesFor<In>::type;
  RowReader<In> rz(a.z), rw(a.w);
  const int64_t N = a.z.rows(), nseg = rz.nseg;
  const double invT = 1.0 / a.T;
  out.assign(a.stats, a.stats + N * kPairStats);
  std::vector<Partial> parts(N * nseg);
  parallel_for(N * nseg, [&](int64_t u) {
    const int64_t r = u / nseg, sg = u % nseg;
    const double* t = a.stats + kPairStats * r;
    partial_zero(parts[u]);
    if (std::isnan(t[0]) || std::isnan(t[1]) || std::isnan(t[6])) return;
    PairParams P{t[6], t[7], invT, t[4], t[8], std::exp((((t[6] - t[7]) - t[4]) - t[8]) * invT)};
    const In* z = rz.seg(r, sg, scratch<In>(0));
    const In* w = rw.seg(r, sg, scratch<In>(1));
    sum2<L, kTV, true>(z, w, rz.seg_len(sg), P, parts[u], nullptr, nullptr);
  });
  for (int64_t r = 0; r < N; ++r) {
    double* t = out.data() + kPairStats * r;
    if (std::isnan(t[0]) || std::isnan(t[1]) || std::isnan(t[6])) {
      for (int j = 6; j < kPairStats; ++j) t[j] = kNaN;
      continue;
    }
    double s[12] = {};
    for (int64_t k = 0; k < nseg; ++k)
      for (int j = 0; j < 12; ++j) s[j] += parts[r * nseg + k].v[j];
    tv_side_terms(s, t + 6);
  }
}

TRMATH_INLINE void put_grad(float* p, double v) { *p = float(v); }
TRMATH_INLINE void put_grad(double* p, double v) { *p = v; }
TRMATH_INLINE void put_grad(bf16_t* p, double v) { store_from_float(p, float(v)); }
TRMATH_INLINE void put_grad(f16_t* p, double v) { store_from_float(p, float(v)); }

template <class In, PairOp kOp, bool kZ, bool kW>
void pair_bwd_run(const PairBwd& a) {
  using L = typename LanesFor<In>::type;
  RowReader<In> rz(a.z), rw(a.w);
  const int64_t N = a.z.rows(), nseg = rz.nseg, Vn = rz.V;
  std::vector<double> tv_stats;
  if constexpr (kOp == PairOp::tv) tv_side_masses<In>(a, tv_stats);
  const double* stats = kOp == PairOp::tv ? tv_stats.data() : a.stats;
  In* dz = static_cast<In*>(a.dz);
  In* dw = static_cast<In*>(a.dw);
  constexpr bool kDomZ = kZ && kOp != PairOp::tv, kDomW = kW && kOp != PairOp::tv;
  // Each row's dominant entry (DomPart): minus the sum of the others where that is the more
  // accurate. The direct entry's rounding is a few ulps of g p_j (|z_j - w_j| / T + |lse_p| +
  // |lse_q| + |row scalar|) (the exact log-ratio about the saved centre, then the scalar, in
  // the lanes' precision); the other entries' sum errs by a few ulps of their magnitudes'
  // sum. The segments' sums are combined in segment order: deterministic.
  auto fix_row = [&](int64_t r, const DomPart* parts) {
    const double* t = stats + kPairStats * r;
    const double gT = std::fabs(a.g[r] / a.T) * (kOp == PairOp::js ? 0.5 : 1.0);
    for (int side = 0; side < 2; ++side) {
      if ((side == 0 && !kDomZ) || (side == 1 && !kDomW)) continue;
      int64_t best = -1;
      for (int64_t k = 0; k < nseg; ++k)
        if (parts[k].at[side] >= 0 && (best < 0 || parts[k].prob[side] > parts[best].prob[side])) best = k;
      if (best < 0) continue;
      double rest = 0.0, size = 0.0;
      for (int64_t k = 0; k < nseg; ++k) {
        rest += parts[k].rest[side];
        size += parts[k].size[side];
        if (k != best && parts[k].at[side] >= 0) {  // a rounding-level second candidate
          rest += parts[k].direct[side];
          size += std::fabs(parts[k].direct[side]);
        }
      }
      const DomPart& d = parts[best];
      const int64_t j = best * kSegment + d.at[side];
      const double zj = rz.element(r, j), wj = rw.element(r, j);
      const double scalar = side == 0 ? t[2] : t[3];
      const double direct_size =
          gT * d.prob[side] * (std::fabs(zj - wj) / a.T + std::fabs(t[0]) + std::fabs(t[1]) + std::fabs(scalar));
      if (std::isfinite(rest) && std::isfinite(d.direct[side]) && std::isfinite(direct_size) &&
          size < direct_size)
        put_grad((side == 0 ? dz : dw) + r * Vn + j, -rest);
    }
  };
  // One-segment rows are fixed by the task that computed them; longer rows once all their
  // segments are done (a few doubles per segment).
  std::vector<DomPart> doms((kDomZ || kDomW) && nseg > 1 ? size_t(N * nseg) : 0);
  parallel_for(N * nseg, [&](int64_t u) {
    int64_t r = u / nseg, sg = u % nseg;
    const In* z = rz.seg(r, sg, scratch<In>(0));
    const In* w = rw.seg(r, sg, scratch<In>(1));
    const int64_t off = r * Vn + sg * kSegment;
    In* oz = kZ ? dz + off : nullptr;
    In* ow = kW ? dw + off : nullptr;
    const int64_t n = rz.seg_len(sg);
    const double* t = stats + kPairStats * r;
    DomPart local;
    DomPart* dom = doms.empty() ? &local : &doms[u];
    if (a.T == 1.0) pair_bwd_seg<L, kOp, kZ, kW, true>(z, w, n, t, a.T, a.g[r], oz, ow, dom);
    else pair_bwd_seg<L, kOp, kZ, kW, false>(z, w, n, t, a.T, a.g[r], oz, ow, dom);
    if constexpr (kDomZ || kDomW)
      if (nseg == 1) fix_row(r, &local);
  });
  if constexpr (kDomZ || kDomW)
    if (nseg > 1)
      for (int64_t r = 0; r < N; ++r) fix_row(r, &doms[r * nseg]);
}

template <class In, PairOp kOp>
void pair_bwd_op(const PairBwd& a) {
  if (a.dz && a.dw) pair_bwd_run<In, kOp, true, true>(a);
  else if (a.dz) pair_bwd_run<In, kOp, true, false>(a);
  else if (a.dw) pair_bwd_run<In, kOp, false, true>(a);
}

template <class In>
void pair_bwd_impl(const PairBwd& a) {
  switch (a.op) {
    case PairOp::kl: pair_bwd_op<In, PairOp::kl>(a); break;
    case PairOp::tv: pair_bwd_op<In, PairOp::tv>(a); break;
    case PairOp::js: pair_bwd_op<In, PairOp::js>(a); break;
  }
}

#if defined(__AVX512BF16__)
// The AVX512_BF16 build differs from the AVX-512 one only where bfloat16 gradients are rounded
// (store16 above): it compiles the bfloat16 backward passes alone and hands every other call to
// the AVX-512 table (at call time, so no static initialisation order is involved).
}  // namespace
}  // namespace TRMATH_NS
namespace isa_avx512 { extern const KernelTable table; }
namespace TRMATH_NS {
namespace {

void single_fwd(const SingleFwd& a) { isa_avx512::table.single_fwd(a); }
void pair_fwd(const PairFwd& a) { isa_avx512::table.pair_fwd(a); }
void single_bwd(const SingleBwd& a) {
  if (a.z.dtype == DType::bf16) single_bwd_impl<bf16_t>(a);
  else isa_avx512::table.single_bwd(a);
}
void pair_bwd(const PairBwd& a) {
  if (a.z.dtype == DType::bf16) pair_bwd_impl<bf16_t>(a);
  else isa_avx512::table.pair_bwd(a);
}
#else
template <template <class> class Algo, class Args>
void run_fwd(const Args& a, DType dt) {
  const int64_t N = a.z.rows();
  switch (dt) {
    case DType::f32: { Algo<float> al(a, N); execute(al, N); break; }
    case DType::f64: { Algo<double> al(a, N); execute(al, N); break; }
    case DType::bf16: { Algo<bf16_t> al(a, N); execute(al, N); break; }
    case DType::f16: { Algo<f16_t> al(a, N); execute(al, N); break; }
  }
}

void single_fwd(const SingleFwd& a) { run_fwd<SingleAlgo>(a, a.z.dtype); }
void pair_fwd(const PairFwd& a) { run_fwd<PairAlgo>(a, a.z.dtype); }

void single_bwd(const SingleBwd& a) {
  switch (a.z.dtype) {
    case DType::f32: single_bwd_impl<float>(a); break;
    case DType::f64: single_bwd_impl<double>(a); break;
    case DType::bf16: single_bwd_impl<bf16_t>(a); break;
    case DType::f16: single_bwd_impl<f16_t>(a); break;
  }
}
void pair_bwd(const PairBwd& a) {
  switch (a.z.dtype) {
    case DType::f32: pair_bwd_impl<float>(a); break;
    case DType::f64: pair_bwd_impl<double>(a); break;
    case DType::bf16: pair_bwd_impl<bf16_t>(a); break;
    case DType::f16: pair_bwd_impl<f16_t>(a); break;
  }
}
#endif  // __AVX512BF16__

}  // namespace

extern const KernelTable table;
const KernelTable table = {TRMATH_STR(TRMATH_ISA), &single_fwd, &single_bwd, &pair_fwd, &pair_bwd};

}  // namespace TRMATH_NS
}  // namespace trmath
