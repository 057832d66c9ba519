// trmath: double-double arithmetic (unevaluated sums hi + lo, ~106-bit significands), scalar.
//
// Used only where a result cancels beyond what double can carry: logsumexp of a float64 row
// of log-probabilities is ~1e-17 while M and log(sum) are ~10, so the sum must be known to
// ~1e-29. Rows that need it are detected and recomputed here; everything else never pays.
#pragma once

#include <cmath>
#include <cstdint>

#include "trmath/config.hpp"

namespace trmath {
namespace dd {

struct DD {
  double hi, lo;
};

TRMATH_HD DD two_sum(double a, double b) {
  double s = a + b, bb = s - a;
  return {s, (a - (s - bb)) + (b - bb)};
}
TRMATH_HD DD quick(double a, double b) {
  double s = a + b;
  return {s, b - (s - a)};
}
TRMATH_HD DD add(DD a, DD b) {
  DD s = two_sum(a.hi, b.hi);
  DD t = two_sum(a.lo, b.lo);
  s.lo += t.hi;
  s = quick(s.hi, s.lo);
  s.lo += t.lo;
  return quick(s.hi, s.lo);
}
TRMATH_HD DD mul(DD a, DD b) {
  double p = a.hi * b.hi;
  double e = std::fma(a.hi, b.hi, -p);
  e += a.hi * b.lo + a.lo * b.hi;
  return quick(p, e);
}
TRMATH_HD DD mul(DD a, double b) { return mul(a, DD{b, 0.0}); }
TRMATH_HD DD div(DD a, double b) {
  double q1 = a.hi / b;
  DD r = add(a, mul(DD{q1, 0.0}, -b));
  double q2 = r.hi / b;
  r = add(r, mul(DD{q2, 0.0}, -b));
  double q3 = r.hi / b;
  DD q = quick(q1, q2);
  return add(q, DD{q3, 0.0});
}
TRMATH_HD DD neg(DD a) { return {-a.hi, -a.lo}; }

// exp in double-double for a.hi in [-745, 709]: 2^n e^r, Taylor to r^27 on |r| <= ln2/2.
TRMATH_HD DD exp(DD a) {
  const DD ln2{0.6931471805599452862, 2.319046813846299558e-17};
  if (a.hi < -745.5) return {0.0, 0.0};
  double n = std::nearbyint(a.hi / ln2.hi);
  DD r = add(a, neg(mul(ln2, n)));
#if defined(__CUDA_ARCH__)
  // Device: the series summed forward (terms r^k / k! formed as it goes); |r| <= ln2/2.
  DD p{1.0, 0.0}, term{1.0, 0.0};
  for (int k = 1; k < 28; ++k) {
    term = div(mul(term, r), double(k));
    p = add(p, term);
  }
#else
  // coefficients 1/k! in double-double
  static const auto coef = [] {
    struct C { DD c[28]; } t;
    t.c[0] = {1.0, 0.0};
    for (int k = 1; k < 28; ++k) t.c[k] = div(t.c[k - 1], double(k));
    return t;
  }();
  DD p = coef.c[27];
  for (int k = 26; k >= 0; --k) p = add(mul(p, r), coef.c[k]);
#endif
  int e = int(n);
  return {std::ldexp(p.hi, e), std::ldexp(p.lo, e)};
}

// e^a - 1 in double-double, relatively accurate for small |a| too: for |a.hi| < 1/2 the Taylor
// series without its leading 1 (to a^27 / 27!), else exp(a) - 1 (which cancels at most 2.6x).
TRMATH_HD DD expm1(DD a) {
  if (!(std::fabs(a.hi) < 0.5)) return add(exp(a), DD{-1.0, 0.0});
  DD p = a, term = a;
  for (int k = 2; k < 28; ++k) {
    term = div(mul(term, a), double(k));
    p = add(p, term);
  }
  return p;
}

// log(1 + u) in double-double for u > -1: one Newton step from the double y = log1p(u),
// y + (u e^-y + expm1(-y)), whose residual is formed to ~1e-32 of u and of y rather than of 1,
// so a small u keeps its relative accuracy (log(1 + u) with 1 + u rounded first would not).
TRMATH_HD DD log1p(DD u) {
  const double y = std::log1p(u.hi + u.lo);
  const DD em = expm1(DD{-y, 0.0});
  return add(DD{y, 0.0}, add(mul(u, add(em, DD{1.0, 0.0})), em));
}

// log in double-double: one Newton step y + (x e^-y - 1) from the double logarithm y; near 1
// (|x - 1| < 1/2) through log1p of x - 1 (exact).
TRMATH_HD DD log(DD x) {
  const DD u = add(x, DD{-1.0, 0.0});
  if (std::fabs(u.hi) < 0.5) return log1p(u);
  double y = std::log(x.hi);
  DD t = mul(x, exp(DD{-y, 0.0}));
  return add(DD{y, 0.0}, add(t, DD{-1.0, 0.0}));
}

// log(k + s): a count k >= 1 of terms equal to 1 (the row's maxima) and the double-double sum
// s >= 0 of the others, as log k + log1p(s / k). A logsumexp of float64 log-probabilities
// summing to 1 - 1e-26 is M + log(1 + s) with s ~ -M ~ 1e-9: s must keep its own ~1e-32
// relative accuracy, which it would lose rounded next to 1 as one sum k + s.
TRMATH_HD DD log_count_plus(double k, DD s) {
  if (!(k >= 1.0)) return log(s);  // (no term counted: the plain double-double log)
  const DD l1 = log1p(k == 1.0 ? s : div(s, k));
  return k == 1.0 ? l1 : add(log(DD{k, 0.0}), l1);
}

}  // namespace dd
}  // namespace trmath
