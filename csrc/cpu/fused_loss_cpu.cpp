// The fused CPU kernel of apl_kernels::fused_loss (schema in csrc/apl_ops.cpp).
//
// Rows run in parallel (at::parallel_for); each row makes these passes over
// its K logits, with all loss math from csrc/apl_loss_math.h:
//   1. max and sum z                                  (reads z)
//   2. e_k = exp(z_k - max) into a per-thread buffer, sum e_k
//   3. the normaliser sums, only if apl::needs_second_pass (reads z and e)
//   4. the gradient, weight of the reduction included (reads e, writes grad)
// Accumulation is in at::opmath_type: float for half/bfloat16/float, double
// for double.  Row losses go to a buffer and are summed in row order, so the
// result does not depend on the number of threads.
//
// Speed: the loops are written for GCC's vectoriser at the baseline ISA
// (no -march): `omp simd` reductions, selects before sums, known-constant
// LossParams, the shared math force-inlined, exp/log from cpu/vec_math.h.
// Check with -fopt-info-vec after changing a loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "apl_loss_math.h"
#include "cpu/vec_math.h"

namespace apl_cpu {
namespace {

template <typename acc_t>
struct RowContext {
  apl::LossParams P;
  int64_t K;
  acc_t weight;  // the reduction's factor of every row's gradient
  bool second_pass, nfl, ngce;
};

// The rce / nrce sums of NormalizerSums over classes [begin, end), none of
// them the label.  add_prob() sums the same for rce and nrce; a LossParams of
// known constants lets the compiler drop its other branches and vectorise.
template <typename acc_t>
void clamped_sums(const acc_t* __restrict e, int64_t begin, int64_t end, acc_t inv_sumexp,
                  apl::NormalizerSums<acc_t>& sums) {
  const apl::LossParams rce_only{apl::kActiveNone, apl::kRCE, 0, 0, 0, 0, 0, apl::kOfficial};
  acc_t clamp_other = 0, live_other = 0, dead_other = 0;
#pragma omp simd reduction(+ : clamp_other, live_other, dead_other)
  for (int64_t k = begin; k < end; ++k) {
    apl::NormalizerSums<acc_t> one;
    one.add_prob(e[k] * inv_sumexp, false, rce_only);
    clamp_other += one.clamp_other;
    live_other += one.live_other;
    dead_other += one.dead_other;
  }
  sums.clamp_other += clamp_other;
  sums.live_other += live_other;
  sums.dead_other += dead_other;
}

// The nfl sums (and with kClamped the rce / nrce sums) of NormalizerSums over
// classes [begin, end), none of them the label; focal_d[k] = f'(log p_k).
// 1 - p and (1 - p)^gamma come from the vectorisable exp / log of vec_math.h,
// valid for p < 1/2; classes with p >= 1/2 (one at most) are left out here and
// added by the caller with the header's expm1 / pow.
template <bool kClamped, bool kExact, typename scalar_t, typename acc_t>
void focal_sums(const scalar_t* __restrict z, const acc_t* __restrict e, int64_t begin, int64_t end,
                acc_t inv_sumexp, acc_t max, acc_t log_sum, acc_t gamma, acc_t* __restrict focal_d,
                apl::NormalizerSums<acc_t>& sums) {
  const apl::LossParams rce_only{apl::kActiveNone, apl::kRCE, 0, 0, 0, 0, 0, apl::kOfficial};
  const int mode = kExact ? apl::kExact : apl::kOfficial;
  acc_t focal = 0, focal_deriv = 0, clamp_other = 0, live_other = 0, dead_other = 0;
#pragma omp simd reduction(+ : focal, focal_deriv, clamp_other, live_other, dead_other)
  for (int64_t k = begin; k < end; ++k) {
    const acc_t p = e[k] * inv_sumexp;
    const bool small = p < acc_t(0.5);
    const acc_t one_minus_p = small ? acc_t(1) - p : acc_t(1);
    const acc_t w = exp_nonpos(gamma * log_half_to_one(one_minus_p));
    const auto f = apl::focal_terms_from(apl::log_prob(static_cast<acc_t>(z[k]), max, log_sum), p, one_minus_p, w,
                                         gamma, mode);
    // Selects first, then plain sums: GCC does not vectorise `s += c ? a : 0`.
    const acc_t value = small ? f.value : acc_t(0), deriv = small ? f.deriv : acc_t(0);
    focal += value;
    focal_deriv += deriv;
    focal_d[k] = f.deriv;
    if (kClamped) {
      apl::NormalizerSums<acc_t> one;
      one.add_prob(p, false, rce_only);
      clamp_other += one.clamp_other;
      live_other += one.live_other;
      dead_other += one.dead_other;
    }
  }
  sums.focal += focal;
  sums.focal_deriv += focal_deriv;
  sums.clamp_other += clamp_other;
  sums.live_other += live_other;
  sums.dead_other += dead_other;
}

template <bool kClamped, bool kExact, typename scalar_t, typename acc_t>
void focal_sums_row(const scalar_t* z, const acc_t* e, int64_t y, int64_t K, acc_t inv_sumexp, acc_t max,
                    acc_t log_sum, acc_t* focal_d, const apl::LossParams& P, apl::NormalizerSums<acc_t>& sums) {
  const acc_t gamma = static_cast<acc_t>(P.gamma);
  focal_sums<kClamped, kExact>(z, e, 0, y, inv_sumexp, max, log_sum, gamma, focal_d, sums);
  focal_sums<kClamped, kExact>(z, e, y + 1, K, inv_sumexp, max, log_sum, gamma, focal_d, sums);
  // The label, and any class with p >= 1/2 (possible only if sum exp(z - max) <= 2).
  auto exactly = [&](int64_t k) {
    const acc_t p = e[k] * inv_sumexp;
    const auto f = apl::focal_terms(apl::log_prob(static_cast<acc_t>(z[k]), max, log_sum), p, gamma, P.grad_mode);
    sums.add_focal(f);
    focal_d[k] = f.deriv;
  };
  exactly(y);
  sums.add_prob(e[y] * inv_sumexp, true, P);  // the segments hold the other classes' clamped sums
  if (inv_sumexp >= acc_t(0.5)) {
    for (int64_t k = 0; k < K; ++k)
      if (k != y && e[k] * inv_sumexp >= acc_t(0.5)) exactly(k);
  }
}

// Loss of one row with a valid label y; writes its gradient row if grad != nullptr.
// `e` and `focal_d` are per-thread scratch rows of K values.
template <typename scalar_t, typename acc_t>
acc_t fused_row(const scalar_t* __restrict z, int64_t y, const RowContext<acc_t>& ctx, scalar_t* __restrict grad,
                acc_t* __restrict e, acc_t* __restrict focal_d) {
  const int64_t K = ctx.K;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();

  // Pass 1.  A NaN leaves `max` alone but makes sum_z NaN; +inf makes max +inf.
  acc_t max = -INFINITY, sum_z = 0;
#pragma omp simd reduction(max : max) reduction(+ : sum_z)
  for (int64_t k = 0; k < K; ++k) {
    const acc_t v = static_cast<acc_t>(z[k]);
    max = v > max ? v : max;
    sum_z += v;
  }
  // NaN, +inf or all -inf: log_softmax is NaN for the whole row, as in torch.
  if (std::isnan(sum_z) || std::isinf(max)) {
    if (grad) for (int64_t k = 0; k < K; ++k) grad[k] = static_cast<scalar_t>(nan);
    return nan;
  }

  // Pass 2.
  acc_t sumexp = 0;
#pragma omp simd reduction(+ : sumexp)
  for (int64_t k = 0; k < K; ++k) {
    const acc_t ek = exp_nonpos(static_cast<acc_t>(z[k]) - max);
    e[k] = ek;
    sumexp += ek;
  }
  apl::SoftmaxStats<acc_t> stats;
  stats.max = max;
  stats.sumexp = sumexp;
  stats.sum_z = sum_z;
  const acc_t log_sum = stats.log_sum();
  const acc_t inv_sumexp = acc_t(1) / sumexp;

  // Pass 3.  Classes k != y in two segments and y alone, so that `is_target`
  // is a constant in the loops.
  apl::NormalizerSums<acc_t> sums;
  if (ctx.second_pass) {
    const apl::LossParams& P = ctx.P;
    if (ctx.ngce) {  // pow per class: a plain loop
      for (int64_t k = 0; k < K; ++k) sums.add_prob(e[k] * inv_sumexp, k == y, P);
    } else if (ctx.nfl) {
      const bool clamped = P.passive == apl::kRCE || P.passive == apl::kNRCE;
      const bool exact = P.grad_mode == apl::kExact;
      auto run = clamped ? (exact ? focal_sums_row<true, true, scalar_t, acc_t>
                                  : focal_sums_row<true, false, scalar_t, acc_t>)
                         : (exact ? focal_sums_row<false, true, scalar_t, acc_t>
                                  : focal_sums_row<false, false, scalar_t, acc_t>);
      run(z, e, y, K, inv_sumexp, max, log_sum, focal_d, P, sums);
    } else {  // rce / nrce: only the clamped sums, vectorised
      clamped_sums(e, 0, y, inv_sumexp, sums);
      clamped_sums(e, y + 1, K, inv_sumexp, sums);
      sums.add_prob(e[y] * inv_sumexp, true, P);
    }
  }

  const apl::RowResult<acc_t> row = apl::finish_row(stats, sums, static_cast<acc_t>(z[y]), K, ctx.P, ctx.weight);
  if (!grad) return row.loss;

  // Pass 4.  Zeroing the coefficients a loss does not use makes the pow and
  // focal branches of grad_element_from constant-false, so the loop vectorises.
  apl::GradCoefs<acc_t> c = row.grad;
  if (!ctx.ngce) c.c_pow = 0;
  if (!ctx.nfl) c.c_focal = 0;
  const apl::LossParams& P = ctx.P;
  if (ctx.nfl) {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k)
      grad[k] = static_cast<scalar_t>(apl::grad_element_from(e[k] * inv_sumexp, focal_d[k], false, c, P));
  } else if (ctx.ngce) {  // pow per class: a plain loop
    for (int64_t k = 0; k < K; ++k)
      grad[k] = static_cast<scalar_t>(apl::grad_element_from(e[k] * inv_sumexp, acc_t(0), false, c, P));
  } else {
    const acc_t zero = 0;
#pragma omp simd
    for (int64_t k = 0; k < K; ++k)
      grad[k] = static_cast<scalar_t>(apl::grad_element_from(e[k] * inv_sumexp, zero, false, c, P));
  }
  // The label's p as finish_row computes it, so that its rce terms cancel exactly.
  grad[y] = static_cast<scalar_t>(apl::grad_element(static_cast<acc_t>(z[y]), true, c, P));
  return row.loss;
}

template <typename scalar_t>
void run(const at::Tensor& logits, const at::Tensor& target, const apl::LossParams& P, int64_t reduction,
         int64_t ignore_index, at::Tensor& row_loss, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), K = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  acc_t* out = row_loss.data_ptr<acc_t>();
  scalar_t* g = grad.numel() ? grad.data_ptr<scalar_t>() : nullptr;

