// exp(x) for x <= 0 and log(x) for x in [0.5, 1], written so that the compiler
// vectorises loops calling them
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

// log(x) for x in [0.5, 1] (1 - p of the classes with p <= 0.5), vectorisable:
// x = 2^e (1 + f) with e in {-1, 0} and f in [sqrt(1/2) - 1, sqrt(2) - 1], and
// Cephes' logf polynomial for log(1 + f) (about 1 ulp).
__attribute__((always_inline)) inline float log_half_to_one(float x) {
  const bool low = x < 0.70710678f;
  const float f = low ? x + x - 1.0f : x - 1.0f;
  const float e = low ? -1.0f : 0.0f;
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

inline double log_half_to_one(double x) { return std::log(x); }

}  // namespace apl_cpu
