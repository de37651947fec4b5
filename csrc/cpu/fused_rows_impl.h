// The per-row passes of the fused CPU kernel (see fused_loss_cpu.cpp), included
// once per instruction set: by fused_loss_cpu.cpp (baseline ISA) and by
// fused_loss_cpu_avx2.cpp / fused_loss_cpu_avx512.cpp inside a
// `#pragma GCC target`, each in its own namespace (apl_cpu::base, ::avx2,
// ::avx512).  No include guard: included inside a namespace, after
// fused_rows.h, which includes every header this body needs; so the inline
// functions of those headers keep the baseline ISA in every translation unit
// (only this body's own templates, all explicitly instantiated here, get the
// wider ISA), and inlining them into the wider code is allowed.
// No std:: templates are instantiated here for the same reason.


namespace {  // internal linkage: no PLT calls, and inlinable

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
    if (grad)
      for (int64_t k = 0; k < K; ++k) grad[k] = static_cast<scalar_t>(nan);
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


}  // namespace

// Rows [begin, end) of the batch: the body of run()'s parallel_for.
template <typename scalar_t, typename acc_t>
void rows(const RowsArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const int64_t K = a.ctx->K;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* zi = a.z + i * a.row_stride;
    scalar_t* gi = a.g ? a.g + i * K : nullptr;
    const int64_t y = a.t[i];
    if (y == a.ignore_index) {
      a.out[i] = 0;
      if (gi)
        for (int64_t k = 0; k < K; ++k) gi[k] = scalar_t(0);
    } else if (y < 0 || y >= K) {  // never read; the row is NaN
      a.out[i] = nan;
      if (gi)
        for (int64_t k = 0; k < K; ++k) gi[k] = static_cast<scalar_t>(nan);
    } else {
      a.out[i] = fused_row<scalar_t, acc_t>(zi, y, *a.ctx, gi, a.e, a.focal_d);
    }
  }
}

template void rows<float, float>(const RowsArgs<float, float>&, int64_t, int64_t);
template void rows<double, double>(const RowsArgs<double, double>&, int64_t, int64_t);
template void rows<c10::Half, float>(const RowsArgs<c10::Half, float>&, int64_t, int64_t);
template void rows<c10::BFloat16, float>(const RowsArgs<c10::BFloat16, float>&, int64_t, int64_t);
