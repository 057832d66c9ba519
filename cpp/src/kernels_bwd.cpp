// trmath: CPU drivers of the exact reductions, backward passes, and the table of the instruction
// set this file is compiled for (its forward passes are in kernels_fwd.cpp).
#include "kernels_common.hpp"

namespace trmath {
namespace TRMATH_NS {
namespace {

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

}  // namespace

#if defined(__AVX512BF16__)
// The AVX512_BF16 build differs from the AVX-512 one only where bfloat16 gradients are rounded
// (store16 above): it compiles the bfloat16 backward passes alone (this file, without
// kernels_fwd.cpp) and hands every other call to the AVX-512 table (at call time, so no static
// initialisation order is involved).
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

}  // namespace
#else
// kernels_fwd.cpp, compiled with the same instruction set.
void single_fwd(const SingleFwd& a);
void pair_fwd(const PairFwd& a);

namespace {

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

}  // namespace
#endif  // __AVX512BF16__

extern const KernelTable table;
const KernelTable table = {TRMATH_STR(TRMATH_ISA), &single_fwd, &single_bwd, &pair_fwd, &pair_bwd};

}  // namespace TRMATH_NS
}  // namespace trmath
