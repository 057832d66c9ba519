// Standalone driver of the CPU kernels for the sanitizer build (ASan + UBSan + LeakSanitizer):
// every entry point, every dtype, odd vocabulary sizes (1 .. two segments + 1), strided rows,
// masked tokens, both execution modes (rows in parallel / segments in parallel), the
// KL-ball projection's solver and backward, the TV projection's log-mixture and its backward,
// the sparse projection's tail buckets, and the element kernels of the sampled estimators and
// the binary coarse divergences (sizes around their chunks and vector tails, masks, importance
// weights, both directions), the pair backward's dominant-token entries and KL = +inf rows.
// Checks the results against a plain double-precision
// reference to catch gross errors; precision itself is tested from Python against mpmath.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "estimator_args.hpp"
#include "project_args.hpp"
#include "trmath/vec.hpp"
#include "view.hpp"

namespace trmath {
namespace isa_generic {
extern const KernelTable table;
void project_kl_forward_rows(const ProjFwd& a, const double* kst);
void project_kl_backward_rows(const ProjBwd& a);
void sparse_tail_rows(const View& z, const View& w, double* out, double* mass);
void project_tv_forward_rows(const TvMix& a);
void project_tv_backward_rows(const TvMix& a);
void k_estimate(const KArgs& a);
void k_estimate_backward(const KBwdArgs& a);
void binary_coarse(const BinArgs& a);
void topk_coarse(const TopkArgs& a);
void mismatch_sums(const MismatchArgs& a);
}  // namespace isa_generic
}
using namespace trmath;

template <class T> T from_double(double v);
template <> float from_double<float>(double v) { return float(v); }
template <> double from_double<double>(double v) { return v; }
template <> simd::bf16_t from_double<simd::bf16_t>(double v) { return simd::bf16_t{simd::float_to_bf16(float(v))}; }
template <> simd::f16_t from_double<simd::f16_t>(double v) { return simd::f16_t{simd::float_to_f16(float(v))}; }

static int failures = 0;
static void check(bool ok, const char* what, int64_t V) {
  if (!ok) {
    std::printf("FAIL %s (V=%lld)\n", what, (long long)V);
    ++failures;
  }
}

