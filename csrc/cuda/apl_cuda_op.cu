// The CUDA implementation of apl_kernels::fused_loss (schema in csrc/apl_ops.cpp).
//
// Launches on the current stream, never synchronises with the host:
//   reduction none:  the loss kernel writes the row losses.
//   reduction sum:   one block: the loss kernel writes the sum.  Several: zero
//                    the workspace header; the blocks each write a partial sum
//                    and the last block adds them up.
//   reduction mean:  as sum; the gradient's weight 1/count is needed before the
//                    loss kernel writes a gradient, so every block of the loss
//                    kernel counts the kept rows itself (one block always, several
//                    when that re-read of the labels is small next to the logits or
//                    one round of loads a thread), or a count kernel runs first.
// So [128, 10] mean is one launch.  A label outside [0, K) that is not
// ignore_index is a device-side assert (apl_cuda_common.cuh row_status).
// K <= kSmallKMax runs the warp-group kernel (fp64: K <= 62), larger K the
// block-per-row kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

#include "apl_op_args.h"
#include "cuda/apl_cuda_common.cuh"

namespace apl_cuda {
namespace {

constexpr int64_t kSingleBlockCount = 16384;  // rows counted by one block of count_kept_kernel (no memset needed)

// Whether each block of the loss kernel counts the kept rows itself: one block;
// or the grid's re-reads of the labels (8 bytes a row, from L2) are at most a
// quarter of the logits' bytes; or the labels are one round of loads for each
// thread (count_kept_rows), cheaper than a launch.
bool count_in_kernel(int64_t grid, int64_t threads, int64_t N, int64_t K, int64_t element_bytes) {
  return grid == 1 || grid * 32 <= K * element_bytes || N <= kCountLoadsPerThread * threads;
}

// APL_CUDA_PREFETCH=0: A/B knob for the GPU session (large K's prefetch of the next
// row into L2), read once.
bool prefetch_next_row_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("APL_CUDA_PREFETCH");
    return !(env && env[0] == '0');
  }();
  return on;
}

// Counts the rows with target != ignore_index into ws->count and zeroes the
// ticket.  One block: writes both.  Several: the header was zeroed, atomics add.
__global__ void __launch_bounds__(1024) count_kept_kernel(const int64_t* target, int64_t N, int64_t ignore_index,
                                                           Workspace* ws) {
  unsigned long long c = 0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (; i + 7 * stride < N; i += 8 * stride) {  // 8 independent loads in flight per thread
    int64_t v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = __ldg(target + i + u * stride);
#pragma unroll
    for (int u = 0; u < 8; ++u) c += v[u] != ignore_index;
  }
  for (; i < N; i += stride) c += __ldg(target + i) != ignore_index;
  for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
  __shared__ unsigned long long warp_sums[32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x != 0) return;
  unsigned long long total = 0;
  for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) total += warp_sums[w];
  if (gridDim.x == 1) {
    ws->count = total;
    ws->ticket = 0;
  } else {
    atomicAdd(&ws->count, total);  // integers: order does not matter
  }
}

template <typename scalar_t>
void run(const at::Tensor& logits, const at::Tensor& target, const apl::LossParams& P, int64_t reduction,
         int64_t ignore_index, at::Tensor& loss, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = logits.size(0), K = logits.size(1);
  Args<scalar_t> a;
  a.logits = logits.const_data_ptr<scalar_t>();
  a.row_stride = logits.stride(0);
  a.N = N;
  a.K = K;
  a.target = target.const_data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  a.grad = grad.numel() > 0 ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  a.loss = loss.mutable_data_ptr<acc_t>();
  a.ws = nullptr;
  a.count_in_kernel = false;
  a.prefetch_next_row = prefetch_next_row_enabled();
  a.P = P;
  a.reduction = int(reduction);
  a.second_pass = apl::needs_second_pass(P);
  a.device = logits.get_device();

  const bool small = small_k_supports<scalar_t>(K);
  const LaunchPlan plan = small ? plan_small_k(a) : plan_large_k(a);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const bool mean = reduction == apl::kReduceMean;
  a.count_in_kernel = mean && count_in_kernel(plan.grid, plan.threads, N, K, int64_t(sizeof(scalar_t)));
  at::Tensor workspace;  // kept alive until the kernels are queued (the allocator is stream-ordered)
  if (reduction != apl::kReduceNone && (plan.grid > 1 || (mean && !a.count_in_kernel))) {
    workspace = at::empty({kWorkspaceHeader + 8 * plan.grid}, logits.options().dtype(at::kByte));
    a.ws = reinterpret_cast<Workspace*>(workspace.mutable_data_ptr());
    if (mean && !a.count_in_kernel && N <= kSingleBlockCount) {
      count_kept_kernel<<<1, 1024, 0, stream>>>(a.target, N, ignore_index, a.ws);  // zeroes the ticket too
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      C10_CUDA_CHECK(cudaMemsetAsync(a.ws, 0, kWorkspaceHeader, stream));
      if (mean && !a.count_in_kernel) {
        const int64_t sms = at::cuda::getDeviceProperties(a.device)->multiProcessorCount;
        const int64_t blocks = std::min<int64_t>((N + 4095) / 4096, 4 * sms);
        count_kept_kernel<<<unsigned(std::max<int64_t>(blocks, 2)), 256, 0, stream>>>(a.target, N, ignore_index,
                                                                                      a.ws);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
  if (small) launch_small_k(a, plan, stream);
  else launch_large_k(a, plan, stream);
}

std::tuple<at::Tensor, at::Tensor> fused_loss_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                   int64_t active, int64_t passive, double alpha, double beta,
                                                   double gamma, double q, double A, int64_t grad_mode, double a,
                                                   double m, int64_t taylor_t, double min_prob, int64_t reduction,
                                                   int64_t ignore_index, bool compute_grad) {
  const apl::LossParams P = apl::checked_loss_params(logits, target, active, passive, alpha, beta, gamma, q, A,
                                                   grad_mode, a, m, taylor_t, min_prob, reduction);
  TORCH_CHECK(logits.is_cuda(), "fused_loss: the CUDA kernel got ", logits.device(), " tensors");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t N = logits.size(0), K = logits.size(1);
  const at::Tensor t = target.contiguous();
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = at::empty(compute_grad ? at::IntArrayRef{N, K} : at::IntArrayRef{0}, logits.options());
  at::Tensor loss = reduction == apl::kReduceNone ? at::empty({N}, logits.options().dtype(loss_dtype))
                                                  : at::empty({}, logits.options().dtype(loss_dtype));
  if (N == 0) {
    if (reduction != apl::kReduceNone) loss.zero_();  // mean over no rows is 0
    return {loss, grad};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "apl_fused_loss_cuda", [&] {
    run<scalar_t>(logits, t, P, reduction, ignore_index, loss, grad);
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(apl_kernels, CUDA, m) { m.impl("fused_loss", &fused_loss_cuda); }

}  // namespace apl_cuda
