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

// One class's part of NormalizerSums::add_other_unnormalised: e_k split at
// the live threshold.  Selects, then plain sums: GCC does not vectorise
// `s += c ? a : 0`.
template <typename acc_t>
struct OtherTerms {
  acc_t live, dead, n_dead;
};

template <typename acc_t>
__attribute__((always_inline)) inline OtherTerms<acc_t> other_terms(acc_t e, acc_t live_from) {
  const bool live = e >= live_from;
  return {live ? e : acc_t(0), live ? acc_t(0) : e, live ? acc_t(0) : acc_t(1)};
}

// The rce / nrce sums of NormalizerSums over every class but the label, in
// one loop over the row: e[y] is 0 while it runs, so the label adds 0 to both
// sums and exactly 1 to the dead count, which is taken back.
template <typename acc_t>
void other_sums_row(acc_t* __restrict e, int64_t y, int64_t K, acc_t live_from, acc_t inv_sumexp,
                    apl::NormalizerSums<acc_t>& sums) {
  const acc_t e_y = e[y];
  e[y] = 0;
  acc_t live = 0, dead = 0, n_dead = 0;
#pragma omp simd reduction(+ : live, dead, n_dead)
  for (int64_t k = 0; k < K; ++k) {
    const OtherTerms<acc_t> one = other_terms(e[k], live_from);
    live += one.live;
    dead += one.dead;
    n_dead += one.n_dead;
  }
  e[y] = e_y;
  sums.add_other_unnormalised(live, dead, n_dead - acc_t(1), inv_sumexp);
}

// The nfl sums (and with kClamped the rce / nrce sums) of NormalizerSums over
// classes [begin, end), none of them the label; focal_d[k] = f'(log p_k).
// 1 - p and w = (1 - p)^gamma come from vectorisable math: sqrt for
// gamma = 1/2 (kSqrt, the paper's value), else pow_unit of vec_math.h; 1 - p
// is accurate for p < 1/2; classes with p >= 1/2 (one at most) are left out here and
// added by the caller with the header's expm1 / pow.
template <bool kClamped, bool kExact, bool kSqrt, typename scalar_t, typename acc_t>
void focal_sums(const scalar_t* __restrict z, const acc_t* __restrict e, int64_t begin, int64_t end,
                acc_t inv_sumexp, acc_t live_from, acc_t max, acc_t log_sum, acc_t gamma,
                acc_t* __restrict focal_d, apl::NormalizerSums<acc_t>& sums) {
  const int mode = kExact ? apl::kExact : apl::kOfficial;
  acc_t focal = 0, focal_deriv = 0, live = 0, dead = 0, n_dead = 0;
#pragma omp simd reduction(+ : focal, focal_deriv, live, dead, n_dead)
  for (int64_t k = begin; k < end; ++k) {
    const acc_t p = e[k] * inv_sumexp;
    const bool small = p < acc_t(0.5);
    const acc_t one_minus_p = small ? acc_t(1) - p : acc_t(1);
    const acc_t w = kSqrt ? std::sqrt(one_minus_p) : pow_unit(one_minus_p, gamma);
    const auto f = apl::focal_terms_from(apl::log_prob(static_cast<acc_t>(z[k]), max, log_sum), p, one_minus_p, w,
                                         gamma, mode);
    const acc_t value = small ? f.value : acc_t(0), deriv = small ? f.deriv : acc_t(0);
    focal += value;
    focal_deriv += deriv;
    focal_d[k] = f.deriv;
    if (kClamped) {
      const OtherTerms<acc_t> one = other_terms(e[k], live_from);
      live += one.live;
      dead += one.dead;
      n_dead += one.n_dead;
    }
  }
  sums.focal += focal;
  sums.focal_deriv += focal_deriv;
  if (kClamped) sums.add_other_unnormalised(live, dead, n_dead, inv_sumexp);
}

