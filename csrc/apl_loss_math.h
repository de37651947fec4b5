// The loss math of every term, once, for the CPU and the CUDA kernels.
//
// All functions are __host__ __device__ and work in the accumulation type T
// (float for fp16/bf16/fp32 logits, double for fp64).  A kernel streams each
// row through three steps:
//
//   1. SoftmaxStats   max, sum exp(z - max) and sum (z - max)    (needs nothing)
//   2. NormalizerSums sums over k that need log p_k = log_prob(z_k, ...)  (only if needs_second_pass)
//   3. finish_row     the row's loss and the coefficients of its gradient;
//      grad_element   d loss / d z_j for every j.
//
// Gradient.  With l = log p, each term's derivative with respect to l_k has
// the form  g_k = c_const + c_focal f'(l_k) + c_pow m_k p_k^q + [k != y] c_prob m_k p_k + c_sq p_k^2
//                 + n_k (c_neg + c_neg_focal f'(l_k)) + [k == y] c_target,
// where m_k = [P_MIN <= p_k <= 1] and n_k = [p_k >= min_prob] (clamped entries
// get zero gradient) and f' is the derivative of f(l) = -(1-p)^gamma l (a
// constant focal factor in the official mode).  Terms of p_y alone (ce, fl,
// gce, mae, ece, taylor, agce, aul, ael) only have c_target.  Through the
// log-softmax, d loss / d z_j = g_j - p_j sum_k g_k.
//
// Adding a term: its code in APL_*_TERMS, the sums it needs in NormalizerSums
// (if any) and needs_second_pass, its loss and coefficients in finish_row.
// The per-term coefficients (derived in the comments of finish_row) are summed,
// weighted by alpha and beta, into one GradCoefs.  Kernels that merge partial
// NormalizerSums must merge every field (merge() does).
//
// Codes and defaults match apl_kernels/spec.py.
#pragma once

#include <math.h>
#include <stdint.h>

#include "apl_terms.h"

#if defined(__CUDACC__) || defined(__HIPCC__)
#define APL_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// The CPU kernel's vector loops need these inlined; a huge translation unit
// (torch's headers) can exhaust the inliner's budget for plain `inline`.
#define APL_HD inline __attribute__((always_inline))
#else
#define APL_HD inline
#endif

