// The loss math of every term, once, for the CPU and the CUDA kernels.
//
// All functions are __host__ __device__ and work in the accumulation type T
// (float for fp16/bf16/fp32 logits, double for fp64).  A kernel streams each
// row through three steps:
//
//   1. SoftmaxStats   max, sum exp(z - max) and sum z            (needs nothing)
//   2. NormalizerSums sums over k that need log p_k = log_prob(z_k, ...)  (only if needs_second_pass)
//   3. finish_row     the row's loss and the coefficients of its gradient;
//      grad_element   d loss / d z_j for every j.
//
// Gradient.  With l = log p, each term's derivative with respect to l_k has
// the form  g_k = c_const + c_focal f'(l_k) + c_pow m_k p_k^q + c_prob m_k p_k
//                 + [k == y] c_target,
// where m_k = [P_MIN <= p_k <= 1] (clamped entries get zero gradient) and f'
// is the derivative of f(l) = -(1-p)^gamma l (a constant focal factor in the
// official mode).  Through the log-softmax, d loss / d z_j = g_j - p_j sum_k g_k.
// The per-term coefficients (derived in the comments of finish_row) are summed,
// weighted by alpha and beta, into one GradCoefs.  Kernels that merge partial
// NormalizerSums must merge every field (merge() does).
//
// Codes and defaults match apl_kernels/spec.py.
#pragma once

#include <math.h>
#include <stdint.h>

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

// The term codes, once (X-macros: the enums here, the code tables that
// apl_ops.cpp exports for the test against apl_kernels/spec.py, the range checks).
#define APL_ACTIVE_TERMS(X) \
  X(kActiveNone, "none", 0) X(kCE, "ce", 1) X(kFL, "fl", 2) X(kNCE, "nce", 3) X(kNFL, "nfl", 4) X(kGCE, "gce", 5) \
  X(kNGCE, "ngce", 6) X(kECE, "ece", 7) X(kTaylor, "taylor", 8)
#define APL_PASSIVE_TERMS(X) \
  X(kPassiveNone, "none", 0) X(kMAE, "mae", 1) X(kRCE, "rce", 2) X(kNMAE, "nmae", 3) X(kNRCE, "nrce", 4) \
  X(kAGCE, "agce", 5) X(kAUL, "aul", 6) X(kAEL, "ael", 7) X(kNNCE, "nnce", 8) X(kNNFL, "nnfl", 9) X(kAMSE, "amse", 10)
#define APL_TERM_ENUM(id, name, code) id = code,
enum ActiveTerm : int { APL_ACTIVE_TERMS(APL_TERM_ENUM) kActiveEnd };
enum PassiveTerm : int { APL_PASSIVE_TERMS(APL_TERM_ENUM) kPassiveEnd };
#undef APL_TERM_ENUM
enum GradMode : int { kOfficial = 0, kExact = 1 };
enum Reduction : int { kReduceNone = 0, kReduceMean = 1, kReduceSum = 2 };

constexpr double kPMin = 1e-7;

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
};

constexpr int kMaxTaylorOrder = 1000;  // spec.py's MAX_TAYLOR_ORDER

// Math overloads that resolve to the float or double routine on host and device.
// CUDA kernels may define APL_CUDA_FAST_EXP: float exp is then __expf (ex2.approx,
// 2 instructions instead of ~10; a few ulp), as Triton's tl.exp.  Host code and
// double are unaffected.
APL_HD float apl_exp(float x) {
#if defined(__CUDA_ARCH__) && defined(APL_CUDA_FAST_EXP)
  return __expf(x);
#else
  return expf(x);
#endif
}
APL_HD double apl_exp(double x) { return exp(x); }
APL_HD float apl_log(float x) { return logf(x); }
APL_HD double apl_log(double x) { return log(x); }
APL_HD float apl_expm1(float x) { return expm1f(x); }
APL_HD double apl_expm1(double x) { return expm1(x); }
APL_HD float apl_pow(float x, float y) { return powf(x, y); }
APL_HD double apl_pow(double x, double y) { return pow(x, y); }

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
// Online max / sum-exp (and the plain sum of logits for the NCE normaliser).
template <typename T>
struct SoftmaxStats {
  T max = -INFINITY;
  T sumexp = 0;
  T sum_z = 0;

  APL_HD void add(T z) {
    sum_z += z;
    const T new_max = nan_max(max, z);
    // Guard -inf - -inf: while every logit so far is -inf the sum stays 0.
    if (new_max == -INFINITY) return;
    sumexp = sumexp * apl_exp(max - new_max) + apl_exp(z - new_max);
    max = new_max;
  }