template <class T>
void run_case(DType dt, int64_t N, int64_t V, int64_t vstride, std::mt19937_64& rng, bool rising = false) {
  std::normal_distribution<double> nd(0.0, 2.0);
  std::vector<T> zb(size_t(N * V * vstride)), wb(zb.size());
  std::vector<double> zd(size_t(N * V)), wd(zd.size());
  for (int64_t r = 0; r < N; ++r)
    for (int64_t i = 0; i < V; ++i) {
      // rising rows (sorted logits) move the one-read pass's lane maxima on every vector
      double a = rising ? -8.0 + 16.0 * double(i) / double(V) : nd(rng), b = a + 0.1 * nd(rng);
      if (V > 2 && i % 7 == 3) a = b = -INFINITY;  // masked in both
      T ta = from_double<T>(a), tb = from_double<T>(b);
      zb[size_t((r * V + i) * vstride)] = ta;
      wb[size_t((r * V + i) * vstride)] = tb;
      zd[size_t(r * V + i)] = simd::to_double(ta);
      wd[size_t(r * V + i)] = simd::to_double(tb);
    }
  View z;
  z.data = reinterpret_cast<const char*>(zb.data());
  z.dtype = dt;
  z.ndim = 2;
  z.shape[0] = N;
  z.shape[1] = V;
  z.strides[0] = V * vstride;
  z.strides[1] = vstride;
  View w = z;
  w.data = reinterpret_cast<const char*>(wb.data());
  const bool f64 = dt == DType::f64;
  std::vector<double> outd(N), out1d(N), stats(N * kPairStats);
  std::vector<float> outf(N), out1f(N);
  std::vector<int> status(N);
  std::vector<int64_t> tokens(N);
  for (int64_t r = 0; r < N; ++r) {
    int64_t t = (r * 5) % V;
    if (V > 2 && t % 7 == 3) t = (t + 1) % V;  // never a masked token
    tokens[r] = t;
  }
  void* out = f64 ? (void*)outd.data() : (void*)outf.data();
  void* out1 = f64 ? (void*)out1d.data() : (void*)out1f.data();
  auto get = [&](int64_t r) { return f64 ? outd[r] : double(outf[r]); };
  double tol = (dt == DType::f64 || dt == DType::f32) ? 1e-6 : 1e-5;

  for (int op = 0; op < 3; ++op) {
    PairFwd a;
    a.z = z; a.w = w; a.T = op == 1 ? 0.7 : 1.0; a.op = PairOp(op);
    a.out = out; a.stats = stats.data(); a.status = status.data();
    isa_generic::table.pair_fwd(a);
    for (int64_t r = 0; r < N; ++r) {
      double lz = -INFINITY, lw = -INFINITY;
      for (int64_t i = 0; i < V; ++i) {
        double x = zd[r * V + i] / a.T, y = wd[r * V + i] / a.T;
        if (x > lz) lz = x;
        if (y > lw) lw = y;
      }
      double sz = 0, sw = 0;
      for (int64_t i = 0; i < V; ++i) { sz += std::exp(zd[r * V + i] / a.T - lz); sw += std::exp(wd[r * V + i] / a.T - lw); }
      double ref = 0;
      for (int64_t i = 0; i < V; ++i) {
        double p = std::exp(zd[r * V + i] / a.T - lz) / sz, q = std::exp(wd[r * V + i] / a.T - lw) / sw;
        if (op == 0 && p > 0) ref += p * std::log(p / q);
        if (op == 1) ref += 0.5 * std::fabs(p - q);
        if (op == 2) {
          double m = 0.5 * (p + q);
          if (p > 0) ref += 0.5 * p * std::log(p / m);
          if (q > 0) ref += 0.5 * q * std::log(q / m);
        }
      }
      check(status[r] == 0 && std::fabs(get(r) - ref) <= tol * (1 + std::fabs(ref)), "pair forward", V);
    }
    std::vector<T> dz(size_t(N * V)), dw(size_t(N * V));
    std::vector<double> g(N, 1.0);
    PairBwd b;
    b.z = z; b.w = w; b.T = a.T; b.op = a.op; b.stats = stats.data(); b.g = g.data();
    b.dz = dz.data(); b.dw = dw.data();
    isa_generic::table.pair_bwd(b);
    for (int64_t r = 0; r < N; ++r) {
      double s = 0;
      for (int64_t i = 0; i < V; ++i) s += simd::to_double(dz[r * V + i]);
      if (!(std::fabs(s) <= 1e-2)) std::printf("op %d row %lld sum %g\n", op, (long long)r, s);
      check(std::fabs(s) <= 1e-2, "pair backward sums to 0 over the vocabulary", V);
    }
  }
  // KL-ball projection: the exact-KL kernel's statistics, then the solver and the backward. The
  // returned rows must be normalised and meet the constraint (or equal log_softmax(z) when
  // already inside the ball).
  {
    const double eps = 0.01;
    PairFwd k;
    k.z = z; k.w = w; k.T = 1.0; k.op = PairOp::kl;
    k.out = out; k.stats = stats.data(); k.status = status.data();
    isa_generic::table.pair_fwd(k);
    std::vector<double> kl1(N);
    for (int64_t r = 0; r < N; ++r) kl1[r] = stats[size_t(r * kPairStats + 2)];
    std::vector<double> lpd(size_t(N * V)), pst(size_t(N * kProjStats));
    std::vector<float> lpf(size_t(N * V));
    for (int64_t r = 0; r < N; ++r) status[r] &= kErrorBits;
    ProjFwd pa;
    pa.z = z; pa.w = w; pa.eps = eps; pa.T = 1.0;
    pa.out = f64 ? (void*)lpd.data() : (void*)lpf.data();
    pa.stats = pst.data(); pa.status = status.data();
    isa_generic::project_kl_forward_rows(pa, stats.data());
    auto lp = [&](int64_t r, int64_t i) { return f64 ? lpd[size_t(r * V + i)] : double(lpf[size_t(r * V + i)]); };
    for (int64_t r = 0; r < N; ++r) {
      if (status[r] != 0) { check(false, "projection status", V); continue; }
      double lw = -INFINITY, sw = 0, mass = 0, klv = 0;
      for (int64_t i = 0; i < V; ++i) lw = std::fmax(lw, wd[r * V + i]);
      for (int64_t i = 0; i < V; ++i) sw += std::exp(wd[r * V + i] - lw);
      for (int64_t i = 0; i < V; ++i) {
        const double l = lp(r, i);
        if (!(l > -INFINITY)) continue;
        const double pi = std::exp(l);
        mass += pi;
        klv += pi * (l - (wd[r * V + i] - lw - std::log(sw)));
      }
      const bool active = kl1[r] > eps;
      check(std::fabs(mass - 1.0) <= 1e-5, "projection normalised", V);
      check(active ? std::fabs(klv - eps) <= 1e-3 * eps : klv <= eps * (1 + 1e-3) + 1e-9, "projection constraint", V);
    }
    std::vector<T> pdz(size_t(N * V)), pdw(size_t(N * V));
    std::vector<double> pg(size_t(N * V));
    for (size_t i = 0; i < pg.size(); ++i) pg[i] = std::sin(double(i));
    ProjBwd pb;
    pb.z = z; pb.w = w; pb.T = 1.0; pb.stats = pst.data(); pb.g = pg.data();
    pb.dz = pdz.data(); pb.dw = pdw.data();
    isa_generic::project_kl_backward_rows(pb);
    for (size_t i = 0; i < pdz.size(); ++i)
      check(std::isfinite(simd::to_double(pdz[i])) && std::isfinite(simd::to_double(pdw[i])),
            "projection backward finite", V);
  }
  // TV projection: the exact TV kernel's statistics, then the log-mixture at lambda = 1/2 (rows
  // outside the ball) or 1 (every third row, inside): normalised rows at TV(pi~, pi_old) =
  // lambda TV; the backward's mixture part sums to 0 over each row, dL/dlam is finite.
  {
    PairFwd k;
    k.z = z; k.w = w; k.T = 1.0; k.op = PairOp::tv;
    k.out = out;
    k.stats = stats.data(); k.status = status.data();
    isa_generic::table.pair_fwd(k);
    std::vector<double> prm(size_t(N * kTvMixPrm));
    for (int64_t r = 0; r < N; ++r) {
      const double lam = r % 3 == 2 ? 1.0 : 0.5, lp = stats[size_t(r * kPairStats)], lq = stats[size_t(r * kPairStats + 1)];
      double* P = prm.data() + r * kTvMixPrm;
      P[0] = lp - std::log(lam);
      P[1] = lam < 1.0 ? lq - std::log1p(-lam) : INFINITY;
      P[2] = lp; P[3] = lq; P[4] = lam;
    }
    std::vector<double> md(size_t(N * V));
    std::vector<float> mf(size_t(N * V));
    TvMix m;
    m.z = z; m.w = w; m.T = 1.0; m.prm = prm.data();
    m.out = f64 ? (void*)md.data() : (void*)mf.data();
    isa_generic::project_tv_forward_rows(m);
    for (int64_t r = 0; r < N; ++r) {
      double lz = -INFINITY, lw = -INFINITY, sz = 0, sw = 0;
      for (int64_t i = 0; i < V; ++i) lz = std::fmax(lz, zd[r * V + i]), lw = std::fmax(lw, wd[r * V + i]);
      for (int64_t i = 0; i < V; ++i) sz += std::exp(zd[r * V + i] - lz), sw += std::exp(wd[r * V + i] - lw);
      double mass = 0, tvm = 0, tv0 = 0;
      for (int64_t i = 0; i < V; ++i) {
        const double l = f64 ? md[size_t(r * V + i)] : double(mf[size_t(r * V + i)]);
        const double pt = l > -INFINITY ? std::exp(l) : 0.0;
        const double p = std::exp(zd[r * V + i] - lz) / sz, q = std::exp(wd[r * V + i] - lw) / sw;
        mass += pt;
        tvm += 0.5 * std::fabs(pt - q);
        tv0 += 0.5 * std::fabs(p - q);
      }
      check(std::fabs(mass - 1.0) <= 1e-5, "TV projection normalised", V);
      check(std::fabs(tvm - prm[size_t(r * kTvMixPrm + 4)] * tv0) <= 1e-5, "TV projection distance", V);
    }
    std::vector<T> tdz(size_t(N * V)), tdw(size_t(N * V));
    std::vector<double> tg(size_t(N * V)), dlam(N);
    for (size_t i = 0; i < tg.size(); ++i) tg[i] = std::cos(double(i));
    m.g = tg.data(); m.dz = tdz.data(); m.dw = tdw.data(); m.dlam = dlam.data();
    isa_generic::project_tv_backward_rows(m);
    // The sum is (S1 + S2)(1 - sum p): 0 up to the normalisers' error (this driver takes them
    // from the 16/32-bit kernels, within 1e-5; Python passes float64 ones), plus the rounding
    // of each stored gradient to T (relative u).
    const double u = dt == DType::f64 ? 0x1p-52 : dt == DType::f32 ? 0x1p-23 : dt == DType::bf16 ? 0x1p-8 : 0x1p-11;
    const double nerr = f64 ? 1e-12 : 1e-5;
    for (int64_t r = 0; r < N; ++r) {
      double s = 0, sa = 0, sg = 0;
      bool fin = std::isfinite(dlam[r]);
      for (int64_t i = 0; i < V; ++i) {
        const double a = simd::to_double(tdz[r * V + i]), b = simd::to_double(tdw[r * V + i]);
        s += a + b;
        sa += std::fabs(a) + std::fabs(b);
        sg += std::fabs(tg[size_t(r * V + i)]);
        fin &= std::isfinite(a) && std::isfinite(b);
      }
      check(fin, "TV projection backward finite", V);
      check(std::fabs(s) <= u * sa + nerr * sg, "TV projection backward sums to 0 over the vocabulary", V);
    }
  }
  // The sparse projection's tail buckets (rows of z and w read as log-probabilities): the
  // copies, the log-masses and the tails' masses against double sums.
  {
    std::vector<double> tails(size_t(2 * N * (V + 1))), mass(size_t(2 * N));
    isa_generic::sparse_tail_rows(z, w, tails.data(), mass.data());
    for (int k = 0; k < 2; ++k)
      for (int64_t r = 0; r < N; ++r) {
        const std::vector<double>& xd = k ? wd : zd;
        const double* row = tails.data() + (k * N + r) * (V + 1);
        double mx = -INFINITY, sum = 0;
        for (int64_t i = 0; i < V; ++i) mx = std::fmax(mx, xd[size_t(r * V + i)]);
        for (int64_t i = 0; i < V; ++i) sum += std::exp(xd[size_t(r * V + i)] - mx);
        const double ref = mx + std::log(sum);
        bool same = true;
        for (int64_t i = 0; i < V; ++i) same &= row[i] == xd[size_t(r * V + i)];
        check(same, "sparse tails copy", V);
        check(std::fabs(mass[size_t(k * N + r)] - ref) <= 1e-12 * (1 + std::fabs(ref)), "sparse tails mass", V);
        check(std::fabs(std::exp(row[V]) - std::fmax(0.0, -std::expm1(ref))) <= 1e-12, "sparse tails tail", V);
      }
  }
  for (int op = 0; op < 4; ++op) {
    SingleFwd a;
    a.z = z; a.tokens = tokens.data(); a.T = 1.0; a.op = SingleOp(op);
    a.out0 = out; a.out1 = out1; a.stats = stats.data(); a.status = status.data();
    isa_generic::table.single_fwd(a);
    for (int64_t r = 0; r < N; ++r) check(status[r] == 0 && std::isfinite(get(r)), "single forward", V);
    std::vector<T> dz(size_t(N * V));
    std::vector<double> g(N, 1.0);
    SingleBwd b;
    b.z = z; b.tokens = tokens.data(); b.T = 1.0; b.op = SingleOp(op); b.stats = stats.data();
    b.g0 = g.data(); b.g1 = op == 3 ? g.data() : nullptr; b.dz = dz.data();
    isa_generic::table.single_bwd(b);
  }
}


