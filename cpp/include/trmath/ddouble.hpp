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

// log in double-double: one Newton step y + (x e^-y - 1) from the double logarithm.
TRMATH_HD DD log(DD x) {
  double y = std::log(x.hi);
  DD t = mul(x, exp(DD{-y, 0.0}));
  return add(DD{y, 0.0}, add(t, DD{-1.0, 0.0}));
}

}  // namespace dd
}  // namespace trmath
