// Shared declarations of the fused CPU kernel's per-ISA row loops
// (fused_rows_impl.h, compiled for the baseline, AVX2+FMA and AVX-512 ISAs).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "apl_loss_math.h"
#include "cpu/vec_math.h"

namespace apl_cpu {

// Pass 4's loop: the vectorised one of the loss's coefficients, or the generic one.
enum GradPass : int {
  kGradPlain,     // c_const and p_k terms only (ce, nce, gce, fl, ece, taylor with mae, rce, agce, aul, ael, ...)
  kGradPlainSq,   // and amse's p_k^2
  kGradPlainNeg,  // and nnce's n_k
  kGradFocal,     // nfl (with mae, nmae, rce, nrce, label-only terms): f'(l_k) from pass 3
  kGradPow,       // ngce (with the same): p_k^q
  kGradGeneric,   // any other combination (nnfl; nfl or ngce with amse or nnce): every coefficient, libm
};

template <typename acc_t>
struct RowContext {
  apl::LossParams P;
  int64_t K;
  acc_t weight;  // the reduction's factor of every row's gradient
  bool second_pass, nfl, ngce;
  bool focal_scratch;  // nfl or nnfl: pass 3 keeps f'(l_k) per class
  GradPass grad_pass;
};

// Which pass-4 loop a loss runs.
inline GradPass grad_pass_of(const apl::LossParams& P) {
  const bool focal = P.active == apl::kNFL, pow = P.active == apl::kNGCE;
  const bool sq = P.passive == apl::kAMSE, neg = P.passive == apl::kNNCE;
  if (P.passive == apl::kNNFL || ((focal || pow) && (sq || neg))) return kGradGeneric;
  if (focal) return kGradFocal;
  if (pow) return kGradPow;
  return sq ? kGradPlainSq : (neg ? kGradPlainNeg : kGradPlain);
}

// Logits per partial sum of pass 2's sum (z - max) (see fused_row).
constexpr int64_t kShiftedBlock = 1024;

template <typename scalar_t, typename acc_t>
struct RowsArgs {
  const scalar_t* z;
  int64_t row_stride;
  const int64_t* t;
  int64_t ignore_index;
  const RowContext<acc_t>* ctx;
  scalar_t* g;          // nullptr: no gradient
  acc_t* e;             // per-thread scratch row of K values
  acc_t* focal_d;       // per-thread scratch row of K values (nfl, nnfl only)
};

// The AVX2 / AVX-512 variants exist on x86 with GCC or clang only.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define APL_CPU_X86_VARIANTS 1
#else
#define APL_CPU_X86_VARIANTS 0
#endif

#define APL_CPU_DECLARE_ROWS(isa)                                                 \
  namespace isa {                                                                 \
  template <typename scalar_t, typename acc_t>                                    \
  void rows(const RowsArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end, acc_t* loss); \
  }

APL_CPU_DECLARE_ROWS(avx2)
APL_CPU_DECLARE_ROWS(avx512)

}  // namespace apl_cpu