// The element kernels on n entries of dtype T: k1/k2/k3 (with a mask, importance weighted or
// not) and binary_tv / binary_kl, values and gradients against plain double formulas.
template <class T>
void run_elements(DType dt, int64_t n, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> ud(-6.0, 0.0), nd(-1.5, 1.5);
  std::vector<T> s(static_cast<size_t>(n)), o(s.size()), b(s.size());
  std::vector<double> sd(s.size()), od(s.size()), bd(s.size());
  std::vector<uint8_t> valid(s.size());
  for (int64_t i = 0; i < n; ++i) {
    const double a = ud(rng);
    s[size_t(i)] = from_double<T>(a);
    o[size_t(i)] = from_double<T>(std::min(a + nd(rng), 0.0));
    b[size_t(i)] = from_double<T>(std::min(a + 0.1 * nd(rng), 0.0));
    sd[size_t(i)] = simd::to_double(s[size_t(i)]);
    od[size_t(i)] = simd::to_double(o[size_t(i)]);
    bd[size_t(i)] = simd::to_double(b[size_t(i)]);
    valid[size_t(i)] = (i % 5) != 2;
  }
  auto close = [](double got, double ref, double rtol) {
    if (std::isinf(ref)) return got == ref;  // q = 1 > p: binary_kl is +inf
    return std::fabs(got - ref) <= rtol * std::fabs(ref) + 1e-30;
  };
  std::vector<double> val(s.size()), g(s.size(), 1.0);
  std::vector<T> gs(s.size()), go(s.size()), gb(s.size());
  const double rt = dt == DType::f64 ? 1e-12 : 1e-2;  // 16-bit gradients round to a few 1e-3
  for (int kind = 1; kind <= 3; ++kind)
    for (int weighted = 0; weighted < 2; ++weighted) {
      KArgs a;
      a.s = s.data(); a.o = o.data(); a.b = weighted ? b.data() : nullptr; a.valid = valid.data();
      a.dtype = dt; a.n = n; a.value_kind = a.slope_kind = kind; a.value = val.data(); a.value64 = true;
      a.check = true; a.tol_s = a.tol_o = a.tol_b = 1e-3;
      int bad = 0;
      a.bad = &bad;
      isa_generic::k_estimate(a);
      check(bad == 0, "k_estimate: no bad entry", n);
      KBwdArgs w;
      w.s = s.data(); w.o = o.data(); w.b = a.b; w.valid = valid.data(); w.dtype = dt; w.n = n;
      w.value_kind = w.slope_kind = kind; w.g = g.data(); w.g64 = true;
      w.gs = gs.data(); w.go = go.data(); w.gb = weighted ? gb.data() : nullptr;
      isa_generic::k_estimate_backward(w);
      for (int64_t i = 0; i < n; ++i) {
        const double lr = od[size_t(i)] - sd[size_t(i)];
        double k3 = std::expm1(lr) - lr;  // cancels for small lr: there, its series
        if (std::fabs(lr) < 0.5) {
          double term = lr * lr / 2, sum = 0;
          for (int j = 3; j < 30; ++j) { sum += term; term *= lr / j; }
          k3 = sum;
        }
        const double k = kind == 1 ? -lr : kind == 2 ? 0.5 * lr * lr : k3;
        const double ks = kind == 1 ? -1.0 : kind == 2 ? lr : std::expm1(lr);
        const double wt = weighted ? std::exp(sd[size_t(i)] - bd[size_t(i)]) : 1.0;
        const bool v = valid[size_t(i)];
        check(close(val[size_t(i)], v ? wt * k : 0.0, 1e-12), "k_estimate value", n);
        check(close(simd::to_double(go[size_t(i)]), v ? wt * ks : 0.0, rt), "k_estimate d/do", n);
        if (!weighted) check(close(simd::to_double(gs[size_t(i)]), v ? -ks : 0.0, rt), "k_estimate d/ds", n);
      }
    }
  {
    // The mismatch diagnostics' sums against plain loops (k3 as above; the lanes' and chunks'
    // summation order moves the sums by a few 1e-16 relative).
    double out[6];
    MismatchArgs m;
    m.s = s.data(); m.o = o.data(); m.valid = valid.data(); m.dtype = dt; m.n = n; m.out = out;
    isa_generic::mismatch_sums(m);
    double hi = 0, k3s = 0, mx = -INFINITY, mabs = 0, s1 = 0, s2 = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!valid[size_t(i)]) continue;
      const double lr = od[size_t(i)] - sd[size_t(i)];
      double k3 = std::expm1(lr) - lr;
      if (std::fabs(lr) < 0.5) {
        double term = lr * lr / 2, sum = 0;
        for (int j = 3; j < 30; ++j) { sum += term; term *= lr / j; }
        k3 = sum;
      }
      hi += lr; k3s += k3; mx = std::max(mx, lr); mabs = std::max(mabs, std::fabs(lr));
    }
    for (int64_t i = 0; i < n; ++i)
      if (valid[size_t(i)]) {
        const double w = std::exp(od[size_t(i)] - sd[size_t(i)] - mx);
        s1 += w; s2 += w * w;
      }
    double habs = 0;
    for (int64_t i = 0; i < n; ++i)
      if (valid[size_t(i)]) habs += std::fabs(od[size_t(i)] - sd[size_t(i)]);
    check(std::fabs(out[0] - hi) <= 1e-12 * habs + 1e-300, "mismatch_sums: sum lr", n);
    check(close(out[1], k3s, 1e-12), "mismatch_sums: sum k3", n);
    check(out[2] == mx && out[3] == mabs, "mismatch_sums: maxima", n);
    check(close(out[4], s1, 1e-12) && close(out[5], s2, 1e-12), "mismatch_sums: exponential sums", n);
  }
  for (int kind = 0; kind <= 1; ++kind) {
    BinArgs a;
    a.lp = s.data(); a.lq = o.data(); a.dtype = dt; a.n = n; a.kind = kind; a.tol_p = a.tol_q = 1e-3;
    a.value = val.data(); a.value64 = true;
    int bad = 0;
    a.bad = &bad;
    isa_generic::binary_coarse(a);
    check(bad == 0, "binary_coarse: no bad entry", n);
    BinArgs w = a;
    w.value = nullptr; w.g = g.data(); w.g64 = true; w.gp = gs.data(); w.gq = go.data();
    isa_generic::binary_coarse(w);
    for (int64_t i = 0; i < n; ++i) {
      const double p = std::exp(sd[size_t(i)]), q = std::exp(od[size_t(i)]);
      const double ref = kind == 0 ? std::fabs(p - q) : p * std::log(p / q) + (1 - p) * std::log((1 - p) / (1 - q));
      const double gpr = kind == 0 ? (p > q ? p : -p) : p * (std::log((1 - q) / (1 - p)) - std::log(q / p));
      // plain formulas: the difference p - q and 1 - p cancel, so a loose relative tolerance
      // (the plain KL formula cancels where p ~ q: an absolute error of a few 1e-16 of its terms)
      check(close(val[size_t(i)], ref, 1e-6) || (kind == 1 && std::fabs(val[size_t(i)] - ref) < 1e-14),
            "binary value", n);
      check(close(simd::to_double(gs[size_t(i)]), p == q ? 0.0 : gpr, dt == DType::f64 ? 1e-6 : 1e-2), "binary d/dlp", n);
    }
  }
  // Top-K rows: K of K + 2 softmax probabilities, the last two in the tail.
  for (int64_t K : {int64_t(1), int64_t(5)}) {
    const int64_t rows = n / K > 0 ? n / K : 1;
    std::vector<T> zp(static_cast<size_t>(rows * K)), zq(zp.size()), dp(zp.size()), dq(zp.size());
    std::vector<double> pd(zp.size()), qd(zp.size()), vals(static_cast<size_t>(rows)), gr(static_cast<size_t>(rows), 1.0);
    std::vector<double> tail_p(static_cast<size_t>(rows)), tail_q(tail_p.size());
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> a(static_cast<size_t>(K + 2)), c(a.size());
      double sa = 0, sc = 0;
      for (size_t j = 0; j < a.size(); ++j) {
        a[j] = std::exp(nd(rng)); c[j] = a[j] * std::exp(0.2 * nd(rng));
        sa += a[j]; sc += c[j];
      }
      double kp = 0, kq = 0;
      for (int64_t j = 0; j < K; ++j) {
        const size_t i = static_cast<size_t>(r * K + j);
        zp[i] = from_double<T>(std::log(a[size_t(j)] / sa));
        zq[i] = from_double<T>(std::log(c[size_t(j)] / sc));
        pd[i] = std::exp(simd::to_double(zp[i]));
        qd[i] = std::exp(simd::to_double(zq[i]));
        kp += pd[i]; kq += qd[i];
      }
      tail_p[size_t(r)] = 1 - kp; tail_q[size_t(r)] = 1 - kq;
    }
    TopkArgs a;
    a.lp = zp.data(); a.lq = zq.data(); a.dtype = dt; a.rows = rows; a.K = K; a.kind = 0;
    a.tol_p = a.tol_q = 1e-3; a.value = vals.data(); a.value64 = true;
    int bad = 0;
    a.bad = &bad;
    isa_generic::topk_coarse(a);
    check(bad == 0, "topk_coarse: no bad row", n);
    for (int64_t r = 0; r < rows; ++r) {
      double s = std::fabs(tail_p[size_t(r)] - tail_q[size_t(r)]);
      for (int64_t j = 0; j < K; ++j) s += std::fabs(pd[size_t(r * K + j)] - qd[size_t(r * K + j)]);
      check(close(vals[size_t(r)], 0.5 * s, 1e-6), "topk_tv value", n);
    }
    TopkArgs w = a;
    w.value = nullptr; w.kind = 1; w.g = gr.data(); w.g64 = true; w.gp = dp.data(); w.gq = dq.data();
    isa_generic::topk_coarse(w);
    for (size_t i = 0; i < dp.size(); ++i)
      check(std::isfinite(simd::to_double(dp[i])) && std::isfinite(simd::to_double(dq[i])), "topk_kl gradient", n);
  }
}

