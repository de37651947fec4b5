"""Registration of the fused ops with torch.library: fake (meta) kernels and autograd.

Every fused backend is one op with this schema (defined in C++ in
``csrc/apl_ops.cpp`` for the CPU and CUDA kernels, and as a ``triton_op`` in
``apl_kernels/triton/op.py``):

    fused_loss(Tensor logits, Tensor target,
               int active, int passive, float alpha, float beta, float gamma,
               float q, float A, int grad_mode, float a, float m, int t, float min_prob,
               int reduction, int ignore_index, bool compute_grad) -> (Tensor loss, Tensor grad)

    logits  [N, K], float16/bfloat16/float32/float64, stride(1) == 1, any row stride.
    target  [N] int64; rows equal to ignore_index get zero loss and gradient; a
            label outside [0, K) gives a NaN loss row and is never read out of bounds.
    The twelve spec arguments are ``LossSpec.op_args()``.
    loss    reduced as `reduction` (0 none -> [N], 1 mean, 2 sum -> []), float32
            (float64 for float64 logits).  mean over zero kept rows is 0.
    grad    d loss / d logits with the reduction's weight folded in (1/count for
            mean), shape [N, K], contiguous, in the logits' dtype; an empty tensor
            when compute_grad is False.

Because the forward already holds the gradient, backward is a scale by grad_output.
"""
from __future__ import annotations

import torch

from .spec import REDUCTIONS

_REDUCTION_NONE = REDUCTIONS["none"]


def fake_fused_loss(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t, min_prob,
                    reduction, ignore_index, compute_grad):
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss_shape = (logits.shape[0],) if reduction == _REDUCTION_NONE else ()
    loss = logits.new_empty(loss_shape, dtype=loss_dtype)
    grad = logits.new_empty(logits.shape if compute_grad else (0,), dtype=logits.dtype)
    return loss, grad


def _tracing(*tensors) -> bool:
    """True under torch.compile, make_fx or with fake/functional tensors (opcheck, AOT autograd)."""
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors):
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    return get_proxy_mode() is not None


def _setup_context(ctx, inputs, output):
    # The last three inputs are reduction, ignore_index, compute_grad; counted
    # from the end, so that ops with fewer spec arguments share this code.
    ctx.num_inputs = len(inputs)
    ctx.reduction = inputs[-3]
    ctx.save_for_backward(output[1])
    # The gradient output is not differentiable; without this autograd would
    # hand backward a materialised [N, K] tensor of zeros for it: an extra
    # allocation and a full pass.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _unused_grad_of_grad):
    (grad,) = ctx.saved_tensors
    no_grads = (None,) * (ctx.num_inputs - 1)
    if grad_loss is None:  # no gradient flows into the loss (grads are not materialised)
        return (None,) + no_grads
    if ctx.reduction == _REDUCTION_NONE:
        scale = grad_loss.unsqueeze(1)
    else:
        scale = grad_loss
        # On the CPU reading the scalar costs nothing, and the usual
        # `loss.backward()` (scale 1) then needs no pass over the gradient.
        # Never while tracing: a branch on the value would be baked into the graph.
        if grad.device.type == "cpu" and not _tracing(grad, scale) and scale.item() == 1.0:
            return (grad,) + no_grads
    # Multiply in the scale's precision, writing the gradient's dtype: a GradScaler
    # scale (65536) cast to fp16 first would be inf.
    return (torch.mul(grad, scale, out=torch.empty_like(grad)),) + no_grads


def register_fused_autograd(op) -> None:
    """Give a fused op (C++ or Triton) its fake kernel's partner: the autograd formula."""
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


# The compiled extension registers torch.ops.apl_kernels.fused_loss (CPU, and
# CUDA when built).  Without it the package still works with the reference.
try:
    from . import _C
    EXTENSION_ERROR = None
except ImportError as error:
    _C = None
    EXTENSION_ERROR = error

if _C is not None:
    torch.library.register_fake("apl_kernels::fused_loss")(fake_fused_loss)
    register_fused_autograd("apl_kernels::fused_loss")
