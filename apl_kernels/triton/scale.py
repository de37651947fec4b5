"""The backward's "scale unless 1" step: grad *= grad_output, in place, on the device.

The fused ops compute the gradient in the forward, so backward only scales it by
grad_output.  The usual ``loss.backward()`` passes 1, and reading it on the host
to skip the pass would sync.  This kernel reads the scale on the device instead:
every program returns before touching the gradient when its scales are all 1, so
``loss.backward()`` costs one launch and no pass over [N, K].  Otherwise it
multiplies in fp32 (fp64 for fp64 gradients): a GradScaler scale of 65536
would be inf in fp16.

Used by ``apl_kernels/ops.py`` ``scale_gradient_`` for CUDA tensors when the
C++ extension was built without CUDA (a CUDA build has the same step as the C++
op ``apl_kernels::scale_rows_``, ``csrc/cuda/apl_cuda_scale.cu``: predicted a
few us of host time a call, against tens for a Triton launch from Python); it
also runs on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK_R = 4       # rows per program
BLOCK_K = 1024    # columns per program


@triton.jit
def _scale_rows_kernel(grad_ptr, scale_ptr, N, K, grad_row_stride, scale_stride,
                       COMPUTE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # scale_stride is 0 for one scalar (a reduced loss) and the row stride of
    # grad_output for per-row scales (reduction="none").
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    scale = tl.load(scale_ptr + rows * scale_stride, mask=row_ok, other=1.0).to(COMPUTE)
    if tl.sum((scale != 1.0).to(tl.int32), axis=0) == 0:   # NaN != 1: a NaN scale is applied
        return
    cols = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = row_ok[:, None] & (cols < K)[None, :]
    ptrs = grad_ptr + rows[:, None] * grad_row_stride + cols[None, :]
    g = tl.load(ptrs, mask=mask)
    tl.store(ptrs, (g.to(COMPUTE) * scale[:, None]).to(g.dtype), mask=mask)


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad[i, :] *= scale (0-dim) or scale[i] ([N]), in place; returns grad.

    grad: [N, K] with unit column stride (any row stride).  No host sync; a
    program whose scales are all 1 returns without reading the gradient.
    """
    if grad.dim() != 2 or (grad.shape[1] > 1 and grad.stride(1) != 1):
        raise ValueError(f"scale_rows_ needs a 2-D gradient with unit column stride, got shape "
                         f"{tuple(grad.shape)} and strides {grad.stride()}")
    N, K = grad.shape
    if scale.dim() == 0:
        scale_stride = 0
    elif scale.shape == (N,):
        scale_stride = scale.stride(0)
    else:
        raise ValueError(f"scale must be 0-dim or [{N}], got shape {tuple(scale.shape)}")
    if scale.device != grad.device:
        raise ValueError(f"scale is on {scale.device} but the gradient is on {grad.device}")
    if grad.numel() == 0:
        return grad
    compute = tl.float64 if grad.dtype == torch.float64 else tl.float32
    grid = (-(-N // BLOCK_R), -(-K // BLOCK_K))   # not triton.cdiv: ~10 us of host time a call
    # Launch on the tensors' device, whichever device is current.
    guard = torch.cuda.device(grad.device) if grad.is_cuda else contextlib.nullcontext()
    with guard:
        _scale_rows_kernel[grid](grad, scale, N, K, grad.stride(0), scale_stride,
                                 COMPUTE=compute, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, num_warps=4)
    return grad