// Top-K rows whose kept mass is within 1e-17 of 1 with two tokens at log(1/2) (float32): the
// kernel's double-double refinement of the log kept masses (values as mpmath: KL 8.3724497e-18,
// TV 1.9079592e-17), in a full lane group and a partial one, forward and backward.
void run_topk_refined() {
  const float p[4] = {-0.6931471824645996f, -0.6931471824645996f, -20.079490661621094f, -27.630691528320312f};
  const float q[4] = {-0.6931471824645996f, -0.6931471824645996f, -20.079490661621094f, -27.63071060180664f};
  for (int64_t rows : {int64_t(3), int64_t(11)}) {
    std::vector<float> zp(static_cast<size_t>(rows * 4)), zq(zp.size()), dp(zp.size()), dq(zp.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int j = 0; j < 4; ++j) {
        zp[size_t(r * 4 + j)] = p[j];
        zq[size_t(r * 4 + j)] = q[j];
      }
    std::vector<double> vals(static_cast<size_t>(rows)), g(vals.size(), 1.0);
    for (int kind = 0; kind <= 1; ++kind) {
      TopkArgs a;
      a.lp = zp.data(); a.lq = zq.data(); a.dtype = DType::f32; a.rows = rows; a.K = 4; a.kind = kind;
      a.tol_p = a.tol_q = 4.0 * 1.1920929e-07; a.value = vals.data(); a.value64 = true;
      int bad = 0;
      a.bad = &bad;
      isa_generic::topk_coarse(a);
      check(bad == 0, "topk refined: no bad row", rows);
      const double ref = kind == 0 ? 1.9079591791190665e-17 : 8.37244972123793e-18;
      for (int64_t r = 0; r < rows; ++r)
        check(std::fabs(vals[size_t(r)] - ref) <= 1e-5 * ref, "topk refined value", rows);
      TopkArgs w = a;
      w.value = nullptr; w.g = g.data(); w.g64 = true; w.gp = dp.data(); w.gq = dq.data();
      isa_generic::topk_coarse(w);
      for (size_t i = 0; i < dq.size(); ++i)
        check(std::isfinite(dp[i]) && std::isfinite(dq[i]), "topk refined gradient", rows);
      if (kind == 1) check(std::fabs(dq[0] + 0.32715699757816735) <= 1e-6, "topk refined d/dlq", rows);
    }
  }
}