// The ngce sums (and with kClamped the rce / nrce ones) of NormalizerSums over
// classes [begin, end), none of them the label: add_prob() with p^q from
// pow_unit, and a LossParams of known terms, so that the loop vectorises.
template <bool kClamped, typename acc_t>
void ngce_sums(const acc_t* __restrict e, int64_t begin, int64_t end, acc_t inv_sumexp, double q,
               apl::NormalizerSums<acc_t>& sums) {
  const apl::LossParams ngce{apl::kNGCE, kClamped ? apl::kRCE : apl::kPassiveNone, 0, 0, 0, q, 0, apl::kOfficial};
  acc_t clamp_pow = 0, live_pow = 0, clamp_other = 0, live_other = 0, dead_other = 0;
#pragma omp simd reduction(+ : clamp_pow, live_pow, clamp_other, live_other, dead_other)
  for (int64_t k = begin; k < end; ++k) {
    apl::NormalizerSums<acc_t> one;
    one.add_prob(e[k] * inv_sumexp, false, ngce, UnitPow());
    clamp_pow += one.clamp_pow;
    live_pow += one.live_pow;
    clamp_other += one.clamp_other;
    live_other += one.live_other;
    dead_other += one.dead_other;
  }
  sums.clamp_pow += clamp_pow;
  sums.live_pow += live_pow;
  sums.clamp_other += clamp_other;
  sums.live_other += live_other;
  sums.dead_other += dead_other;
}

template <bool kClamped, typename acc_t>
void ngce_sums_row(const acc_t* e, int64_t y, int64_t K, acc_t inv_sumexp, const apl::LossParams& P,
                   apl::NormalizerSums<acc_t>& sums) {
  ngce_sums<kClamped>(e, 0, y, inv_sumexp, P.q, sums);
  ngce_sums<kClamped>(e, y + 1, K, inv_sumexp, P.q, sums);
  sums.add_prob(e[y] * inv_sumexp, true, P);
}

template <bool kClamped, bool kExact, bool kSqrt, typename scalar_t, typename acc_t>
void focal_sums_row(const scalar_t* z, const acc_t* e, int64_t y, int64_t K, acc_t inv_sumexp, acc_t live_from,
                    acc_t max, acc_t log_sum, acc_t* focal_d, const apl::LossParams& P,
                    apl::NormalizerSums<acc_t>& sums) {
  const acc_t gamma = static_cast<acc_t>(P.gamma);
  auto segment = [&](int64_t begin, int64_t end) {
    focal_sums<kClamped, kExact, kSqrt>(z, e, begin, end, inv_sumexp, live_from, max, log_sum, gamma, focal_d, sums);
  };
  segment(0, y);
  segment(y + 1, K);
  // The label, and any class with p >= 1/2 (possible only if sum exp(z - max) <= 2).
  auto exactly = [&](int64_t k) {
    const acc_t p = e[k] * inv_sumexp;
    const auto f = apl::focal_terms(apl::log_prob(static_cast<acc_t>(z[k]), max, log_sum), p, gamma, P.grad_mode);
    sums.add_focal(f);
    focal_d[k] = f.deriv;
  };
  exactly(y);
  if (inv_sumexp >= acc_t(0.5)) {
    for (int64_t k = 0; k < K; ++k)
      if (k != y && e[k] * inv_sumexp >= acc_t(0.5)) exactly(k);
  }
}

// The nfl sums of a row: the variant of focal_sums_row for these options.
template <typename scalar_t, typename acc_t>
using FocalSumsRow = void (*)(const scalar_t*, const acc_t*, int64_t, int64_t, acc_t, acc_t, acc_t, acc_t, acc_t*,
                              const apl::LossParams&, apl::NormalizerSums<acc_t>&);

