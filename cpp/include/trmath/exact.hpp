// trmath: segment kernels and per-row formulas of the exact full-vocabulary reductions.
//
// A row is reduced in fixed segments (kSegment elements). Each kernel below reads one
// contiguous segment and returns a Partial of double sums; the caller combines partials in
// segment order, so results are bitwise reproducible. No kernel allocates.
//
// Notation for a pair of rows z (policy p) and w (policy q) at temperature T:
//   a_i = (z_i - Mz)/T,  b_i = (w_i - Mw)/T        (M = row maxima; a, b <= 0)
//   qt_i = exp(b_i)                                  (unnormalised q, A_w = sum qt)
//   x_i  = (z_i - w_i - m)/T                         (log-ratio about a centre m)
//   pt_i = qt_i exp(x_i) = exp(a_i) * exp((Mz - Mw - m)/T)
// With E = sum q e^x = 1 + Z1 and L = log E, the exact log-ratio is eps_i = x_i - L and
//   KL(p||q) = Phi / E - psi(Z1),   Phi = sum q phi(x),   phi(x) = x e^x - e^x + 1 >= 0,
//   psi(u) = log1p(u) - u/(1+u) >= 0.
// Phi and psi are sums of non-negative terms; the only subtraction is Phi/E - psi(Z1), and
// the driver re-centres (m <- m + T L) whenever that subtraction, with the rounding it
// amplifies, could exceed the accuracy target (rowfinish.hpp, pair_accept).
// This is what keeps KL = 1e-12 accurate to 1e-7 in float, where sum p (log p - log q)
// returns noise of either sign.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "trmath/config.hpp"
#include "trmath/elementary.hpp"