namespace apl {

// The LossSpec of apl_kernels/spec.py, as the op passes it.
struct LossParams {
  int active;
  int passive;
  double alpha, beta, gamma, q, A;
  int grad_mode;
  double a;         // agce, aul, ael, amse
  double m;         // ece
  int t;            // taylor order
  double min_prob;  // nnce, nnfl clamp
  double neg_A;     // derived (negative_constant): the A of nnce or nnfl
};

constexpr int kMaxTaylorOrder = 1000;  // spec.py's MAX_TAYLOR_ORDER

// Math overloads that resolve to the float or double routine on host and device.
// CUDA kernels may define APL_CUDA_FAST_EXP: float exp, pow and 1 - exp then run
// on the GPU's MUFU unit (below; a few ulp, as Triton's tl.exp).  Host code and
// double are unaffected.  APL_EMULATE_GPU_MATH (defined by the CPU emulator of the
// CUDA kernels, python_tests/cuda_emu/emu_build.py) selects the same device form
// without __CUDA_ARCH__, so that the emulator runs the algebra the GPU runs.
#if (defined(__CUDA_ARCH__) || defined(APL_EMULATE_GPU_MATH)) && defined(APL_CUDA_FAST_EXP)
#define APL_CUDA_FAST_MATH 1
#if defined(__CUDA_ARCH__)
// ex2 / lg2 / sqrt .approx.ftz: one MUFU instruction each; without .ftz nvcc adds
// a range test and two fix-ups per call (subnormal results are flushed to 0, far
// below any tolerance: p < 2^-126).
__device__ __forceinline__ float apl_ex2_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float apl_lg2_ftz(float x) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float apl_sqrt_ftz(float x) {
  float r;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
#else
// The emulator's stand-ins: the correctly rounded libm functions, with .ftz's flush of
// subnormal inputs and results to a zero of the same sign.  Only MUFU's approximation
// error (a few ulp) is left to a GPU run.
inline float apl_flush_subnormal(float x) { return fabsf(x) < 1.17549435e-38f ? copysignf(0.0f, x) : x; }
inline float apl_ex2_ftz(float x) { return apl_flush_subnormal(exp2f(apl_flush_subnormal(x))); }
// (log2 and the root of a normal float are never subnormal)
inline float apl_lg2_ftz(float x) { return log2f(apl_flush_subnormal(x)); }
inline float apl_sqrt_ftz(float x) { return sqrtf(apl_flush_subnormal(x)); }
#endif
#endif

APL_HD float apl_exp(float x) {
#ifdef APL_CUDA_FAST_MATH
  return apl_ex2_ftz(x * 1.44269504088896341f);  // e^x = 2^(x log2 e)
#else
  return expf(x);
#endif
}
APL_HD double apl_exp(double x) { return exp(x); }
APL_HD float apl_log(float x) { return logf(x); }
APL_HD double apl_log(double x) { return log(x); }
APL_HD float apl_expm1(float x) { return expm1f(x); }
APL_HD double apl_expm1(double x) { return expm1(x); }
APL_HD float apl_log1p(float x) { return log1pf(x); }
APL_HD double apl_log1p(double x) { return log1p(x); }
// x^y for x >= 0 (every caller's case).  GPU: 2^(y lg2 x), and sqrt for y = 1/2
// (the default gamma of the focal terms).
APL_HD float apl_pow(float x, float y) {
#ifdef APL_CUDA_FAST_MATH
  if (y == 0.5f) return apl_sqrt_ftz(x);
  return y == 0.0f ? 1.0f : apl_ex2_ftz(y * apl_lg2_ftz(x));  // 0^0 = 1, not 2^(0 * -inf)
#else
  return powf(x, y);
#endif
}
APL_HD double apl_pow(double x, double y) { return pow(x, y); }

// exp(z - shift) for every z of a row as 2^(z log2 e - c): one FFMA and one MUFU.EX2 per
// element on the GPU (exp(z - shift) alone is FADD, FMUL and MUFU.EX2).  c = shift log2 e
// rounded to float, and its rounding error r = shift log2 e - c (exact: an FMA) scales every
// value of the row by the same 2^r: `unscale` = 2^-r, applied where a sum or a coefficient
// of the row is formed, takes it back (once per row, not per element).  log p comes from
// the same argument t: log_p(t, log_offset(log_sum)) = (z - shift) - log_sum.
// Host: exp(z - shift), unscale = 1 (the CPU emulator of the CUDA kernels runs the GPU form).
struct ShiftedExp2 {
  float c = 0, r = 0, unscale = 1;
  APL_HD explicit ShiftedExp2(float shift) {
#ifdef APL_CUDA_FAST_MATH
    c = shift * 1.44269504088896341f;
    r = fmaf(shift, 1.44269504088896341f, -c);
    unscale = apl_ex2_ftz(-r);
#else
    c = shift;
#endif
  }
  // The argument of the exp of z.
  APL_HD float arg(float z) const {
#ifdef APL_CUDA_FAST_MATH
    return fmaf(z, 1.44269504088896341f, -c);
#else
    return z - c;
#endif
  }
  // exp(z - shift) / unscale from arg(z).
  APL_HD float exp_of(float t) const {
#ifdef APL_CUDA_FAST_MATH
    return apl_ex2_ftz(t);
#else
    return expf(t);
#endif
  }
  APL_HD float operator()(float z) const { return exp_of(arg(z)); }
  // The per-row constant of log_p for a row's log sum exp(z - shift).
  APL_HD float log_offset(float log_sum) const {
#ifdef APL_CUDA_FAST_MATH
    return fmaf(r, 0.693147180559945309f, log_sum);
#else
    return log_sum;
#endif
  }
  // log2 of exp_of(t).
  APL_HD float log2_of(float t) const {
#ifdef APL_CUDA_FAST_MATH
    return t;
#else
    return t * 1.44269504088896341f;
#endif
  }
  // 2^x (the powers p^q = 2^(q log2 p) of a row, from log2_of).
  APL_HD static float exp2(float x) {
#ifdef APL_CUDA_FAST_MATH
    return apl_ex2_ftz(x);
#else
    return exp2f(x);
#endif
  }
  // sum (z - shift) of n values from the sum of their arg(z).
  APL_HD float shifted_sum(float sum_arg, float n) const {
#ifdef APL_CUDA_FAST_MATH
    return (sum_arg - n * r) * 0.693147180559945309f;
#else
    (void)n;
    return sum_arg;
#endif
  }
  // (z - shift) - log_sum from t = arg(z) and k = log_offset(log_sum).
  APL_HD float log_p(float t, float k) const {
#ifdef APL_CUDA_FAST_MATH
    return fmaf(t, 0.693147180559945309f, -k);
#else
    return t - k;
#endif
  }
};

// 1 - p for p = exp(log_p), without cancellation.  GPU: 1 - p while p < 1/2
// (exact to a rounding there; at most one class of a row has p >= 1/2), expm1 above.
APL_HD float apl_one_minus_exp(float log_p, float p) {
#ifdef APL_CUDA_FAST_MATH
  if (p < 0.5f) return 1.0f - p;
#endif
  (void)p;
  return -apl_expm1(log_p);
}
APL_HD double apl_one_minus_exp(double log_p, double) { return -apl_expm1(log_p); }

// The x^y of the ngce terms (x a probability, y = q).  Kernels with their own
// vector math pass another functor in its place.
struct LibmPow {
  template <typename T>
  APL_HD T operator()(T x, T y) const {
    return apl_pow(x, y);
  }
};

// max that propagates NaN, so that a NaN logit poisons its row.
template <typename T>
APL_HD T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// ---------------------------------------------------------------- step 1
// Online max / sum-exp, and sum (z - max) for the NCE normaliser: from logits
// shifted by their max, so that an offset common to the row cancels exactly
// (sum z - K lse lost its digits to it).
template <typename T>
struct SoftmaxStats {
  T max = -INFINITY;
  T sumexp = 0;
  T sum_shifted = 0;  // sum_k (z_k - max); -inf if a z_k is -inf
  T count = 0;        // logits added

  // sum_shifted relative to new_max >= max.
  APL_HD T shifted_to(T new_max) const {
    return (max == -INFINITY || new_max == max) ? sum_shifted : sum_shifted - count * (new_max - max);
  }

  APL_HD void add(T z) {
    const T new_max = nan_max(max, z);
    sum_shifted = shifted_to(new_max) + (z == -INFINITY ? T(-INFINITY) : z - new_max);
    count += T(1);
    // Guard -inf - -inf: while every logit so far is -inf the sum stays 0.
    if (new_max == -INFINITY) return;
    sumexp = sumexp * apl_exp(max - new_max) + apl_exp(z - new_max);
    max = new_max;
  }

  // One logit of a row whose max is already known (max set before): no rescaling.
  APL_HD void add_known_max(T z) {
    sum_shifted += z == -INFINITY ? T(-INFINITY) : z - max;
    count += T(1);
    if (max != -INFINITY) sumexp += apl_exp(z - max);
  }

  // add_known_max with its test of max hoisted out of the row's loop: `shift` is
  // max, or 0 when max is -inf (then every z is -inf: exp(z) adds 0 and z - 0 is
  // -inf, as add_known_max gives).  kShifted = false skips sum_shifted and count
  // (read by the NCE normaliser only).
  template <bool kShifted = true>
  APL_HD void add_with_shift(T z, T shift) {
    if (kShifted) {
      sum_shifted += z - shift;
      count += T(1);
    }
    sumexp += apl_exp(z - shift);
  }

  APL_HD void merge(const SoftmaxStats& o) {
    const T new_max = nan_max(max, o.max);
    sum_shifted = shifted_to(new_max) + o.shifted_to(new_max);
    count += o.count;
    if (new_max == -INFINITY) return;
    sumexp = sumexp * apl_exp(max - new_max) + o.sumexp * apl_exp(o.max - new_max);
    max = new_max;
  }

  // An all -inf row has no softmax: log(0) - inf -> NaN, as torch gives.
  APL_HD T lse() const { return max == -INFINITY ? T(NAN) : max + apl_log(sumexp); }
  APL_HD T log_sum() const { return max == -INFINITY ? T(NAN) : apl_log(sumexp); }
};

// log p = (z - max) - log sum exp(z - max), as torch's log_softmax computes it:
// z - lse would round lse to the precision of max (1e4 + 0.69 in fp32 is off by 5e-4).
template <typename T>
APL_HD T log_prob(T z, T max, T log_sum) {
  return (z - max) - log_sum;
}

// ---------------------------------------------------------------- focal factor
// w = (1 - p)^gamma, computed from log p without cancellation.
template <typename T>
APL_HD T focal_weight(T log_p, T gamma) {
  return apl_pow(-apl_expm1(log_p), gamma);
}

// f(l) = -(1 - p)^gamma * l, the focal loss of one class.
template <typename T>
APL_HD T focal_value(T log_p, T gamma) {
  return -focal_weight(log_p, gamma) * log_p;
}

// f'(l).  Official: -(1-p)^gamma (the factor is a constant).  Exact:
// -(1-p)^gamma + gamma (1-p)^gamma p l / (1-p), whose limit as p -> 1 is 0
// because l / (1-p) -> -1; at p = 0 the second part is 0 even when l = -inf.
// `p` and `one_minus_p` are exp(l) and -expm1(l), passed in by callers that have them.
template <typename T>
APL_HD T focal_deriv_from(T log_p, T p, T one_minus_p, T w, T gamma, int grad_mode) {
  if (grad_mode == kOfficial) return -w;
  if (p == T(0)) return -w;
  const T l_over_one_minus_p = one_minus_p > T(0) ? log_p / one_minus_p : T(-1);
  return -w + gamma * w * p * l_over_one_minus_p;
}

template <typename T>
APL_HD T focal_deriv(T log_p, T gamma, int grad_mode) {
  const T p = apl_exp(log_p);
  const T one_minus_p = apl_one_minus_exp(log_p, p);
  return focal_deriv_from(log_p, p, one_minus_p, apl_pow(one_minus_p, gamma), gamma, grad_mode);
}

// f(l) and f'(l) of one class with one pow: what the nfl normaliser pass needs.
template <typename T>
struct FocalTerms {
  T value, deriv;
};

// From 1 - p and w = (1 - p)^gamma, for kernels with their own vector math.
template <typename T>
APL_HD FocalTerms<T> focal_terms_from(T log_p, T p, T one_minus_p, T w, T gamma, int grad_mode) {
  return {-w * log_p, focal_deriv_from(log_p, p, one_minus_p, w, gamma, grad_mode)};
}

template <typename T>
APL_HD FocalTerms<T> focal_terms(T log_p, T p, T gamma, int grad_mode) {
  const T one_minus_p = apl_one_minus_exp(log_p, p);
  return focal_terms_from(log_p, p, one_minus_p, apl_pow(one_minus_p, gamma), gamma, grad_mode);
}

// [P_MIN <= p <= 1]: entries that clamp() leaves unchanged, the only ones with a gradient.
template <typename T>
APL_HD bool unclamped(T p) {
  return p >= T(kPMin) && p <= T(1);
}

// [p >= min_prob]: the classes that the clamps of nnce and nnfl leave unchanged.
template <typename T>
APL_HD bool above_min_prob(T p, const LossParams& P) {
  return p >= T(P.min_prob);
}

template <typename T>
APL_HD T clamp_prob(T p) {
  return p < T(kPMin) ? T(kPMin) : (p > T(1) ? T(1) : p);
}

// unclamped(p_k) for p_k = e_k / S with e_k = exp(z_k - max) <= 1 and S = sum_k e_k:
// e_k >= live_threshold(S).  Lets a kernel that kept e_k classify it without forming p_k.
template <typename T>
APL_HD T live_threshold(T sumexp) {
  return T(kPMin) * sumexp;
}

// ---------------------------------------------------------------- step 2
APL_HD bool needs_second_pass(const LossParams& P) {
  return P.active == kNFL || P.active == kNGCE || P.active == kECE || P.passive == kRCE || P.passive == kNRCE ||
         P.passive == kNNCE || P.passive == kNNFL || P.passive == kAMSE;
}

// The A of the negative terms: nnce's -log min_prob, nnfl's -(1 - min_prob)^gamma
// log min_prob, the value of a clamped class (so clamped classes add exactly 0
// to their sums A - ...).  Computed once on the host into LossParams::neg_A.
inline double negative_constant(int passive, double gamma, double min_prob) {
  if (passive == kNNCE) return -log(min_prob);
  if (passive == kNNFL) return -pow(1.0 - min_prob, gamma) * log(min_prob);
  return 0.0;
}

// ece's label is the argmax (the first index of the largest p, as torch.argmax)
// iff z_y = max z and no class before it reaches the max.
template <typename T>
APL_HD bool ties_before_label(T z, int64_t k, int64_t y, T max) {
  return k < y && z == max;
}

template <typename T>
struct NormalizerSums {
  T focal = 0;         // sum_k f(l_k)                       nfl normaliser
  T focal_deriv = 0;   // sum_k f'(l_k)                      nfl gradient
  T clamp_pow = 0;     // sum_k clamp(p_k)^q                 ngce normaliser
  T live_pow = 0;      // sum_k m_k p_k^q                    ngce gradient
  T clamp_other = 0;   // sum_{k != y} clamp(p_k)            rce, nrce
  T live_other = 0;    // sum_{k != y} m_k p_k               rce, nrce gradient
  T dead_other = 0;    // sum_{k != y} (1 - m_k) p_k         rce, nrce gradient: 1 - live_other = p_y + dead_other
  T sq_other = 0;      // sum_{k != y} p_k^2                 amse
  T neg_other = 0;     // sum_{k != y} n_k h_k               nnce (h = A + l), nnfl (h = A - f(l)) normaliser
  T neg_live = 0;      // sum_{k != y} n_k                   nnce gradient
  T neg_deriv = 0;     // sum_{k != y} n_k f'(l_k)           nnfl gradient
  T ties = 0;          // #{k < y : z_k = max}               ece (ties_before_label)

  // The nfl sums, from focal_terms() of one class.
  APL_HD void add_focal(const FocalTerms<T>& f) {
    focal += f.value;
    focal_deriv += f.deriv;
  }

  // The ngce, rce and nrce sums, from p = exp(log p) of one class.
  // Selects, then plain sums: the CPU kernel's vectoriser needs this form.
  template <typename Pow = LibmPow>
  APL_HD void add_prob(T p, bool is_target, const LossParams& P, Pow pow = Pow()) {
    const bool live = unclamped(p);
    if (P.active == kNGCE) {
      const T pq = pow(clamp_prob(p), T(P.q));
      const T live_pq = live ? pq : T(0);
      clamp_pow += pq;
      live_pow += live_pq;
    }
    if ((P.passive == kRCE || P.passive == kNRCE) && !is_target) {
      const T live_p = live ? p : T(0), dead_p = live ? T(0) : p;
      clamp_other += clamp_prob(p);
      live_other += live_p;
      dead_other += dead_p;
    }
  }

  // The rce / nrce sums of many classes k != y at once, from their e_k = p_k S
  // split at live_threshold(S): the sum of the live e_k, of the dead e_k, and
  // how many are dead (each of those counts P_MIN in clamp_other).
  APL_HD void add_other_unnormalised(T live_e, T dead_e, T n_dead, T inv_sumexp) {
    live_other += live_e * inv_sumexp;
    dead_other += dead_e * inv_sumexp;
    clamp_other += live_e * inv_sumexp + T(kPMin) * n_dead;
  }

  // The amse, nnce and nnfl sums of one class k != y; `live` = above_min_prob(p).
  // f: focal_terms() of the class (read by nnfl only).
  APL_HD void add_other(T log_p, T p, bool live, const FocalTerms<T>& f, const LossParams& P) {
    if (P.passive == kAMSE) sq_other += p * p;
    if (P.passive == kNNCE) {
      neg_other += live ? T(P.neg_A) + log_p : T(0);
      neg_live += live ? T(1) : T(0);
    }
    if (P.passive == kNNFL) {
      neg_other += live ? T(P.neg_A) - f.value : T(0);
      neg_deriv += live ? f.deriv : T(0);
    }
  }

  // One class k of a row with label y, from its logit, the row's max and
  // log sum exp(z - max).
  APL_HD void add(T z, int64_t k, int64_t y, T max, T log_sum, const LossParams& P) {
    add_flagged(z, k == y, k < y, max, log_sum, P);
  }

  // The same with the label's position given: is_target = [k == y], before_label = [k < y].
  APL_HD void add_flagged(T z, bool is_target, bool before_label, T max, T log_sum, const LossParams& P) {
    const T log_p = log_prob(z, max, log_sum);
    const T p = apl_exp(log_p);
    FocalTerms<T> f{T(0), T(0)};
    if (P.active == kNFL || P.passive == kNNFL) f = focal_terms(log_p, p, T(P.gamma), P.grad_mode);
    if (P.active == kNFL) add_focal(f);
    if (P.active == kNGCE || P.passive == kRCE || P.passive == kNRCE) add_prob(p, is_target, P);
    if (!is_target) add_other(log_p, p, above_min_prob(p, P), f, P);
    if (P.active == kECE && before_label && z == max) ties += T(1);  // ties_before_label
  }

  APL_HD void merge(const NormalizerSums& o) {
    focal += o.focal;
    focal_deriv += o.focal_deriv;
    clamp_pow += o.clamp_pow;
    live_pow += o.live_pow;
    clamp_other += o.clamp_other;
    live_other += o.live_other;
    dead_other += o.dead_other;
    sq_other += o.sq_other;
    neg_other += o.neg_other;
    neg_live += o.neg_live;
    neg_deriv += o.neg_deriv;
    ties += o.ties;
  }
};

// ---------------------------------------------------------------- step 3
template <typename T>
struct GradCoefs {
  T lse;
  T max, log_sum;  // the row's max and log sum exp(z - max): log p = log_prob(z, max, log_sum)
  T c_const = 0, c_focal = 0, c_pow = 0, c_prob = 0, c_target = 0;
  T c_sq = 0;         // of p_k^2 (amse)
  T c_neg = 0;        // of n_k (nnce)
  T c_neg_focal = 0;  // of n_k f'(l_k) (nnfl)
  T g_sum = 0;  // sum_k g_k
  // c_prob - g_sum, the factor of p_k for every unclamped k != y.  rce makes the
  // two nearly equal when p_y is small (1 - live_other); p_coef is computed
  // from p_y + dead_other instead, so the gradient keeps its relative accuracy.
  T p_coef = 0;
};

template <typename T>
struct RowResult {
  T loss;
  GradCoefs<T> grad;  // already multiplied by the row's reduction weight
};

// ece's clamp of p'_y (spec.py ECE_EPS).
constexpr double kEceEps = 1e-8;

// The loss of a row with label y and its gradient coefficients.  `weight` is
// the reduction's factor of this row's gradient (1, or 1/count for mean).
// Each term adds its value and its g_k coefficients (weighted by alpha or
// beta) and its share of g_sum = sum_k g_k.  u = 1 - p_y is taken from expm1,
// so that terms of 1 - p_y keep their accuracy as p_y -> 1.
template <typename T>
APL_HD RowResult<T> finish_row(const SoftmaxStats<T>& s, const NormalizerSums<T>& n, T z_target, int64_t K,
                               const LossParams& P, T weight) {
  RowResult<T> r;
  GradCoefs<T>& c = r.grad;
  c.lse = s.lse();
  c.max = s.max;
  c.log_sum = s.log_sum();
  const T l_y = log_prob(z_target, c.max, c.log_sum);
  const T p_y = apl_exp(l_y);
  // Only for the terms that read it: expm1 costs a CPU row of few classes as much as the rest of it.
  const bool reads_u = P.active == kECE || P.active == kTaylor || P.passive == kMAE || P.passive == kNMAE ||
                       P.passive == kAGCE || P.passive == kAUL || P.passive == kAMSE;
  const T one_minus_p_y = reads_u ? -apl_expm1(l_y) : T(0);
  const T u = one_minus_p_y;
  const T gamma = T(P.gamma), q = T(P.q), a = T(P.a), Kf = T(K);
  const T alpha = T(P.alpha) * weight, beta = T(P.beta) * weight;
  const bool live_y = unclamped(p_y);
  T active = 0, passive = 0;
  // A term of p_y alone: g_k = [k=y] d, d = dL/dl_y.
  auto label_only = [&](T w, T d) {
    c.c_target += w * d;
    c.g_sum += w * d;
  };

  switch (P.active) {
    case kCE:  // -l_y;  g_k = -[k=y]
      active = -l_y;
      label_only(alpha, T(-1));
      break;
    case kFL:  // f(l_y);  g_k = [k=y] f'(l_y)
      active = focal_value(l_y, gamma);
      label_only(alpha, focal_deriv(l_y, gamma, P.grad_mode));
      break;
    case kNCE: {  // L = l_y / S, S = sum_k l_k = sum (z - max) - K log_sum;  g_k = (L - [k=y]) / D, D = -S
      const T D = Kf * c.log_sum - s.sum_shifted;
      active = -l_y / D;
      c.c_const += alpha * active / D;
      c.c_target += -alpha / D;
      c.g_sum += alpha * (Kf * active - T(1)) / D;
      break;
    }
    case kNFL: {  // L = f(l_y) / D, D = sum_k f(l_k);  g_k = (f'(l_y) [k=y] - L f'(l_k)) / D
      const T D = n.focal;
      active = focal_value(l_y, gamma) / D;
      const T d_y = focal_deriv(l_y, gamma, P.grad_mode);
      c.c_focal += -alpha * active / D;
      c.c_target += alpha * d_y / D;
      c.g_sum += alpha * (d_y - active * n.focal_deriv) / D;
      break;
    }
    case kGCE: {  // (1 - clamp(p_y)^q) / q;  g_k = -[k=y] m_y p_y^q
      const T pq = apl_pow(clamp_prob(p_y), q);
      active = (T(1) - pq) / q;
      label_only(alpha, live_y ? -pq : T(0));
      break;
    }
    case kNGCE: {  // L = (1 - c_y^q) / D, D = K - sum_k c_k^q;  g_k = (-q m_y p_y^q [k=y] + L q m_k p_k^q) / D
      const T D = Kf - n.clamp_pow;
      const T pq = apl_pow(clamp_prob(p_y), q);
      active = (T(1) - pq) / D;
      const T d_y = live_y ? -q * pq : T(0);
      c.c_pow += alpha * active * q / D;
      c.c_target += alpha * d_y / D;
      c.g_sum += alpha * (d_y + active * q * n.live_pow) / D;
      break;
    }
    case kECE: {  // -log max(p'_y, eps), p'_y = (p_y + m [y = argmax]) / (m + 1);  d = -p_y / (p_y + m [y = argmax])
      const T m = T(P.m);
      const bool is_argmax = z_target == s.max && n.ties == T(0);
      // p'_y = 1 - u / (m + 1) at the argmax, else p_y / (m + 1): logs without cancellation.
      const T eps_p = is_argmax ? T(1) - u / (m + T(1)) : p_y / (m + T(1));
      const bool live = eps_p >= T(kEceEps);
      active = !live ? -apl_log(T(kEceEps)) : (is_argmax ? -apl_log1p(-u / (m + T(1))) : apl_log1p(m) - l_y);
      label_only(alpha, !live ? T(0) : (is_argmax ? -p_y / (p_y + m) : T(-1)));
      break;
    }
    case kTaylor: {  // sum_{j=1..t} u^j / j;  d = -p_y sum_{j<t} u^j = -(1 - u^t)
      T power = T(1);
      for (int j = 1; j <= P.t; ++j) {
        power *= u;
        active += power / T(j);
      }
      label_only(alpha, apl_expm1(T(P.t) * apl_log1p(-p_y)));
      break;
    }
    default:
      break;
  }

  switch (P.passive) {
    case kMAE:   // 1 - p_y;  g_k = -[k=y] p_y
    case kNMAE: {
      const T scale = P.passive == kMAE ? T(1) : T(1) / (Kf - T(1));
      passive = scale * one_minus_p_y;
      label_only(beta, -scale * p_y);
      break;
    }
    case kRCE:   // -A sum_{k!=y} clamp(p_k);  g_k = -A m_k p_k [k!=y]
    case kNRCE: {
      const T scale = P.passive == kRCE ? -T(P.A) : T(1) / (Kf - T(1));
      passive = scale * n.clamp_other;
      // c_prob - g_sum = beta scale (1 - live_other) - (the active term's g_sum)
      c.p_coef = beta * scale * (p_y + n.dead_other) - c.g_sum;
      c.c_prob += beta * scale;  // of m_k p_k for k != y only: the sum excludes y
      c.g_sum += beta * scale * n.live_other;
      break;
    }
    case kAGCE: {  // ((a+1)^q - (a+p_y)^q) / q = (a+1)^q (1 - (1 - u/(a+1))^q) / q;  d = -p_y (a+p_y)^(q-1)
      const T w = a + T(1);
      passive = apl_pow(w, q) * -apl_expm1(q * apl_log1p(-u / w)) / q;
      label_only(beta, -p_y * apl_pow(w - u, q - T(1)));
      break;
    }
    case kAUL: {  // ((a-p_y)^q - (a-1)^q) / q = (a-1)^q ((1 + u/(a-1))^q - 1) / q;  d = -p_y (a-p_y)^(q-1)
      const T w = a - T(1);
      passive = apl_pow(w, q) * apl_expm1(q * apl_log1p(u / w)) / q;
      label_only(beta, -p_y * apl_pow(w + u, q - T(1)));
      break;
    }
    case kAEL: {  // exp(-p_y / a);  d = -p_y exp(-p_y / a) / a
      passive = apl_exp(-p_y / a);
      label_only(beta, -p_y * passive / a);
      break;
    }
    case kAMSE: {  // (1/K) sum_k (p_k - a [k=y])^2;  g_k = (2/K) (p_k^2 - a p_y [k=y])
      const T diff_y = (T(1) - a) - u;  // p_y - a
      passive = (diff_y * diff_y + n.sq_other) / Kf;
      c.c_sq += T(2) * beta / Kf;
      c.c_target += -T(2) * beta * a * p_y / Kf;
      c.g_sum += T(2) * beta * (n.sq_other + p_y * diff_y) / Kf;
      break;
    }
    case kNNCE:    // 1 - N / D, N = n_y (A + l_y), D = N + sum_{k!=y} n_k (A + l_k);  g_k = n_k N / D^2 - [k=y] n_y / D
    case kNNFL: {  // 1 - N / D, N = n_y (A - f_y), D = N + sum_{k!=y} n_k (A - f_k);  g_k = f'_k (g of nnce) with -f for l
      const bool live_neg_y = above_min_prob(p_y, P);
      const T live_y_f = live_neg_y ? T(1) : T(0);
      if (P.passive == kNNCE) {
        const T N = live_neg_y ? T(P.neg_A) + l_y : T(0);
        const T D = n.neg_other + N;
        passive = n.neg_other / D;
        c.c_neg += beta * N / (D * D);
        c.c_target += -beta * live_y_f / D;
        c.g_sum += beta * (N * (n.neg_live + live_y_f) / (D * D) - live_y_f / D);
      } else {
        const FocalTerms<T> f = focal_terms(l_y, p_y, gamma, P.grad_mode);
        const T N = live_neg_y ? T(P.neg_A) - f.value : T(0);
        const T D = n.neg_other + N;
        const T d_y = live_neg_y ? f.deriv : T(0);
        passive = n.neg_other / D;
        c.c_neg_focal += -beta * N / (D * D);
        c.c_target += beta * d_y / D;
        c.g_sum += beta * (d_y / D - N * (n.neg_deriv + d_y) / (D * D));
      }
      break;
    }
    default:
      break;
  }
  if (P.passive != kRCE && P.passive != kNRCE) c.p_coef = -c.g_sum;  // c_prob = 0

  r.loss = (P.active != kActiveNone ? T(P.alpha) * active : T(0)) +
           (P.passive != kPassiveNone ? T(P.beta) * passive : T(0));
  return r;
}

// The part of g_j every class j has: c_const + c_focal f'(l_j) + c_pow m_j p_j^q
// + c_sq p_j^2 + n_j (c_neg + c_neg_focal f'(l_j)).  live = m_j = unclamped(p_j),
// live_neg = n_j = above_min_prob(p_j) (a kernel may have classified them
// otherwise, see live_threshold); focal_d = f'(log p_j) is read only when
// c_focal or c_neg_focal != 0.  Selects on coefficients that a kernel zeroed
// fold away, so the per-element loops vectorise.
template <typename T, typename Pow = LibmPow>
APL_HD T grad_common(T p, bool live, bool live_neg, T focal_d, const GradCoefs<T>& c, const LossParams& P,
                     Pow pow = Pow()) {
  T g = c.c_const;
  if (c.c_focal != T(0)) g += c.c_focal * focal_d;
  if (c.c_pow != T(0) && live) g += c.c_pow * pow(p, T(P.q));
  if (c.c_sq != T(0)) g += c.c_sq * p * p;
  if (c.c_neg != T(0)) g += live_neg ? c.c_neg : T(0);
  if (c.c_neg_focal != T(0)) g += live_neg ? c.c_neg_focal * focal_d : T(0);
  return g;
}

// d loss / d z_j = g_j - p_j sum_k g_k for a class j != y.
template <typename T, typename Pow = LibmPow>
APL_HD T grad_other_from(T p, bool live, bool live_neg, T focal_d, const GradCoefs<T>& c, const LossParams& P,
                         Pow pow = Pow()) {
  return grad_common(p, live, live_neg, focal_d, c, P, pow) + p * (live ? c.p_coef : -c.g_sum);
}

// The same for any class j, y included: for kernels that kept p_j and focal_d.
template <typename T>
APL_HD T grad_element_from(T p, T focal_d, bool is_target, const GradCoefs<T>& c, const LossParams& P) {
  const bool live = unclamped(p), live_neg = above_min_prob(p, P);
  if (!is_target) return grad_other_from(p, live, live_neg, focal_d, c, P);
  // c_prob (rce, nrce) has no label term: adding c_prob p_y and taking it back
  // in c_target lost the other terms' c_target to rounding (5e-7 in fp32).
  return grad_common(p, live, live_neg, focal_d, c, P) + c.c_target - p * c.g_sum;
}

// f'(log p_j) where the coefficients read it, else 0.
template <typename T>
APL_HD T focal_deriv_if_needed(T log_p, const GradCoefs<T>& c, const LossParams& P) {
  return (c.c_focal != T(0) || c.c_neg_focal != T(0)) ? focal_deriv(log_p, T(P.gamma), P.grad_mode) : T(0);
}

// The same for logit z of class j.
template <typename T>
APL_HD T grad_element(T z, bool is_target, const GradCoefs<T>& c, const LossParams& P) {
  const T log_p = log_prob(z, c.max, c.log_sum);
  return grad_element_from(apl_exp(log_p), focal_deriv_if_needed(log_p, c, P), is_target, c, P);
}

}  // namespace apl