template <typename scalar_t, typename acc_t>
FocalSumsRow<scalar_t, acc_t> pick_focal_sums_row(const apl::LossParams& P) {
  const bool clamped = P.passive == apl::kRCE || P.passive == apl::kNRCE;
  const bool exact = P.grad_mode == apl::kExact;
  const bool sqrt = P.gamma == 0.5;
  static const FocalSumsRow<scalar_t, acc_t> variants[2][2][2] = {
      {{&focal_sums_row<false, false, false, scalar_t, acc_t>, &focal_sums_row<false, false, true, scalar_t, acc_t>},
       {&focal_sums_row<false, true, false, scalar_t, acc_t>, &focal_sums_row<false, true, true, scalar_t, acc_t>}},
      {{&focal_sums_row<true, false, false, scalar_t, acc_t>, &focal_sums_row<true, false, true, scalar_t, acc_t>},
       {&focal_sums_row<true, true, false, scalar_t, acc_t>, &focal_sums_row<true, true, true, scalar_t, acc_t>}}};
  return variants[clamped][exact][sqrt];
}

// The amse (kPassive = kAMSE) or nnce (kNNCE) sums of NormalizerSums over
// classes [begin, end), none of them the label: the header's add_other() with
// a LossParams of known terms, so that the loop vectorises.  n_k by e_k, as
// live_from = min_prob * S says.
template <int kPassive, typename scalar_t, typename acc_t>
void passive_sums(const scalar_t* __restrict z, const acc_t* __restrict e, int64_t begin, int64_t end,
                  acc_t inv_sumexp, acc_t live_from, acc_t max, acc_t log_sum, double neg_A,
                  apl::NormalizerSums<acc_t>& sums) {
  apl::LossParams P{};
  P.passive = kPassive;
  P.neg_A = neg_A;
  const apl::FocalTerms<acc_t> no_focal{acc_t(0), acc_t(0)};
  acc_t sq_other = 0, neg_other = 0, neg_live = 0;
#pragma omp simd reduction(+ : sq_other, neg_other, neg_live)
  for (int64_t k = begin; k < end; ++k) {
    apl::NormalizerSums<acc_t> one;
    one.add_other(apl::log_prob(static_cast<acc_t>(z[k]), max, log_sum), e[k] * inv_sumexp, e[k] >= live_from,
                  no_focal, P);
    sq_other += one.sq_other;
    neg_other += one.neg_other;
    neg_live += one.neg_live;
  }
  sums.sq_other += sq_other;
  sums.neg_other += neg_other;
  sums.neg_live += neg_live;
}

// The passive term's sums over the classes k != y (amse, nnce: vector loops;
// nnfl: libm per class, which also fills focal_d[k] = f'(log p_k)).
template <typename scalar_t, typename acc_t>
void passive_sums_row(const scalar_t* z, const acc_t* e, int64_t y, int64_t K, acc_t inv_sumexp, acc_t live_from,
                      acc_t max, acc_t log_sum, acc_t* focal_d, const apl::LossParams& P,
                      apl::NormalizerSums<acc_t>& sums) {
  if (P.passive == apl::kAMSE || P.passive == apl::kNNCE) {
    auto segment = P.passive == apl::kAMSE ? passive_sums<apl::kAMSE, scalar_t, acc_t>
                                           : passive_sums<apl::kNNCE, scalar_t, acc_t>;
    segment(z, e, 0, y, inv_sumexp, live_from, max, log_sum, P.neg_A, sums);
    segment(z, e, y + 1, K, inv_sumexp, live_from, max, log_sum, P.neg_A, sums);
  } else if (P.passive == apl::kNNFL) {
    for (int64_t k = 0; k < K; ++k) {
      if (k == y) continue;
      const acc_t log_p = apl::log_prob(static_cast<acc_t>(z[k]), max, log_sum), p = e[k] * inv_sumexp;
      const auto f = apl::focal_terms(log_p, p, static_cast<acc_t>(P.gamma), P.grad_mode);
      focal_d[k] = f.deriv;
      sums.add_other(log_p, p, e[k] >= live_from, f, P);
    }
  }
}

// ece: whether a class before the label reaches the row's max (then the label
// is not torch.argmax's first index).
template <typename scalar_t, typename acc_t>
acc_t ece_ties(const scalar_t* z, int64_t y, acc_t max) {
  for (int64_t k = 0; k < y; ++k)
    if (apl::ties_before_label(static_cast<acc_t>(z[k]), k, y, max)) return acc_t(1);
  return acc_t(0);
}