namespace trmath {

struct Partial {
  double v[12];
  int flags;
};

namespace simd {

TRMATH_INLINE void partial_zero(Partial& p) {
  for (double& x : p.v) x = 0.0;
  p.flags = 0;
}

// Block accumulators: K sums of lanes, in two float (or double) levels below the double totals.
// Terms are summed 8 steps into a block, 4 blocks into a middle sum, and that is flushed into
// per-lane doubles every 32 steps: each term meets at most 7 + 3 roundings in float before the
// exact conversion (relative error <= 10 u = 6e-7 of the sum of the terms' magnitudes, a
// sixteenth of the 1e-5 target; the terms themselves carry up to ~2e-6, see elementary.hpp).
// One level of 4 steps cost 13-20 % more time in the pair kernels (the conversions and their
// out-of-line flush), measured in one process on AVX2.
template <class L, int K>
struct Accs {
  typename L::V blk[K], mid[K];
  d4 tot[K];
  int cnt = 0;
  TRMATH_INLINE Accs() {
    for (int k = 0; k < K; ++k) {
      blk[k] = typename L::V{};
      mid[k] = typename L::V{};
      tot[k] = d4{};
    }
  }
  TRMATH_INLINE void step() {
    if ((++cnt & 7) == 0) {
      for (int k = 0; k < K; ++k) {
        mid[k] += blk[k];
        blk[k] = typename L::V{};
      }
      if (cnt == 32) flush_mid();
    }
  }
  TRMATH_INLINE void flush_mid() {
    for (int k = 0; k < K; ++k) {
      tot[k] += L::to_acc(mid[k]);
      mid[k] = typename L::V{};
    }
    cnt = 0;
  }
  TRMATH_INLINE void flush() {
    for (int k = 0; k < K; ++k) {
      mid[k] += blk[k];
      blk[k] = typename L::V{};
    }
    flush_mid();
  }
  TRMATH_INLINE double sum(int k) const { return hsum(tot[k]); }
};

// Copy a short tail into a full lane, padding with -inf (which every kernel treats as p = 0).
template <class L>
TRMATH_INLINE typename L::V load_tail(const typename L::Storage* p, int64_t n) {
  using In = typename L::Storage;
  In buf[L::W];
  for (int i = 0; i < L::W; ++i) buf[i] = i < n ? p[i] : neg_inf_of<In>();
  return L::load(buf);
}

// Optional prefetch streams (pf, pg): the data the caller processes next (the same segment
// of its next row), requested while this compute-bound pass runs so the next pass does not
// wait on memory.
template <class L, class F>
TRMATH_INLINE void for_lanes(const typename L::Storage* p, int64_t n, F&& f,
                             const typename L::Storage* pf = nullptr) {
  int64_t i = 0;
  if (pf) {
    for (; i + L::W <= n; i += L::W) {
      __builtin_prefetch(pf + i, 0, 1);
      f(L::load(p + i));
    }
  } else {
    for (; i + L::W <= n; i += L::W) f(L::load(p + i));
  }
  if (i < n) f(load_tail<L>(p + i, n - i));
}

template <class L, class F>
TRMATH_INLINE void for_lanes2(const typename L::Storage* p, const typename L::Storage* q,
                              int64_t n, F&& f, const typename L::Storage* pf = nullptr,
                              const typename L::Storage* pg = nullptr) {
  int64_t i = 0;
  if (pf && pg) {
    for (; i + L::W <= n; i += L::W) {
      __builtin_prefetch(pf + i, 0, 1);
      __builtin_prefetch(pg + i, 0, 1);
      f(L::load(p + i), L::load(q + i));
    }
  } else {
    for (; i + L::W <= n; i += L::W) f(L::load(p + i), L::load(q + i));
  }
  if (i < n) f(load_tail<L>(p + i, n - i), load_tail<L>(q + i, n - i));
}

// ---- pass A: maxima and validity ------------------------------------------------------
// low_bit: set when some element is -inf or below -kHuge (a masked token, or a difference z - w
// that may overflow), or the maximum is above kHuge: the pair passes then need their guards.
template <class S> constexpr S kHuge = S(1e37);
template <> constexpr double kHuge<double> = 1e307;

template <class L>
TRMATH_INLINE void seg_max(const typename L::Storage* z, int64_t n, double& mx, int& flags,
                           int nan_bit, int inf_bit, int low_bit = 0) {
  using V = typename L::V;
  using S = typename L::S;
  const S inf = std::numeric_limits<S>::infinity();
  V m = splat<V>(-inf);
  const V vinf = splat<V>(inf);
  // NaN and +inf share one test; a rescan of the (rare) bad segment tells which was seen.
  typename L::Mask bad{}, low{};
  for_lanes<L>(z, n, [&](V v) TRMATH_LAMBDA_INLINE {
    bad |= ~(v < vinf);
    low |= (v < -kHuge<S>);
    m = vmax(v, m);  // v > m ? v : m: a NaN v leaves m as it is
  });
  double r = -std::numeric_limits<double>::infinity();
  if (any_lane(low)) flags |= low_bit;
  for (int i = 0; i < L::W; ++i) r = double(m[i]) > r ? double(m[i]) : r;
  if (any_lane(bad)) {
    for (int64_t i = 0; i < n; ++i) {
      const double x = to_double(z[i]);
      if (x != x) flags |= nan_bit;
      if (x == std::numeric_limits<double>::infinity()) flags |= inf_bit;
    }
  }
  if (r > double(kHuge<S>)) flags |= low_bit;
  mx = r;
}

// seg_max of two rows in one loop, and the mean of z - w (float lanes; an estimate whose rounding
// is immaterial, meaningful only where no low_bit is set): the first pair pass centres its
// log-ratios there rather than at the difference of the segment's maxima, which are often
// different tokens' logits.
template <class L>
TRMATH_INLINE void seg_max2(const typename L::Storage* z, const typename L::Storage* w, int64_t n,
                            double& mz, double& mw, double& mean, int& flags, int nan_a,
                            int inf_a, int nan_b, int inf_b, int low_bit) {
  using V = typename L::V;
  using S = typename L::S;
  const S inf = std::numeric_limits<S>::infinity();
  V m1 = splat<V>(-inf), m2 = splat<V>(-inf), acc = splat<V>(S(0));
  const V vinf = splat<V>(inf);
  typename L::Mask bad1{}, bad2{}, low{};
  for_lanes2<L>(z, w, n, [&](V zv, V wv) TRMATH_LAMBDA_INLINE {
    bad1 |= ~(zv < vinf);
    bad2 |= ~(wv < vinf);
    low |= (zv < -kHuge<S>) | (wv < -kHuge<S>);
    m1 = vmax(zv, m1);
    m2 = vmax(wv, m2);
    acc += zv - wv;
  });
  if (any_lane(low)) flags |= low_bit;
  double r1 = -std::numeric_limits<double>::infinity(), r2 = r1, t = 0.0;
  for (int i = 0; i < L::W; ++i) {
    r1 = double(m1[i]) > r1 ? double(m1[i]) : r1;
    r2 = double(m2[i]) > r2 ? double(m2[i]) : r2;
    t += double(acc[i]);
  }
  const typename L::Storage* rows[2] = {z, w};
  const bool bads[2] = {any_lane(bad1), any_lane(bad2)};
  const int nan_bits[2] = {nan_a, nan_b}, inf_bits[2] = {inf_a, inf_b};
  for (int k = 0; k < 2; ++k) {
    if (!bads[k]) continue;
    for (int64_t i = 0; i < n; ++i) {
      const double x = to_double(rows[k][i]);
      if (x != x) flags |= nan_bits[k];
      if (x == std::numeric_limits<double>::infinity()) flags |= inf_bits[k];
    }
  }
  if (r1 > double(kHuge<S>) || r2 > double(kHuge<S>)) flags |= low_bit;
  mz = r1;
  mw = r2;
  mean = t / double(n);
}

// ---- pass B, one row: sum exp(a) and sum exp(a) * (-a) --------------------------------
// The maxima (a = 0, exp(a) = 1 exactly) are counted apart from the rest R, so that
// log A = log k + log1p(R / k) keeps full relative accuracy when R ~ 1e-17 (a nearly
// deterministic row, whose log-probability of the top token is -R).
// out: v[0] = R = sum_{z < M} exp(a), v[1] = sum exp(a) (-a), v[2] = k = #{z = M}.
template <class L, bool kEntropy>
TRMATH_INLINE void seg_sum1(const typename L::Storage* z, int64_t n, double M, double invT,
                            Partial& out, const typename L::Storage* pf = nullptr) {
  using V = typename L::V;
  using S = typename L::S;
  const V zero = splat<V>(S(0));
  const S Ms = S(M);
  Accs<L, 3> acc;
  for_lanes<L>(z, n, [&](V v) TRMATH_LAMBDA_INLINE {
    auto a = L::shifted_max(v, M, invT);
    V e = L::exp(a);
    auto top = v == Ms;
    acc.blk[0] += top ? zero : e;
    acc.blk[2] += top ? splat<V>(S(1)) : zero;
    if constexpr (kEntropy) {
      V t = e * (-L::narrow(a));
      acc.blk[1] += (v > -std::numeric_limits<S>::infinity()) ? t : zero;
    }
    acc.step();
  }, pf);
  acc.flush();
  out.v[0] = acc.sum(0);
  out.v[1] = kEntropy ? acc.sum(1) : 0.0;
  out.v[2] = acc.sum(2);
}

// Lanes into per-lane double sums (d4 vectors, W / 4 of them); counts are subtracted (a mask
// lane is -1).
TRMATH_INLINE void add_lanes(d4* acc, f8 x) {
  acc[0] += __builtin_convertvector(lo_half(x), d4);
  acc[1] += __builtin_convertvector(hi_half(x), d4);
}
TRMATH_INLINE void add_lanes(d4* acc, d4 x) { acc[0] += x; }
TRMATH_INLINE void sub_lanes(d4* acc, i8 m) {
  acc[0] -= __builtin_convertvector(i4(__builtin_shufflevector(m, m, 0, 1, 2, 3)), d4);
  acc[1] -= __builtin_convertvector(i4(__builtin_shufflevector(m, m, 4, 5, 6, 7)), d4);
}
TRMATH_INLINE void sub_lanes(d4* acc, l4 m) { acc[0] -= __builtin_convertvector(__builtin_convertvector(m, i4), d4); }
// Lanes 4h .. 4h + 3 of a vector, widened to double (exact).
TRMATH_INLINE d4 quarter_d(f8 v, int h) { return __builtin_convertvector(h ? hi_half(v) : lo_half(v), d4); }
TRMATH_INLINE d4 quarter_d(d4 v, int) { return v; }

// Moves per-lane sums (R about Mo, B = sum exp(a) (-a), K the count of maxima) to the larger
// maxima Mn where `up` is set: R' = (K + R) f, B' = f (B + d (K + R)), K' = 0, with
// d = (Mn - Mo) / T and f = exp(-d); an empty lane (K = R = 0) stays empty. Four lanes at a
// time with the vector exponential (within an ulp of the scalar one), instead of a scalar
// exp per moved lane: a short row moves each lane's maximum a few times, and those scalar
// calls were most of its cost.
template <bool kEntropy>
TRMATH_INLINE void move_maxima(d4& R, d4& K, d4& B, d4 Mo, d4 Mn, l4 up, double invT) {
  const d4 zero = splat<d4>(0.0);
  const d4 d = (Mn - Mo) * invT, f = exp_d(-d), A = K + R;
  const l4 empty = (K == zero) & (R == zero);
  R = up ? zero_where(empty, A * f) : R;
  if (kEntropy) B = up ? zero_where(empty, f * (B + d * A)) : B;
  K = up ? zero : K;
}

// ---- passes A and B in one read, one row ---------------------------------------------------
// The same sums as seg_max + seg_sum1, from one read of the segment: every lane keeps them about
// its own running maximum m_l (an input value), moved exactly whenever that grows -- with
// d = (m' - m)/T and A = k + R: R' = A e^-d, B' = e^-d (B + d A), k' = 0, the segment merge --
// and the lanes are merged at the segment's maximum at the end. Every lane starts at the maximum
// of the segment's first kOnlinePrefix elements (the most negative finite value if those are all
// masked; never -inf, so a masked token gives a = -inf and e^a = 0 with no test), so a lane's
// maximum moves only for the few elements above that start; the float blocks hold 16 terms
// (relative error <= 16 u of non-negative sums) before they are flushed into per-lane doubles.
// The element that raised a lane's maximum counts itself (k >= 1); a lane that never moved
// counts the start only if it holds that element, and its sums (about the start, every term
// <= 1) are merged like any other's; only a lane with no term at all is skipped. NaN and +inf
// need no test in the loop: the exponential keeps a NaN argument, and a +inf element becomes its
// lane's maximum, where a = inf - inf is NaN: a NaN leaves a NaN in its lane's sum R (every later move
// and flush keeps it), a +inf a lane maximum of +inf (its own NaN term is cleared as a maximum's
// by the double lanes). Which of the two was seen is settled by a rescan of the (rare) segment
// that shows either.
// out: v[0] = R, v[1] = B, v[2] = k about the returned maximum mx (as seg_sum1 about M).
// Measured (float32 and bfloat16, AVX2, V = 8192 ... 262144): a start from the first 256
// elements made the pass 1.10-1.24x faster than a start from nothing, 1024 another 1.02-1.05x,
// 4096 0.96-1.00x of 1024 (float64: 0.97-1.08x, memory-bound).
constexpr int64_t kOnlinePrefix = 1024;
// Moves of the lane maxima after which seg_online1 moves every lane to the maximum of the rest of
// its segment (one more read of it, from cache): random logits move about 9 times per segment
// (see kOnlinePrefix), a rising row (sorted logits) on every vector, which made it 9.5x slower
// than a random one; with this limit 1.2x (16 against 64 moves: 1.15x against 1.65x), random
// rows unchanged (float32, V = 32768 and 151936, 2 threads, AVX-512).
constexpr int kOnlineMoves = 16;

template <class L, bool kEntropy, bool kUnitT>
TRMATH_INLINE void seg_online1_t(const typename L::Storage* z, int64_t n, double invT, double& mx,
                                 Partial& out, int& flags, int nan_bit, int inf_bit,
                                 const typename L::Storage* pf) {
  using V = typename L::V;
  using S = typename L::S;
  using Mask = typename L::Mask;
  constexpr int W = L::W;
  const double dinf = std::numeric_limits<double>::infinity();
  const V zero = splat<V>(S(0));
  const S sinvT = S(invT);
  // Every lane starts at the maximum of the segment's first kOnlinePrefix elements (read here
  // and again, from L1, by the loop), an input value: a lane then moves only for the few
  // elements above it, instead of on every record of its own running maximum from the start
  // (with random logits, ~8 ln(n / W) vector moves in all, each flushing the blocks and
  // rescaling the lanes' sums by exponentials in double). A lane that never counts a maximum
  // keeps sums about this start, moved to the segment maximum at the end like any other.
  V m;
  {
    const int64_t np = std::min<int64_t>(n, kOnlinePrefix) / W * W;
    V pm = splat<V>(std::numeric_limits<S>::lowest());
    for (int64_t i = 0; i < np; i += W) pm = vmax(L::load(z + i), pm);  // NaN and -inf skipped
    S m0 = pm[0];
    for (int i = 1; i < W; ++i) m0 = pm[i] > m0 ? pm[i] : m0;
    m = splat<V>(m0);
  }
  V bR = zero, bB = zero;
  Mask bK{};  // minus the count of maxima (a true mask lane is -1)
  // Per-lane double sums, held as vectors (the flush is a few conversions, not 3 W scalar
  // adds; a move of lane maxima is a few vector operations, move_maxima).
  d4 Rv[W / 4] = {}, Kv[W / 4] = {}, Bv[W / 4] = {};
  double R[W], K[W], B[W];
  auto to_arrays = [&]() TRMATH_LAMBDA_INLINE {
    std::memcpy(R, Rv, sizeof R);
    std::memcpy(K, Kv, sizeof K);
    std::memcpy(B, Bv, sizeof B);
  };
  int cnt = 0;
  auto flush = [&]() TRMATH_LAMBDA_INLINE {
    add_lanes(Rv, bR);
    sub_lanes(Kv, bK);
    if (kEntropy) add_lanes(Bv, bB);
    bR = zero;
    bK = Mask{};
    bB = zero;
    cnt = 0;
  };
  int64_t pos = 0;  // index of the element vector the loop body holds
  int moves = 0;
  for_lanes<L>(z, n, [&](V v) TRMATH_LAMBDA_INLINE {
    const Mask up = v > m;
    if (any_lane(up)) {
      flush();
      // The lanes move to the elements above their maxima; after kOnlineMoves such moves
      // (rising logits: a sorted row moves on every vector) every lane moves once to the
      // maximum of the rest of the segment instead, so none moves again.
      V mt = v;
      if (++moves > kOnlineMoves) {
        V rm = vmax(v, splat<V>(std::numeric_limits<S>::lowest()));  // NaN and -inf skipped
        int64_t j = pos + W;
        for (; j + W <= n; j += W) rm = vmax(L::load(z + j), rm);
        if (j < n) rm = vmax(load_tail<L>(z + j, n - j), rm);
        S r0 = rm[0];
        for (int i = 1; i < W; ++i) r0 = rm[i] > r0 ? rm[i] : r0;
        mt = splat<V>(r0);  // >= every lane of v
      }
      const Mask upm = mt > m;
      for (int h = 0; h < W / 4; ++h) {
        const d4 Mo = quarter_d(m, h), Mn = quarter_d(mt, h);
        move_maxima<kEntropy>(Rv[h], Kv[h], Bv[h], Mo, Mn, Mn > Mo, invT);
      }
      m = upm ? mt : m;
    }
    pos += W;
    V a = v - m;  // exact near the lane's maximum; relative 2^-24 (float) elsewhere; -inf masked
    if constexpr (!kUnitT) a = a * sinvT;
    const Mask top = v == m;
    // 0 at the lane's maxima, which are counted apart; NaN where a is (a NaN or +inf element)
    const V e = L::template exp<false, true>(a, top);
    bR += e;
    bK += top;
    if constexpr (kEntropy) {
      const V ac = vmax(a, splat<V>(S(-1e4)));  // -inf -> finite, so e (-a) = 0 there
      bB += e * (-ac);
    }
    if (++cnt == 16) flush();
  }, pf);
  flush();
  to_arrays();
  bool bad = false;
  for (int i = 0; i < W; ++i) bad |= R[i] != R[i] || double(m[i]) == dinf;
  if (bad) {
    for (int64_t i = 0; i < n; ++i) {
      const double x = to_double(z[i]);
      if (x != x) flags |= nan_bit;
      if (x == dinf) flags |= inf_bit;
    }
  }
  double Ms = -dinf;
  for (int i = 0; i < W; ++i)
    if (K[i] > 0 && double(m[i]) > Ms) Ms = double(m[i]);
  // Every lane moved to the segment maximum Ms (the lanes at Ms keep their sums, f = 1 and
  // d = 0 would round them), then summed in lane order.
  double Rm[W], Bm[W];
  for (int h = 0; h < W / 4; ++h) {
    const d4 Mi = quarter_d(m, h);
    d4 R4 = Rv[h], B4 = Bv[h], K4 = Kv[h];
    move_maxima<kEntropy>(R4, K4, B4, Mi, splat<d4>(Ms), Mi != Ms, invT);
    std::memcpy(Rm + 4 * h, &R4, sizeof R4);
    std::memcpy(Bm + 4 * h, &B4, sizeof B4);
  }
  double Rs = 0.0, Ks = 0.0, Bs = 0.0;
  for (int i = 0; i < W; ++i) {
    if (!(K[i] > 0) && R[i] == 0.0) continue;  // nothing but masked tokens (or nothing)
    Rs += Rm[i];
    Bs += Bm[i];
    if (double(m[i]) == Ms) Ks += K[i];
  }
  mx = Ms;
  out.v[0] = Rs;
  out.v[1] = kEntropy ? Bs : 0.0;
  out.v[2] = Ks;
}

template <class L, bool kEntropy>
TRMATH_INLINE void seg_online1(const typename L::Storage* z, int64_t n, double invT, double& mx,
                               Partial& out, int& flags, int nan_bit, int inf_bit,
                               const typename L::Storage* pf = nullptr) {
  if (invT == 1.0) seg_online1_t<L, kEntropy, true>(z, n, invT, mx, out, flags, nan_bit, inf_bit, pf);
  else seg_online1_t<L, kEntropy, false>(z, n, invT, mx, out, flags, nan_bit, inf_bit, pf);
}

// ---- pass B, two rows ---------------------------------------------------------------------
// kTVv: TV's value alone (A_w, Z1, T+, Q+ and R), for a forward whose backward will not run;
// kJSv: JS's value alone (A_w, Z1, the sum of both halves and R), likewise.
enum PairTerms : int { kCentre = 0, kKL = 1, kTV = 2, kJS = 3, kTVv = 4, kJSv = 5 };

struct PairParams {
  double Mz, Mw, invT;  // Mz, Mw: maxima of the rows (or segments) themselves, so input values
                        // (floats for the float lanes, which subtract them in one float step)
  double m, mlo;  // centre m + mlo, in logit units (x = (z - w - m - mlo) / T)
  double g;       // exp((Mz - Mw - m - mlo) / T), so that pt = exp(a) * g
};

// Slots of the partial:  0 A_w, 1 Z1 (q-units), then
//   kKL: 2 Phi            kTV: 2 T+, 3 Q+, 4 P+, 5 P-, 6 P0, 8 Q-, 9 Q0 (P: pt, Q: qt over
//                         x > 0, x < 0, x = 0; kept apart so 1 - sum p sign is never formed)
//   kJS: 2 KL(p||m) + KL(q||m) parts, 3 KL(q||m) part    kJSv: 2 as kJS, 3 zero
//   7: R = sum of pt where q_i = 0 < p_i (all but kKL, where such a token makes KL = +inf)
// flags: kQZeroP = some q_i = 0 < p_i.
// kMasked = false: the caller knows every z and w of the segment is finite and below kHuge in
// magnitude (no masked token, no overflowing z - w), and the masks are skipped.
template <class L, PairTerms kTerms, bool kMasked = true, bool kUnitT = false>
TRMATH_INLINE void seg_sum2(const typename L::Storage* z, const typename L::Storage* w, int64_t n,
                            const PairParams& P, Partial& out,
                            const typename L::Storage* pf = nullptr,
                            const typename L::Storage* pg = nullptr) {
  using V = typename L::V;
  using S = typename L::S;
  using Mask = typename L::Mask;
  constexpr int K = kTerms == kCentre || kTerms == kKL ? 3 : kTerms == kTV ? 10 : kTerms == kJSv ? 4 : 5;
  const S ninf = -std::numeric_limits<S>::infinity();
  const V zero = splat<V>(S(0));
  const S g = S(P.g);
  // Exact residual of the centre when it is the difference of the maxima (always, here).
  const double mres = [&] {
    double sm = P.Mz - P.Mw, bb = sm - P.Mz;
    return (sm == P.m) ? (P.Mz - (sm - bb)) + (-P.Mw - bb) : 0.0;
  }();
  Accs<L, K> acc;
  Mask infq{};
  for_lanes2<L>(z, w, n, [&](V zv, V wv) TRMATH_LAMBDA_INLINE {
    auto b = L::template shifted_max<kUnitT>(wv, P.Mw, P.invT);
    V qt = L::template exp<!kMasked>(b);
    Mask wneg{}, only_p{};
    if (kMasked) {
      wneg = wv == ninf;
      only_p = wneg & ~(zv == ninf);
      infq |= only_p;
    }
    V x = L::template logratio<!kMasked, kUnitT>(zv, wv, P.m, P.mlo, P.invT, mres);
    if (kMasked) x = wneg ? zero : x;         // both masked -> no contribution
    Mask small = vabs(x) < S(1);
    // |x| < 1: one series E2 = expm1(x) - x gives expm1 = x + E2 and
    // phi = x expm1(x) - E2 (both terms >= 0, at most 2 bits lost at x = -1).
    V e2 = L::em2_series(x);
    V em1_s = x + e2;
    // p's own exponential is needed only where |x| >= 1 or q = 0 < p; near-identical rows
    // (the trust-region regime) skip it and cost one exponential per element. The terms of
    // such lanes are formed only in that (rare) branch, so the common path carries no selects.
    const V qe = qt * em1_s;                  // q (e^x - 1) from the series
    V ez, pt, em1, pfull, phi;
    const bool rare = kMasked ? any_lane(~small | only_p) : !all_lanes(small);
    if (__builtin_expect(rare, 0)) {
      ez = L::exp(L::template shifted_max<kUnitT>(zv, P.Mz, P.invT));
      pt = ez * g;
      if (kMasked) pt = wneg ? zero : pt;     // q_i = 0 is reported through the flag
      em1 = small ? qe : pt - qt;             // q (e^x - 1)
      pfull = small ? qt + qe : pt;           // q e^x, from the series where |x| < 1
      if constexpr (kTerms == kKL) {
        V xc = vmax(x, splat<V>(S(-200)));  // x = -inf only where p_i = 0, then pt = 0
        phi = small ? qt * (x * em1_s - e2) : pt * (xc - S(1)) + qt;
      }
    } else {
      ez = zero;
      pt = zero;
      em1 = qe;
      pfull = qt + qe;
      if constexpr (kTerms == kKL) phi = qt * (x * em1_s - e2);
    }
    acc.blk[0] += qt;
    acc.blk[1] += em1;
    if constexpr (kTerms == kKL) {
      acc.blk[2] += phi;
    } else if constexpr (kTerms == kTV) {
      Mask pos = x > zero;
      Mask neg = x < zero;
      Mask tie = ~(pos | neg);
      acc.blk[2] += pos ? em1 : zero;    // T+ = sum_{x>0} q (e^x - 1)
      acc.blk[3] += pos ? qt : zero;     // Q+
      acc.blk[4] += pos ? pfull : zero;  // P+ (p-units before normalisation)
      acc.blk[5] += neg ? pfull : zero;  // P-
      acc.blk[6] += tie ? pfull : zero;  // P0
      acc.blk[7] += neg ? qt : zero;     // Q-
      acc.blk[8] += tie ? qt : zero;     // Q0
    } else if constexpr (kTerms == kTVv) {
      const Mask pos = x > zero;
      acc.blk[2] += pos ? em1 : zero;  // T+
      acc.blk[3] += pos ? qt : zero;   // Q+
    } else if constexpr (kTerms == kJS || kTerms == kJSv) {
      // The value: p log(p/m) + q log(q/m) = (p + q) g(x), the even function
      // g(x) = log 2 - H(sigmoid(x)) = (x/2) tanh(x/2) - log cosh(x/2) >= 0 (H: binary entropy),
      // one series in u = x^2 (the halves' Bregman terms -+(p - q)/2 cancel in the sum). Every
      // term is >= 0, so its relative error (a few ulps) is the sum's. kJS also sums the half
      // m phi(log(q/m)) >= 0 (q-units) that the backward needs (KL(q||m); KL(p||m) is the
      // rest: the halves' terms are within a factor 2.6 of each other, so that difference
      // loses at most 2 bits). The value is the same sum in both, so it does not depend on
      // whether a backward will run.
      const V u = x * x;
      V t = (qt + pfull) * (u * L::jsg_series(u));
      V tq;
      if constexpr (kTerms == kJS) tq = qt * L::jsq_series(x);
      if (L::kJsRadius < 1.0 || rare) {
        const Mask js_small = vabs(x) < S(L::kJsRadius);
        V hi = vmax(pfull, qt), lo = vmin(pfull, qt);
        V d_big = S(kLn2) - L::log1p_ratio(lo, hi);  // log(2 max/(p+q)) for the larger side
        V xc = vmax(x, splat<V>(S(-200)));
        Mask ppos = pfull > qt;
        V dp = ppos ? d_big : d_big + xc;  // log(p/m)
        V dq = ppos ? d_big - xc : d_big;  // log(q/m)
        t = js_small ? t : pfull * dp + qt * dq;
        if constexpr (kTerms == kJS) tq = js_small ? tq : qt * dq + (pfull - qt) * S(0.5);
        if (kMasked) {  // q_i = 0 < p_i: p_i log 2 in all, p_i / 2 in q's half
          const V praw = ez * g;
          t = only_p ? praw * S(kLn2) : t;
          if constexpr (kTerms == kJS) tq = only_p ? praw * S(0.5) : tq;
        }
      }
      acc.blk[2] += t;
      if constexpr (kTerms == kJS) acc.blk[3] += tq;
    }
    if constexpr (kTerms != kKL) {
      if (kMasked) acc.blk[K - 1] += only_p ? ez * g : zero;
    }
    acc.step();
  }, pf, pg);
  acc.flush();
  if constexpr (kTerms == kTV) {
    for (int k = 0; k < 7; ++k) out.v[k] = acc.sum(k);
    out.v[8] = acc.sum(7);
    out.v[9] = acc.sum(8);
    out.v[7] = acc.sum(9);
  } else {
    constexpr int Kmain = kTerms == kKL ? K : K - 1;
    for (int k = 0; k < Kmain; ++k) out.v[k] = acc.sum(k);
    if constexpr (kTerms == kJSv) out.v[3] = 0.0;
    if constexpr (kTerms != kKL) out.v[7] = acc.sum(K - 1);
  }
  for (int i = 0; i < L::W; ++i)
    if (infq[i]) out.flags |= kQZeroP;
}

}  // namespace simd
}  // namespace trmath
