// The CUDA implementation of apl_kernels::scale_rows_ (schema in csrc/apl_ops.cpp):
// the backward's "scale unless 1" step, grad[i, :] *= scale (0-dim) or scale[i] ([N]),
// in place.  Same semantics as apl_kernels/triton/scale.py; a C++ op because a
// Triton launch from Python costs tens of microseconds of host time.
//
// The scale is read on the device, never on the host (no sync): a block whose
// scales are all 1 returns before it reads the gradient, so the usual
// loss.backward() (grad_output 1) costs one launch and no pass over [N, K].
// Otherwise the multiply runs in fp32 (fp64 for fp64 gradients): a GradScaler
// scale of 65536 would be inf in fp16.  A NaN scale is not 1, so it is applied.
//
// A block covers up to kBlockElements elements: whole rows when K fits (up to
// kThreads rows, so each thread reads at most one scale), else a chunk of one row.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace apl_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockElements = 4096;  // 16 per thread

template <typename grad_t, typename scale_t>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(grad_t* grad, const scale_t* scale, int64_t N, int64_t K, int64_t row_stride,
                      int64_t scale_stride, int rows_per_block, int64_t cols_per_block) {
  using acc_t = at::opmath_type<grad_t>;
  __shared__ acc_t row_scale[kThreads];
  const int64_t row0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t col0 = int64_t(blockIdx.y) * cols_per_block;
  const int rows = int(std::min<int64_t>(rows_per_block, N - row0));
  const int cols = int(std::min<int64_t>(cols_per_block, K - col0));
  bool not_one = false;
  if (int(threadIdx.x) < rows) {
    // scale_stride 0: one scalar (a reduced loss); else grad_output's stride (reduction "none").
    const acc_t s = acc_t(scale[(row0 + threadIdx.x) * scale_stride]);
    row_scale[threadIdx.x] = s;
    not_one = !(s == acc_t(1));  // NaN is not 1: applied
  }
  if (!__syncthreads_or(not_one)) return;  // every scale 1: the gradient is not read
  // Element e = r * cols + c of the block, e = threadIdx.x + i * kThreads: (r, c)
  // advance by (kThreads / cols, kThreads % cols) with a carry, not a division an element.
  const int step_r = kThreads / cols, step_c = kThreads % cols;
  int r = int(threadIdx.x) / cols, c = int(threadIdx.x) % cols;
  for (; r < rows; r += step_r, c += step_c) {
    if (c >= cols) {
      c -= cols;
      if (++r >= rows) break;
    }
    grad_t* p = grad + (row0 + r) * row_stride + col0 + c;
    *p = grad_t(acc_t(*p) * row_scale[r]);
  }
}

template <typename grad_t, typename scale_t>
void launch(at::Tensor& grad, const at::Tensor& scale, int64_t scale_stride) {
  const int64_t N = grad.size(0), K = grad.size(1);
  const int rows_per_block = int(std::clamp<int64_t>(kBlockElements / K, 1, kThreads));
  const int64_t cols_per_block = std::min(K, kBlockElements);
  const int64_t row_blocks = (N + rows_per_block - 1) / rows_per_block;
  const int64_t col_blocks = (K + cols_per_block - 1) / cols_per_block;
  TORCH_CHECK(row_blocks < (int64_t(1) << 31) && col_blocks <= 65535, "scale_rows_: a gradient of shape [", N,
              ", ", K, "] is beyond the launch grid");
  const dim3 grid{unsigned(row_blocks), unsigned(col_blocks)};
  scale_rows_kernel<grad_t, scale_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      grad.mutable_data_ptr<grad_t>(), scale.const_data_ptr<scale_t>(), N, K, grad.stride(0), scale_stride,
      rows_per_block, cols_per_block);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool is_float_type(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

at::Tensor& scale_rows_cuda_(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && (grad.size(1) <= 1 || grad.stride(1) == 1),
              "scale_rows_ needs a 2-D gradient with unit column stride, got shape ", grad.sizes(), " and strides ",
              grad.strides());
  const int64_t N = grad.size(0);
  TORCH_CHECK(scale.dim() == 0 || (scale.dim() == 1 && scale.size(0) == N), "scale_rows_: scale must be 0-dim or [",
              N, "], got shape ", scale.sizes());
  TORCH_CHECK(grad.is_cuda(), "scale_rows_: the CUDA kernel got a gradient on ", grad.device());
  TORCH_CHECK(scale.device() == grad.device(), "scale_rows_: scale is on ", scale.device(),
              " but the gradient is on ", grad.device());
  TORCH_CHECK(is_float_type(grad.scalar_type()) && is_float_type(scale.scalar_type()),
              "scale_rows_: the gradient and the scale must be float16, bfloat16, float32 or float64, got ",
              grad.scalar_type(), " and ", scale.scalar_type());
  at::assert_no_internal_overlap(grad);  // rows that share memory would be scaled twice
  if (grad.numel() == 0) return grad;
  const int64_t scale_stride = scale.dim() == 0 ? 0 : scale.stride(0);
  const c10::cuda::CUDAGuard guard(grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "apl_scale_rows_cuda", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scale.scalar_type(), "apl_scale_rows_cuda_scale",
                                    [&] { launch<grad_t, scalar_t>(grad, scale, scale_stride); });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(apl_kernels, CUDA, m) { m.impl("scale_rows_", &scale_rows_cuda_); }

}  // namespace apl_cuda