// Pass 4 of the losses without nfl / ngce terms: c_const, p_k times a factor,
// and with kSq amse's c_sq p_k^2, with kNeg nnce's n_k c_neg.  The other
// coefficients are zeroed here, so their branches fold and the loop vectorises.
template <bool kSq, bool kNeg, typename scalar_t, typename acc_t>
void plain_grad_row(const acc_t* __restrict e, int64_t K, acc_t inv_sumexp, acc_t live_from, acc_t live_neg_from,
                    apl::GradCoefs<acc_t> c, const apl::LossParams& P, scalar_t* __restrict grad) {
  c.c_focal = 0;
  c.c_pow = 0;
  c.c_neg_focal = 0;
  if (!kSq) c.c_sq = 0;
  if (!kNeg) c.c_neg = 0;
  const acc_t zero = 0;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k)
    grad[k] = static_cast<scalar_t>(
        apl::grad_other_from(e[k] * inv_sumexp, e[k] >= live_from, e[k] >= live_neg_from, zero, c, P));
}

// Passes 3 and 4 of a row with a valid label y and finite logits, from its
// softmax statistics (passes 1 and 2) and e_k = exp(z_k - max) in `e`: returns
// its loss, writes its gradient row if grad != nullptr.  `e` and `focal_d` are
// per-thread scratch rows of K values.  `stats` by value: a local copy that no
// store can alias, so that the shared math's log(sumexp) and exp(l_y) calls,
// repeated in finish_row and grad_element, are computed once.
template <typename scalar_t, typename acc_t>
acc_t finish_fused_row(const scalar_t* __restrict z, int64_t y, const RowContext<acc_t>& ctx,
                       const apl::SoftmaxStats<acc_t> stats, scalar_t* __restrict grad, acc_t* __restrict e,
                       acc_t* __restrict focal_d) {
  const int64_t K = ctx.K;
  const acc_t max = stats.max, sumexp = stats.sumexp;
  const acc_t log_sum = stats.log_sum();
  const acc_t inv_sumexp = acc_t(1) / sumexp;

  // Pass 3.  The label is kept out of the vector loops (they run on the
  // segments around it, or with e[y] zeroed), so that `is_target` is a
  // constant in them.  Classes with p_k < P_MIN are told apart by e_k
  // (apl::live_threshold), here and in pass 4 alike.
  const acc_t live_from = apl::live_threshold(sumexp);
  const acc_t live_neg_from = static_cast<acc_t>(ctx.P.min_prob) * sumexp;  // n_k = [p_k >= min_prob]
  apl::NormalizerSums<acc_t> sums;
  if (ctx.second_pass) {
    const apl::LossParams& P = ctx.P;
    const bool clamped = P.passive == apl::kRCE || P.passive == apl::kNRCE;
    if (ctx.ngce) {
      (clamped ? ngce_sums_row<true, acc_t> : ngce_sums_row<false, acc_t>)(e, y, K, inv_sumexp, P, sums);
    } else if (ctx.nfl) {
      pick_focal_sums_row<scalar_t, acc_t>(P)(z, e, y, K, inv_sumexp, live_from, max, log_sum, focal_d, P, sums);
    } else if (clamped) {  // rce / nrce: only the clamped sums
      other_sums_row(e, y, K, live_from, inv_sumexp, sums);
    }
    passive_sums_row(z, e, y, K, inv_sumexp, live_neg_from, max, log_sum, focal_d, P, sums);
    if (P.active == apl::kECE) sums.ties = ece_ties(z, y, max);
  }

  const apl::RowResult<acc_t> row = apl::finish_row(stats, sums, static_cast<acc_t>(z[y]), K, ctx.P, ctx.weight);
  if (!grad) return row.loss;

  // Pass 4.  Zeroing the coefficients a loss does not use makes the pow and
  // focal branches of grad_other_from constant-false, so the loop vectorises.
  apl::GradCoefs<acc_t> c = row.grad;
  const apl::LossParams& P = ctx.P;
  switch (ctx.grad_pass) {
    case kGradFocal:
      c.c_pow = 0;
      c.c_sq = c.c_neg = c.c_neg_focal = 0;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k)
        grad[k] = static_cast<scalar_t>(
            apl::grad_other_from(e[k] * inv_sumexp, e[k] >= live_from, false, focal_d[k], c, P));
      break;
    case kGradPow: {  // live as add_prob() has it
      c.c_focal = 0;
      c.c_sq = c.c_neg = c.c_neg_focal = 0;
      const acc_t zero = 0;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const acc_t p = e[k] * inv_sumexp;
        grad[k] = static_cast<scalar_t>(apl::grad_other_from(p, apl::unclamped(p), false, zero, c, P, UnitPow()));
      }
      break;
    }
    case kGradPlain:
      plain_grad_row<false, false>(e, K, inv_sumexp, live_from, live_neg_from, c, P, grad);
      break;
    case kGradPlainSq:
      plain_grad_row<true, false>(e, K, inv_sumexp, live_from, live_neg_from, c, P, grad);
      break;
    case kGradPlainNeg:
      plain_grad_row<false, true>(e, K, inv_sumexp, live_from, live_neg_from, c, P, grad);
      break;
    default:  // kGradGeneric: every coefficient, libm powers
      for (int64_t k = 0; k < K; ++k) {
        const acc_t p = e[k] * inv_sumexp;
        const bool live = ctx.ngce ? apl::unclamped(p) : e[k] >= live_from;
        grad[k] = static_cast<scalar_t>(apl::grad_other_from(p, live, e[k] >= live_neg_from,
                                                             ctx.focal_scratch ? focal_d[k] : acc_t(0), c, P));
      }
      break;
  }
  // The label's p as finish_row computes it, so that its rce terms cancel exactly.
  grad[y] = static_cast<scalar_t>(apl::grad_element(static_cast<acc_t>(z[y]), true, c, P));
  return row.loss;
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

  // Pass 2, with sum (z - max) for nce: in blocks whose partial sums add up in
  // double, so that its error does not grow with K (an SSE2 loop has 4 lanes
  // of K / 4 terms each).
  acc_t sumexp = 0;
  double sum_shifted = 0;
  for (int64_t b = 0; b < K; b += kShiftedBlock) {
    const int64_t b_end = K - b > kShiftedBlock ? b + kShiftedBlock : K;
    acc_t part = 0;
#pragma omp simd reduction(+ : sumexp, part)
    for (int64_t k = b; k < b_end; ++k) {
      const acc_t shifted = static_cast<acc_t>(z[k]) - max;
      const acc_t ek = exp_nonpos(shifted);
      e[k] = ek;
      sumexp += ek;
      part += shifted;
    }
    sum_shifted += static_cast<double>(part);
  }
  apl::SoftmaxStats<acc_t> stats;
  stats.max = max;
  stats.sumexp = sumexp;
  stats.sum_shifted = static_cast<acc_t>(sum_shifted);
  stats.count = static_cast<acc_t>(K);
  return finish_fused_row(z, y, ctx, stats, grad, e, focal_d);
}