// Peaked rows (one token with p = q ~ 1 - 1e-9): the pair backward's dominant-token entries (the
// other entries' sums per segment, combined across segments) for KL and JS; and a KL = +inf row
// (q = 0 < p at some tokens: the forward's extra pass for lse_p, the backward's NaN d/dz and its
// zero rows where the upstream gradient is 0).
template <class T>
void run_dominant(DType dt, int64_t V, std::mt19937_64& rng) {
  const int64_t N = 3;
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> zb(size_t(N * V)), wb(zb.size());
  for (int64_t r = 0; r < N; ++r)
    for (int64_t i = 0; i < V; ++i) {
      double a = nd(rng), b = a + 0.3 * nd(rng);
      if (i == (5 * r + 1) % V) { a += 30.0; b += 30.0; }   // the dominant token
      if (r == 2 && V > 4 && i % 5 == 4) b = -INFINITY;    // row 2: KL = +inf
      zb[size_t(r * V + i)] = from_double<T>(a);
      wb[size_t(r * V + i)] = from_double<T>(b);
    }
  View z;
  z.data = reinterpret_cast<const char*>(zb.data());
  z.dtype = dt; z.ndim = 2; z.shape[0] = N; z.shape[1] = V; z.strides[0] = V; z.strides[1] = 1;
  View w = z;
  w.data = reinterpret_cast<const char*>(wb.data());
  const bool f64 = dt == DType::f64;
  std::vector<double> outd(N), stats(N * kPairStats);
  std::vector<float> outf(N);
  std::vector<int> status(N);
  for (int op : {0, 2}) {
    PairFwd a;
    a.z = z; a.w = w; a.T = 1.0; a.op = PairOp(op);
    a.out = f64 ? (void*)outd.data() : (void*)outf.data();
    a.stats = stats.data(); a.status = status.data();
    isa_generic::table.pair_fwd(a);
    std::vector<T> dz(size_t(N * V)), dw(size_t(N * V));
    for (double g2 : {1.0, 0.0}) {
      std::vector<double> g = {1.0, -0.5, g2};
      PairBwd b;
      b.z = z; b.w = w; b.T = 1.0; b.op = a.op; b.stats = stats.data(); b.g = g.data();
      b.dz = dz.data(); b.dw = dw.data();
      isa_generic::table.pair_bwd(b);
      for (int64_t r = 0; r < N; ++r) {
        const bool inf_row = op == 0 && r == 2 && V > 4;
        double s = 0, mag = 0;
        bool nan_z = false;
        for (int64_t i = 0; i < V; ++i) {
          const double v = simd::to_double(dz[size_t(r * V + i)]);
          nan_z |= std::isnan(v);
          s += v;
          mag += std::fabs(v);
        }
        if (inf_row && g2 != 0.0) {
          check(nan_z, "KL = +inf row: NaN d/dz", V);
        } else if (inf_row) {
          check(s == 0.0 && mag == 0.0, "KL = +inf row, upstream 0: zero d/dz", V);
        } else {
          // the dominant entry is minus the others' sum (to the rounding of the stored entries)
          const double tol = (dt == DType::bf16 ? 1e-2 : dt == DType::f32 ? 1e-6 : 1e-12) * (mag + 1e-300);
          check(!nan_z && std::fabs(s) <= tol, "dominant row: d/dz sums to 0", V);
        }
      }
    }
  }
}

