// trmath: CPU drivers of the exact reductions, forward passes (single-row and pair reductions).
// Compiled once per instruction set; the table of each is in kernels_bwd.cpp.
#include "kernels_common.hpp"

namespace trmath {
namespace TRMATH_NS {
namespace {

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

}  // namespace

void single_fwd(const SingleFwd& a) { run_fwd<SingleAlgo>(a, a.z.dtype); }
void pair_fwd(const PairFwd& a) { run_fwd<PairAlgo>(a, a.z.dtype); }

}  // namespace TRMATH_NS
}  // namespace trmath