// Row i with any label: the ignored ones get loss and gradient 0, out-of-range
// ones (never read) NaN, the others fused_row.
template <typename scalar_t, typename acc_t>
acc_t one_row(const RowsArgs<scalar_t, acc_t>& a, int64_t i) {
  const int64_t K = a.ctx->K;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  scalar_t* gi = a.g ? a.g + i * K : nullptr;
  const int64_t y = a.t[i];
  if (y == a.ignore_index) {
    if (gi)
      for (int64_t k = 0; k < K; ++k) gi[k] = scalar_t(0);
    return 0;
  }
  if (y < 0 || y >= K) {
    if (gi)
      for (int64_t k = 0; k < K; ++k) gi[k] = static_cast<scalar_t>(nan);
    return nan;
  }
  return fused_row<scalar_t, acc_t>(a.z + i * a.row_stride, y, *a.ctx, gi, a.e, a.focal_d);
}

// Rows of few classes.  fused_row's loops would run a handful of iterations
// each and pay their setup and horizontal reductions once per row (130 ns a
// row at K = 2, slower than torch's cross_entropy).  Here passes 1 and 2 run
// for a tile of rows at once, one row per vector lane, on a transposed copy of
// the tile; passes 3 and 4 then run per row (finish_fused_row), as in fused_row.
constexpr int64_t kSmallK = 16;    // the widest rows that take this path
constexpr int64_t kTileRows = 16;  // two AVX2 vectors of floats per step

