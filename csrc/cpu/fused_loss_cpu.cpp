// The fused CPU kernel of apl_kernels::fused_loss (schema in csrc/apl_ops.cpp).
//
// Rows run in parallel (at::parallel_for); each row makes these passes over
// its K logits, with all loss math from csrc/apl_loss_math.h:
//   1. max and sum z                                  (reads z)
//   2. e_k = exp(z_k - max) into a per-thread buffer, sum e_k, sum (z_k - max)
//   3. the normaliser sums, only if apl::needs_second_pass (reads z and e)
//   4. the gradient, weight of the reduction included (reads e, writes grad):
//      a vectorised loop per family of losses (GradPass), a generic one else.
// Rows of K <= 16 classes run passes 1 and 2 for 16 rows at once, one row per
// vector lane (small_k_tile in cpu/fused_rows_impl.h): per row, those loops
// would cost more in setup than in work.
// Accumulation is in at::opmath_type: float for half/bfloat16/float, double
// for double.  A reduced loss is summed in fixed blocks of rows (run()), so
// the result does not depend on the number of threads.
//
// Speed: the loops are written for GCC's vectoriser: `omp simd` reductions,
// selects before sums, known-constant LossParams, the shared math
// force-inlined, exp/log from cpu/vec_math.h.  The row passes
// (cpu/fused_rows_impl.h) are compiled three times: here for the baseline ISA
// (no -march, SSE2), and in fused_loss_cpu_avx2.cpp / _avx512.cpp under
// `#pragma GCC target`; run() picks the widest one the CPU supports (cpuid),
// capped by the environment variable APL_CPU_ISA=base|avx2.
// Check with -fopt-info-vec (every ISA) after changing a loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <limits>
#include <tuple>
#include <vector>

#include "apl_loss_math.h"
#include "apl_op_args.h"
#include "cpu/fused_rows.h"
#include "cpu/grad_buffer.h"

namespace apl_cpu {
namespace base {
#include "cpu/fused_rows_impl.h"
}  // namespace base

namespace {

// The row loops of the widest ISA this CPU has, chosen once.
template <typename scalar_t, typename acc_t>
using RowsFn = void (*)(const RowsArgs<scalar_t, acc_t>&, int64_t, int64_t, acc_t*);

template <typename scalar_t, typename acc_t>
RowsFn<scalar_t, acc_t> pick_rows() {
#if APL_CPU_X86_VARIANTS
  __builtin_cpu_init();
  // APL_CPU_ISA=base|avx2 caps the choice (tests, benchmarks of the baseline).
  const char* cap = std::getenv("APL_CPU_ISA");
  const std::string isa = cap ? cap : "";
  const bool avx2 = isa != "base" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && isa != "avx2" && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq");
  if (avx512) return &avx512::rows<scalar_t, acc_t>;
  if (avx2) return &avx2::rows<scalar_t, acc_t>;
#endif
  return &base::rows<scalar_t, acc_t>;
}

// Rows per partial sum of a reduced loss: the partials are summed in order,
// so the total does not depend on the thread count, and no [N] buffer of row
// losses is allocated.
constexpr int64_t kRowsPerPartial = 64;

// Runs every row; returns the sum of the row losses (reduction mean / sum) or
// writes them to row_loss (reduction none).
template <typename scalar_t>
double run(const at::Tensor& logits, const at::Tensor& target, const apl::LossParams& P, int64_t reduction,
           int64_t ignore_index, int64_t kept, at::Tensor& row_loss, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), K = logits.size(1), row_stride = logits.stride(0);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  const int64_t* t = target.const_data_ptr<int64_t>();
  scalar_t* g = grad.numel() ? grad.data_ptr<scalar_t>() : nullptr;

  const bool nfl = P.active == apl::kNFL, focal_scratch = nfl || P.passive == apl::kNNFL;
  RowContext<acc_t> ctx{P, K, acc_t(1), apl::needs_second_pass(P), nfl, P.active == apl::kNGCE, focal_scratch,
                        grad_pass_of(P)};
  if (reduction == apl::kReduceMean && kept > 0) ctx.weight = acc_t(1) / static_cast<acc_t>(kept);
  static const RowsFn<scalar_t, acc_t> rows_fn = pick_rows<scalar_t, acc_t>();
  // About 64k logits per task: enough work to pay for a thread.
  const int64_t grain = std::max<int64_t>(1, 65536 / K);

  if (reduction == apl::kReduceNone) {
    acc_t* out = row_loss.data_ptr<acc_t>();
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> e(K), focal_d(ctx.focal_scratch ? K : 0);  // per-thread scratch rows
      const RowsArgs<scalar_t, acc_t> args{z, row_stride, t, ignore_index, &ctx, g, e.data(), focal_d.data()};
      rows_fn(args, begin, end, out + begin);
    });
    return 0.0;
  }
  const int64_t blocks = (N + kRowsPerPartial - 1) / kRowsPerPartial;
  std::vector<double> partial(blocks);
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain / kRowsPerPartial), [&](int64_t first, int64_t last) {
    std::vector<acc_t> e(K), focal_d(ctx.focal_scratch ? K : 0);
    const RowsArgs<scalar_t, acc_t> args{z, row_stride, t, ignore_index, &ctx, g, e.data(), focal_d.data()};
    acc_t losses[kRowsPerPartial];
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * kRowsPerPartial, end = std::min(N, begin + kRowsPerPartial);
      rows_fn(args, begin, end, losses);
      double sum = 0;  // in double: as exact as the row losses
      for (int64_t i = 0; i < end - begin; ++i) sum += static_cast<double>(losses[i]);
      partial[b] = sum;
    }
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                  int64_t active, int64_t passive, double alpha, double beta,
                                                  double gamma, double q, double A, int64_t grad_mode, double a,
                                                  double m, int64_t taylor_t, double min_prob, int64_t reduction,
                                                  int64_t ignore_index, bool compute_grad) {
  const apl::LossParams P = apl::checked_loss_params(logits, target, active, passive, alpha, beta, gamma, q, A,
                                                   grad_mode, a, m, taylor_t, min_prob, reduction);
  const int64_t N = logits.size(0), K = logits.size(1);
  const at::Tensor t = target.contiguous();
  int64_t kept = 0;
  const int64_t* ti = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) kept += ti[i] != ignore_index;

  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor row_loss = at::empty(reduction == apl::kReduceNone ? N : 0, logits.options().dtype(loss_dtype));
  at::Tensor grad = compute_grad ? empty_gradient({N, K}, logits.options()) : at::empty({0}, logits.options());
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cpu", [&] {
    total = run<scalar_t>(logits, t, P, reduction, ignore_index, kept, row_loss, grad);
  });

  if (reduction == apl::kReduceNone) return {row_loss, grad};
  if (reduction == apl::kReduceMean) total = kept > 0 ? total / static_cast<double>(kept) : 0.0;
  return {at::scalar_tensor(total, logits.options().dtype(loss_dtype)), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(apl_kernels, CPU, m) { m.impl("fused_loss", &fused_loss_cpu); }

}  // namespace apl_cpu