int main() {
  std::mt19937_64 rng(7);
  const int64_t seg = kSegment;
  const int64_t sizes[] = {1, 2, 3, 7, 8, 9, 33, 1000, seg - 1, seg, seg + 1, 2 * seg + 3};
  for (int nt : {1, 2}) {
    set_num_threads(nt);
    for (int64_t V : sizes) {
      for (int64_t N : {int64_t(1), int64_t(3), int64_t(11)}) {
        if (V > 1000 && N > 3) continue;
        int64_t vs = (V % 2) ? 3 : 1;
        run_case<float>(DType::f32, N, V, vs, rng);
        run_case<double>(DType::f64, N, V, vs, rng);
        run_case<simd::bf16_t>(DType::bf16, N, V, 1, rng);
        run_case<simd::f16_t>(DType::f16, N, V, vs, rng);
        if (V >= seg && N <= 3) {
          run_case<float>(DType::f32, N, V, vs, rng, true);
          run_case<double>(DType::f64, N, V, vs, rng, true);
          run_case<simd::bf16_t>(DType::bf16, N, V, 1, rng, true);
        }
      }
    }
  }
  for (int nt : {1, 2}) {
    set_num_threads(nt);
    for (int64_t n : {1, 3, 7, 8, 9, 100, 16383, 16384, 16385, 3 * 16384 + 5}) {
      run_elements<float>(DType::f32, n, rng);
      run_elements<double>(DType::f64, n, rng);
      run_elements<simd::bf16_t>(DType::bf16, n, rng);
      run_elements<simd::f16_t>(DType::f16, n, rng);
    }
  }
  for (int nt : {1, 2}) {
    set_num_threads(nt);
    run_topk_refined();
    for (int64_t V : {int64_t(3), int64_t(33), seg + 5, 2 * seg + 3}) {
      run_dominant<float>(DType::f32, V, rng);
      run_dominant<double>(DType::f64, V, rng);
      run_dominant<simd::bf16_t>(DType::bf16, V, rng);
    }
  }
  std::printf("core driver: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