// Rows [begin, begin + n) of the batch, n <= kTileRows, K <= kSmallK.
template <typename scalar_t, typename acc_t>
void small_k_tile(const RowsArgs<scalar_t, acc_t>& a, int64_t begin, int64_t n, acc_t* loss) {
  const int64_t K = a.ctx->K;
  acc_t zt[kSmallK][kTileRows], et[kSmallK][kTileRows];  // [class][row]
  for (int64_t r = 0; r < kTileRows; ++r) {
    const scalar_t* zr = a.z + (begin + (r < n ? r : 0)) * a.row_stride;  // a short tile repeats its first row
    for (int64_t k = 0; k < K; ++k) zt[k][r] = static_cast<acc_t>(zr[k]);
  }
  // Pass 1 as in fused_row.
  acc_t max[kTileRows], sum_z[kTileRows], sumexp[kTileRows], shifted[kTileRows];
  for (int64_t r = 0; r < kTileRows; ++r) {
    max[r] = -INFINITY;
    sum_z[r] = sumexp[r] = shifted[r] = 0;
  }
  for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
    for (int64_t r = 0; r < kTileRows; ++r) {
      const acc_t v = zt[k][r];
      max[r] = v > max[r] ? v : max[r];
      sum_z[r] += v;
    }
  }
  // Pass 2.  K <= kSmallK terms: sum (z - max) needs no blocks in double.
  // z - max is NaN in rows with a NaN or an infinite max, which fused_row
  // redoes below; exp_nonpos is given 0 in their place.
  for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
    for (int64_t r = 0; r < kTileRows; ++r) {
      const acc_t d = zt[k][r] - max[r];
      const acc_t s = d <= acc_t(0) ? d : acc_t(0);
      const acc_t ek = exp_nonpos(s);
      et[k][r] = ek;
      sumexp[r] += ek;
      shifted[r] += s;
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const int64_t i = begin + r, y = a.t[i];
    if (std::isnan(sum_z[r]) || std::isinf(max[r]) || y == a.ignore_index || y < 0 || y >= K) {
      loss[r] = one_row(a, i);
      continue;
    }
    for (int64_t k = 0; k < K; ++k) a.e[k] = et[k][r];
    apl::SoftmaxStats<acc_t> stats;
    stats.max = max[r];
    stats.sumexp = sumexp[r];
    stats.sum_shifted = shifted[r];
    stats.count = static_cast<acc_t>(K);
    loss[r] = finish_fused_row(a.z + i * a.row_stride, y, *a.ctx, stats, a.g ? a.g + i * K : nullptr, a.e,
                               a.focal_d);
  }
}

}  // namespace

// Rows [begin, end) of the batch: the body of run()'s parallel_for.  Row i's
// loss goes to loss[i - begin].
template <typename scalar_t, typename acc_t>
void rows(const RowsArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end, acc_t* loss) {
  if (a.ctx->K <= kSmallK) {
    for (int64_t b = begin; b < end; b += kTileRows)
      small_k_tile(a, b, end - b < kTileRows ? end - b : kTileRows, loss + (b - begin));
    return;
  }
  for (int64_t i = begin; i < end; ++i) loss[i - begin] = one_row(a, i);
}

template void rows<float, float>(const RowsArgs<float, float>&, int64_t, int64_t, float*);
template void rows<double, double>(const RowsArgs<double, double>&, int64_t, int64_t, double*);
template void rows<c10::Half, float>(const RowsArgs<c10::Half, float>&, int64_t, int64_t, float*);
template void rows<c10::BFloat16, float>(const RowsArgs<c10::BFloat16, float>&, int64_t, int64_t, float*);