  int64_t kept = 0;
  for (int64_t i = 0; i < N; ++i) kept += t[i] != ignore_index;
  RowContext<acc_t> ctx{P, K, acc_t(1), apl::needs_second_pass(P), P.active == apl::kNFL, P.active == apl::kNGCE};
  if (reduction == apl::kReduceMean && kept > 0) ctx.weight = acc_t(1) / static_cast<acc_t>(kept);

  // About 64k logits per task: enough work to pay for a thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> e(K), focal_d(ctx.nfl ? K : 0);
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* zi = z + i * row_stride;
      scalar_t* gi = g ? g + i * K : nullptr;
      const int64_t y = t[i];
      if (y == ignore_index) {
        out[i] = 0;
        if (gi) std::fill(gi, gi + K, scalar_t(0));
      } else if (y < 0 || y >= K) {  // never read; the row is NaN
        out[i] = std::numeric_limits<acc_t>::quiet_NaN();
        if (gi) std::fill(gi, gi + K, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
      } else {
        out[i] = fused_row<scalar_t, acc_t>(zi, y, ctx, gi, e.data(), focal_d.data());
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                  int64_t active, int64_t passive, double alpha, double beta,
                                                  double gamma, double q, double A, int64_t grad_mode,
                                                  int64_t reduction, int64_t ignore_index, bool compute_grad) {
  TORCH_CHECK(logits.dim() == 2, "fused_loss: logits must be [N, K], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 2, "fused_loss: need K >= 2 classes, got ", logits.size(1));
  TORCH_CHECK(logits.size(0) == 0 || logits.stride(1) == 1, "fused_loss: logits need stride(1) == 1, got strides ",
              logits.strides());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "fused_loss: target must be [N] = [",
              logits.size(0), "], got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "fused_loss: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "fused_loss: logits and target on different devices");
  TORCH_CHECK(active >= apl::kActiveNone && active <= apl::kNGCE, "fused_loss: bad active term code ", active);
  TORCH_CHECK(passive >= apl::kPassiveNone && passive <= apl::kNRCE, "fused_loss: bad passive term code ", passive);
  TORCH_CHECK(active != apl::kActiveNone || passive != apl::kPassiveNone, "fused_loss: both terms are none");
  TORCH_CHECK(grad_mode == apl::kOfficial || grad_mode == apl::kExact, "fused_loss: bad grad mode ", grad_mode);
  TORCH_CHECK(reduction >= apl::kReduceNone && reduction <= apl::kReduceSum, "fused_loss: bad reduction ", reduction);

  const apl::LossParams P{static_cast<int>(active), static_cast<int>(passive), alpha, beta, gamma, q, A,
                          static_cast<int>(grad_mode)};
  const int64_t N = logits.size(0), K = logits.size(1);
  const at::Tensor t = target.contiguous();
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty({N}, logits.options().dtype(loss_dtype));
  at::Tensor grad = at::empty(compute_grad ? at::IntArrayRef{N, K} : at::IntArrayRef{0}, logits.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cpu", [&] {
    run<scalar_t>(logits, t, P, reduction, ignore_index, row_loss, grad);
  });

  if (reduction == apl::kReduceNone) return {row_loss, grad};
  // Row order, in double: deterministic and as exact as the row losses.
  double total = 0;
  int64_t kept = 0;
  const int64_t* ti = t.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(loss_dtype, "apl_fused_loss_cpu_sum", [&] {
    const scalar_t* r = row_loss.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < N; ++i) {
      total += static_cast<double>(r[i]);
      kept += ti[i] != ignore_index;
    }
  });
  if (reduction == apl::kReduceMean) total = kept > 0 ? total / static_cast<double>(kept) : 0.0;
  return {at::scalar_tensor(total, logits.options().dtype(loss_dtype)), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(apl_kernels, CPU, m) { m.impl("fused_loss", &fused_loss_cpu); }

}  // namespace apl_cpu
