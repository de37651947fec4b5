// exp(x) for x <= 0, log(x) for normal x > 0 and the power of a probability,
// written so that the compiler vectorises loops calling them
// (libm's expf is an opaque call that stops vectorisation without -ffast-math).
//
// The kernel only takes exp of z - max(z) <= 0; rows holding NaN or +inf are
// handled before, so x is never NaN here.  x = -inf (a masked class) gives 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace apl_cpu {

// float: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and the minimax
// polynomial of Cephes' expf (about 1 ulp); 2^n is built in the exponent bits.
__attribute__((always_inline)) inline float exp_nonpos(float x) {
  // Below this the result is subnormal; 0 is within any tolerance of it and
  // keeps 2^n a normal float.
  const bool underflow = x < -87.0f;
  const float xs = underflow ? 0.0f : x;
  // n = round(xs / ln2) by the 1.5 * 2^23 shifter: no float -> int -> float
  // round trip, which GCC turns into a .TRUNC call under AVX (roundps) that
  // stops if-conversion, so that the loops did not vectorise for AVX2.
  const float shifted = xs * 1.44269504088896341f + 12582912.0f;
  const float nf = shifted - 12582912.0f;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  const int n = shifted_bits - 0x4B400000;
  const float r = (xs - nf * 0.693359375f) - nf * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float e_r = poly * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : e_r * scale;
}

// fp64 is the precise path, not the fast one.  (always_inline above: the kernel's
// translation unit is large enough that GCC would otherwise call these per element.)
inline double exp_nonpos(double x) { return std::exp(x); }

// log(x) for normal x > 0: x = 2^n m with m in [sqrt(1/2), sqrt(2)), and
// Cephes' logf polynomial for log(m) = log(1 + f) (about 1 ulp).  Subtracting
// the bits of sqrt(1/2) leaves n in the exponent field; no float -> int
// conversion, so the loops stay vectorisable (see exp_nonpos).
__attribute__((always_inline)) inline float log_normal(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int32_t n = (bits - 0x3F3504F3) >> 23;
  const int32_t m_bits = bits - n * (1 << 23);
  float m;
  std::memcpy(&m, &m_bits, sizeof(m));
  const float f = m - 1.0f;
  const float e = static_cast<float>(n);
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return (f + y) + e * 0.693359375f;
}

inline double log_normal(double x) { return std::log(x); }

// x^y for x in (0, 1] and y >= 0: the (1 - p)^gamma of the focal terms and the
// p^q of the ngce terms.  A zero or subnormal x gives a finite wrong value,
// which the callers mask (clamped classes carry no p^q).
__attribute__((always_inline)) inline float pow_unit(float x, float y) { return exp_nonpos(y * log_normal(x)); }

inline double pow_unit(double x, double y) { return std::pow(x, y); }

// pow_unit as the functor the shared math takes for its ngce terms.
struct UnitPow {
  __attribute__((always_inline)) float operator()(float x, float y) const { return pow_unit(x, y); }
  double operator()(double x, double y) const { return pow_unit(x, y); }
};

}  // namespace apl_cpu
