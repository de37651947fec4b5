// Argument checks of apl_kernels::fused_loss, shared by the CPU and CUDA
// implementations: both see the same tensors and codes, and must reject the
// same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include "apl_loss_math.h"

namespace apl {

// Checks the op's arguments and returns the LossSpec as the kernels take it.
inline LossParams checked_loss_params(const at::Tensor& logits, const at::Tensor& target, int64_t active,
                                      int64_t passive, double alpha, double beta, double gamma, double q,
                                      double A, int64_t grad_mode, double a, double m, int64_t t,
                                      double min_prob, int64_t reduction) {
  TORCH_CHECK(logits.dim() == 2, "fused_loss: logits must be [N, K], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 2, "fused_loss: need K >= 2 classes, got ", logits.size(1));
  TORCH_CHECK(logits.size(0) == 0 || logits.stride(1) == 1, "fused_loss: logits need stride(1) == 1, got strides ",
              logits.strides());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "fused_loss: target must be [N] = [",
              logits.size(0), "], got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "fused_loss: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "fused_loss: logits and target must be on the same device, got ",
              logits.device(), " and ", target.device());
  TORCH_CHECK(active >= kActiveNone && active < kActiveEnd, "fused_loss: bad active term code ", active);
  TORCH_CHECK(passive >= kPassiveNone && passive < kPassiveEnd, "fused_loss: bad passive term code ", passive);
  TORCH_CHECK(active <= kNGCE && passive <= kNRCE, "fused_loss: the C++ kernels do not implement term codes ", active,
              "+", passive, " yet (this build predates them); use backend='reference'");
  TORCH_CHECK(t >= 1 && t <= kMaxTaylorOrder, "fused_loss: the Taylor order t must lie in [1, ", kMaxTaylorOrder,
              "], got ", t);
  TORCH_CHECK(active != kActiveNone || passive != kPassiveNone, "fused_loss: both terms are none");
  TORCH_CHECK(grad_mode == kOfficial || grad_mode == kExact, "fused_loss: bad grad mode ", grad_mode);
  TORCH_CHECK(reduction >= kReduceNone && reduction <= kReduceSum, "fused_loss: bad reduction ", reduction);
  return LossParams{static_cast<int>(active), static_cast<int>(passive), alpha, beta, gamma, q, A,
                    static_cast<int>(grad_mode), a, m, static_cast<int>(t), min_prob};
}

}  // namespace apl