  APL_HD void merge(const SoftmaxStats& o) {
    sum_z += o.sum_z;
    const T new_max = nan_max(max, o.max);
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
  const T one_minus_p = -apl_expm1(log_p);
  return focal_deriv_from(log_p, apl_exp(log_p), one_minus_p, apl_pow(one_minus_p, gamma), gamma, grad_mode);
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
  const T one_minus_p = -apl_expm1(log_p);
  return focal_terms_from(log_p, p, one_minus_p, apl_pow(one_minus_p, gamma), gamma, grad_mode);
}

// [P_MIN <= p <= 1]: entries that clamp() leaves unchanged, the only ones with a gradient.
template <typename T>
APL_HD bool unclamped(T p) {
  return p >= T(kPMin) && p <= T(1);
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
  return P.active == kNFL || P.active == kNGCE || P.passive == kRCE || P.passive == kNRCE;
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

  // One class, from its log p alone.
  APL_HD void add(T log_p, bool is_target, const LossParams& P) {
    const T p = apl_exp(log_p);
    if (P.active == kNFL) add_focal(focal_terms(log_p, p, T(P.gamma), P.grad_mode));
    if (P.active == kNGCE || P.passive == kRCE || P.passive == kNRCE) add_prob(p, is_target, P);
  }

  APL_HD void merge(const NormalizerSums& o) {
    focal += o.focal;
    focal_deriv += o.focal_deriv;
    clamp_pow += o.clamp_pow;
    live_pow += o.live_pow;
    clamp_other += o.clamp_other;
    live_other += o.live_other;
    dead_other += o.dead_other;
  }
};

// ---------------------------------------------------------------- step 3
template <typename T>
struct GradCoefs {
  T lse;
  T max, log_sum;  // the row's max and log sum exp(z - max): log p = log_prob(z, max, log_sum)
  T c_const = 0, c_focal = 0, c_pow = 0, c_prob = 0, c_target = 0;
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

// The loss of a row with label y and its gradient coefficients.  `weight` is
// the reduction's factor of this row's gradient (1, or 1/count for mean).
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
  const T one_minus_p_y = -apl_expm1(l_y);
  const T gamma = T(P.gamma), q = T(P.q), Kf = T(K);
  const T alpha = T(P.alpha) * weight, beta = T(P.beta) * weight;
  const bool live_y = unclamped(p_y);
  T active = 0, passive = 0;

  switch (P.active) {
    case kCE:  // -l_y;  g_k = -[k=y]
      active = -l_y;
      c.c_target += -alpha;
      c.g_sum += -alpha;
      break;
    case kFL: {  // f(l_y);  g_k = [k=y] f'(l_y)
      active = focal_value(l_y, gamma);
      const T d = focal_deriv(l_y, gamma, P.grad_mode);
      c.c_target += alpha * d;
      c.g_sum += alpha * d;
      break;
    }
    case kNCE: {  // L = l_y / S, S = sum_k l_k = sum z - K lse;  g_k = (L - [k=y]) / D, D = -S
      const T D = -(s.sum_z - Kf * c.lse);
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
      const T d = live_y ? -pq : T(0);
      c.c_target += alpha * d;
      c.g_sum += alpha * d;
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
    default:
      break;
  }

  switch (P.passive) {
    case kMAE:   // 1 - p_y;  g_k = -[k=y] p_y
    case kNMAE: {
      const T scale = P.passive == kMAE ? T(1) : T(1) / (Kf - T(1));
      passive = scale * one_minus_p_y;
      c.c_target += -beta * scale * p_y;
      c.g_sum += -beta * scale * p_y;
      break;
    }
    case kRCE:   // -A sum_{k!=y} clamp(p_k);  g_k = -A m_k p_k [k!=y]
    case kNRCE: {
      const T scale = P.passive == kRCE ? -T(P.A) : T(1) / (Kf - T(1));
      passive = scale * n.clamp_other;
      // c_prob - g_sum = beta scale (1 - live_other) - (the active term's g_sum)
      c.p_coef = beta * scale * (p_y + n.dead_other) - c.g_sum;
      c.c_prob += beta * scale;
      c.c_target += live_y ? -beta * scale * p_y : T(0);  // the sum excludes y
      c.g_sum += beta * scale * n.live_other;
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

// c_const + c_focal f'(l_j) + c_pow m_j p_j^q: the part of g_j every class j has.
// live = m_j = unclamped(p_j) (a kernel may have classified it otherwise, see
// live_threshold); focal_d = f'(log p_j) is read only when c_focal != 0.
template <typename T, typename Pow = LibmPow>
APL_HD T grad_common(T p, bool live, T focal_d, const GradCoefs<T>& c, const LossParams& P, Pow pow = Pow()) {
  T g = c.c_const;
  if (c.c_focal != T(0)) g += c.c_focal * focal_d;
  if (c.c_pow != T(0) && live) g += c.c_pow * pow(p, T(P.q));
  return g;
}

// d loss / d z_j = g_j - p_j sum_k g_k for a class j != y.
template <typename T, typename Pow = LibmPow>
APL_HD T grad_other_from(T p, bool live, T focal_d, const GradCoefs<T>& c, const LossParams& P, Pow pow = Pow()) {
  return grad_common(p, live, focal_d, c, P, pow) + p * (live ? c.p_coef : -c.g_sum);
}

// The same for any class j, y included: for kernels that kept p_j and focal_d.
template <typename T>
APL_HD T grad_element_from(T p, T focal_d, bool is_target, const GradCoefs<T>& c, const LossParams& P) {
  const bool live = unclamped(p);
  if (!is_target) return grad_other_from(p, live, focal_d, c, P);
  // Here c_prob p_y and c_target cancel exactly: keep them apart.
  const T g = grad_common(p, live, focal_d, c, P) + (live ? c.c_prob * p : T(0));
  return g + c.c_target - p * c.g_sum;
}

// The same for logit z of class j.
template <typename T>
APL_HD T grad_element(T z, bool is_target, const GradCoefs<T>& c, const LossParams& P) {
  const T log_p = log_prob(z, c.max, c.log_sum);
  const T focal_d = c.c_focal != T(0) ? focal_deriv(log_p, T(P.gamma), P.grad_mode) : T(0);
  return grad_element_from(apl_exp(log_p), focal_d, is_target, c, P);
}

}  // namespace apl
