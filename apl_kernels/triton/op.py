"""The Triton backend as torch.library ops.

``fused_loss_triton`` implements the fused-op schema of ``apl_kernels/ops.py``
(the shared autograd: backward scales the saved gradient by grad_output).  It is
a ``triton_op``, so torch.compile traces through it into the kernels
(fullgraph) and it can be captured in a CUDA graph: no host sync anywhere.

``fused_loss_triton_inplace`` is the opt-in in-place mode: the gradient is
written over the logits (no second [N, K] buffer).  It is a separate op with
``mutates_args=("logits",)``; ``inplace_loss`` wraps it in an autograd.Function
that marks the logits dirty, so autograd's version counter catches any later
use of the logits' old values (see ``inplace_loss``).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
from torch.library import triton_op

from .. import ops
from . import kernels

# Under TRITON_INTERPRET=1, wrap_triton hands back the raw interpreted kernel,
# which cannot be traced with fake tensors; there the ops are opaque custom_ops
# (same schema, explicit fake kernels) so that torch.compile still works on CPU.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _define(name, mutates_args, fake):
    if not _INTERPRETING:
        return triton_op(name, mutates_args=mutates_args)

    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        return op
    return wrap


def _fake_inplace(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t, min_prob,
                  reduction, ignore_index):
    return ops.fake_fused_loss(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t,
                               min_prob, reduction, ignore_index, False)[0]


@_define("apl_kernels::fused_loss_triton", (), ops.fake_fused_loss)
def fused_loss_triton(logits: torch.Tensor, target: torch.Tensor, active: int, passive: int, alpha: float,
                      beta: float, gamma: float, q: float, A: float, grad_mode: int, a: float, m: float, t: int,
                      min_prob: float, reduction: int, ignore_index: int,
                      compute_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    return kernels.launch(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t, min_prob,
                          reduction, ignore_index, compute_grad)


ops.register_fused_autograd(fused_loss_triton, triton_on_cpu=True)


@_define("apl_kernels::fused_loss_triton_inplace", ("logits",), _fake_inplace)
def fused_loss_triton_inplace(logits: torch.Tensor, target: torch.Tensor, active: int, passive: int,
                              alpha: float, beta: float, gamma: float, q: float, A: float, grad_mode: int,
                              a: float, m: float, t: int, min_prob: float, reduction: int,
                              ignore_index: int) -> torch.Tensor:
    """The loss; the gradient (reduction weight folded in) replaces the logits."""
    loss, _ = kernels.launch(logits, target, active, passive, alpha, beta, gamma, q, A, grad_mode, a, m, t,
                             min_prob, reduction, ignore_index, False, grad_out=logits)
    return loss


class _InplaceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, *args):
        loss = fused_loss_triton_inplace(logits, target, *args)
        ctx.mark_dirty(logits)
        ctx.mark_non_differentiable(logits)
        ctx.save_for_backward(logits)
        ctx.reduction = args[-2]         # args: spec..., reduction, ignore_index
        ctx.used = False
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_overwritten):
        if ctx.used:
            raise RuntimeError("apl_kernels overwrite_logits=True: the gradient buffer was consumed by the "
                               "first backward; backward twice (retain_graph=True) is not supported")
        if torch.is_grad_enabled():
            raise RuntimeError("apl_kernels overwrite_logits=True does not support create_graph=True (double "
                               "backward, gradient penalties): the logits it would differentiate are overwritten")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        # Scale in place, in fp32: the point of this mode is to never hold two [N, K] buffers.
        ops.scale_gradient_(grad, grad_loss, ctx.reduction, device_side=True)
        return (grad,) + (None,) * (len(ctx.needs_input_grad) - 1)


def inplace_loss(logits: torch.Tensor, target: torch.Tensor, *args) -> torch.Tensor:
    """Loss whose gradient overwrites `logits` (args: spec op_args, reduction, ignore_index).

    The logits must be a non-leaf tensor that nothing else needs afterwards (for
    example the output of the last Linear, which saves its input, not its
    output).  Autograd catches misuse: a leaf that requires grad is refused, and
    backward through any op that saved these logits raises the version-counter
    error.  After the call `logits` holds the gradient; backward runs once.
    """
    if logits.is_leaf and logits.requires_grad:
        raise RuntimeError("overwrite_logits=True: the logits are a leaf that requires grad; the gradient "
                           "cannot be written over them (pass the output of a layer, or use the default)")
    loss, _ = _InplaceLoss.apply(logits, target, *args)
    return loss
