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
            label outside [0, K) is never read out of bounds: the CPU kernel gives
            its row a NaN loss, the GPU kernels (CUDA, Triton) raise a device-side
            assert, as F.cross_entropy (the functional API's check_targets).
    The twelve spec arguments are ``LossSpec.op_args()``.
    loss    reduced as `reduction` (0 none -> [N], 1 mean, 2 sum -> []), float32
            (float64 for float64 logits).  mean over zero kept rows is 0.
    grad    d loss / d logits with the reduction's weight folded in (1/count for
            mean), shape [N, K], contiguous, in the logits' dtype; an empty tensor
            when compute_grad is False.

Backward.  The forward already holds the gradient, so a backward only scales it
by grad_output (0-dim, or [N] for reduction "none"), multiplying in fp32 (fp64
for fp64 logits) so that a GradScaler scale of 65536 cannot overflow fp16:

* The first backward scales the saved buffer in place and hands it over: no
  second [N, K] buffer, and no pass at all when grad_output is 1 (the usual
  ``loss.backward()``).  On CPU tensors the scale is read on the host, which is
  free there; on CUDA tensors a device-side "scale unless 1" kernel returns
  early when it is 1, so there is no host sync: the C++ op
  ``apl_kernels::scale_rows_`` (``csrc/cuda/apl_cuda_scale.cu``; predicted a
  few us of host time a call) when the extension was built with CUDA, else the
  Triton kernel (``triton/scale.py``; a Triton launch from Python costs tens of us).
* A later backward of the same graph (``retain_graph=True``) recomputes the
  gradient with the fused op from the saved logits and labels into a new
  buffer, so no two returned gradients share storage: a hook or an in-place
  change of one returned gradient cannot affect another.
* A backward run with grad mode on (``create_graph=True``: a gradient penalty,
  double backward) recomputes the gradient differentiably from the reference
  formulas (``reference.py``), so second derivatives are right.

The logits and labels are therefore kept until the graph is freed (as the
saved inputs of any op); ``overwrite_logits=True`` (Triton) is the mode that
keeps no second [N, K] tensor.  Under torch.compile and other tracing the
backward is a plain out-of-place multiply (in fp32), which the compiler fuses.

The formula is registered with torch.library (a direct call of the op, and any
tracing, use it); the functional API's eager calls apply the same two functions
through ``_EagerFusedLoss`` (``call_fused``), which skips the per-call schema walk
of torch.library's wrapper.
"""
from __future__ import annotations

import dataclasses

import torch

from .reference import reference_loss
from .spec import ACTIVE_TERMS, GRAD_MODES, PASSIVE_TERMS, REDUCTIONS, LossSpec

_REDUCTION_NONE = REDUCTIONS["none"]
_REDUCTION_NAMES = {code: name for name, code in REDUCTIONS.items()}
# How LossSpec.op_args() encodes its non-numeric fields (the others pass unchanged).
_SPEC_FIELD_CODES = {"active": ACTIVE_TERMS, "passive": PASSIVE_TERMS, "grad": GRAD_MODES}


def fake_fused_loss(logits, target, *args):
    """The fake (meta) kernel of every fused op; args: spec..., reduction, ignore_index, compute_grad."""
    reduction, compute_grad = args[-3], args[-1]
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss_shape = (logits.shape[0],) if reduction == _REDUCTION_NONE else ()
    loss = logits.new_empty(loss_shape, dtype=loss_dtype)
    grad = logits.new_empty(logits.shape if compute_grad else (0,), dtype=logits.dtype)
    return loss, grad


def spec_from_op_args(spec_args) -> LossSpec:
    """The LossSpec whose ``op_args()`` are `spec_args` (the inverse the double backward needs)."""
    fields = [f.name for f in dataclasses.fields(LossSpec) if f.init]
    if len(spec_args) != len(fields):
        raise RuntimeError(f"apl_kernels: {len(spec_args)} spec arguments, but LossSpec has {len(fields)} fields")
    values = {}
    for name, value in zip(fields, spec_args):
        codes = _SPEC_FIELD_CODES.get(name)
        values[name] = value if codes is None else {code: key for key, code in codes.items()}[value]
    spec = LossSpec(**values)
    if spec.op_args() != tuple(spec_args):
        raise RuntimeError("apl_kernels: ops.spec_from_op_args does not invert LossSpec.op_args() "
                           f"({tuple(spec_args)} -> {spec.op_args()}); update _SPEC_FIELD_CODES")
    return spec


def _tracing(*tensors) -> bool:
    """True under torch.compile, make_fx or with fake/functional tensors (opcheck, AOT autograd)."""
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors):
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode
    return get_proxy_mode() is not None


def _setup_context(ctx, inputs, output):
    logits, target, *args = inputs
    ctx.op_args = tuple(args)           # spec..., reduction, ignore_index, compute_grad
    grad = output[1]
    # The gradient output is not differentiable; without this autograd would
    # hand backward a materialised [N, K] tensor of zeros for it: an extra
    # allocation and a full pass.
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.traced = _tracing(logits, grad)
    if ctx.traced:
        ctx.save_for_backward(grad)
        return
    ctx.save_for_backward(logits, target)
    # Not a saved tensor: it is handed over (and then changed by its user) while
    # the logits stay saved for a later backward, which must not trip on its version.
    ctx.grad_buffer = grad if ctx.op_args[-1] else None


def _fp32_scale(scale: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad_output in the precision the multiply runs in: fp32, or fp64 for fp64 gradients."""
    return scale.to(torch.promote_types(grad.dtype, torch.float32))


def scale_gradient_(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: int, *,
                    device_side: bool) -> torch.Tensor:
    """grad *= grad_output in place (per row for reduction "none"), in fp32, without a host sync.

    device_side: the "scale unless 1" kernel, which reads the scale on the device
    (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); else the CPU path,
    which reads the scale.  The kernel is the extension's C++ op for CUDA tensors
    when it was built with CUDA (predicted a few us of host time, against tens for
    a Triton launch), else the Triton kernel, else (no triton) a plain fp32 multiply.
    """
    if device_side:
        if grad.device.type == "cuda" and _CUDA_SCALE_OP:
            return torch.ops.apl_kernels.scale_rows_.default(grad, grad_loss)
        try:
            from .triton.scale import scale_rows_
        except ImportError:  # CUDA without triton: a plain fp32 multiply, a pass even at 1, no sync
            return grad.copy_(_scaled_copy(grad, grad_loss, reduction))
        return scale_rows_(grad, grad_loss)
    # On the CPU reading the scale costs nothing; scale 1 then needs no pass.  (A 0-dim scale, the
    # usual one, by item(): one op, not the three of eq / all / bool.)
    if (grad_loss.item() == 1) if grad_loss.dim() == 0 else bool((grad_loss == 1).all()):
        return grad
    # A CPU 0-dim tensor is read as a scalar in the op's compute type (fp32 for half).
    return grad.mul_(_fp32_scale(grad_loss.unsqueeze(1) if reduction == _REDUCTION_NONE else grad_loss, grad))


def _scaled_copy(grad: torch.Tensor, grad_loss: torch.Tensor, reduction: int) -> torch.Tensor:
    """grad * grad_output out of place, in fp32 (the traced backward; the compiler fuses the casts)."""
    scale = grad_loss.unsqueeze(1) if reduction == _REDUCTION_NONE else grad_loss
    return (grad.to(torch.promote_types(grad.dtype, torch.float32)) * _fp32_scale(scale, grad)).to(grad.dtype)


def _saved_inputs(ctx):
    try:
        return ctx.saved_tensors
    except RuntimeError as error:
        if "inplace" not in str(error):
            raise
        raise RuntimeError("apl_kernels: this backward recomputes the gradient from the logits saved by the "
                           "forward (a second backward with retain_graph=True, or create_graph=True), but "
                           "they were modified in place after the loss was computed") from error


def _differentiable_grad(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
    """d(grad_output . loss)/d logits as a differentiable function of both (create_graph=True)."""
    logits, target = _saved_inputs(ctx)
    *spec_args, reduction, ignore_index, _ = ctx.op_args
    spec = spec_from_op_args(spec_args)
    loss = reference_loss(logits, target, spec, _REDUCTION_NAMES[reduction], ignore_index)
    (grad,) = torch.autograd.grad(loss, logits, grad_loss, create_graph=True)
    return grad


def _backward(op, scale_on_device, ctx, grad_loss):
    reduction = ctx.op_args[-3]
    if ctx.traced:
        (grad,) = ctx.saved_tensors
        return _scaled_copy(grad, grad_loss, reduction)
    if torch.is_grad_enabled():
        return _differentiable_grad(ctx, grad_loss)
    grad, ctx.grad_buffer = ctx.grad_buffer, None
    if grad is None:  # handed over by an earlier backward (or never computed): recompute
        logits, target = _saved_inputs(ctx)
        _, grad = op(logits.detach(), target, *ctx.op_args[:-1], True)
    if _tracing(grad_loss):  # compiled autograd traces the backward of an eager forward
        return _scaled_copy(grad, grad_loss, reduction)
    return scale_gradient_(grad, grad_loss, reduction, device_side=scale_on_device or grad.device.type == "cuda")


# Each registered op's backward flavour (triton_on_cpu), for the eager path below.
_SCALE_ON_DEVICE = {}


def register_fused_autograd(op, *, triton_on_cpu: bool = False) -> None:
    """Give a fused op (C++ or Triton) its fake kernel's partner: the autograd formula.

    triton_on_cpu: the op's CPU tensors run under the Triton interpreter, so its
    backward scales with the device-side kernel (Triton's) there too (CUDA
    tensors always use a device-side kernel).
    """
    callable_op = getattr(torch.ops.apl_kernels, op.split("::")[1]).default if isinstance(op, str) else op
    _SCALE_ON_DEVICE[callable_op] = triton_on_cpu

    def backward(ctx, grad_loss, _unused_grad_of_grad):
        grads = (None,) * (2 + len(ctx.op_args))
        if grad_loss is None:  # no gradient flows into the loss (grads are not materialised)
            return grads
        return (_backward(callable_op, triton_on_cpu, ctx, grad_loss),) + grads[1:]

    torch.library.register_autograd(op, backward, setup_context=_setup_context)


class _EagerFusedLoss(torch.autograd.Function):
    """The formula register_fused_autograd registers, applied directly by eager calls.

    torch.library's autograd wrapper runs ``torch._library.utils.fill_defaults`` on every
    call, which reads the op's schema argument list (a new list each read) once per
    argument: 17 reads, 0.1-0.25 ms of host time a call on the CPU machines here, as much
    as a whole CPU fwd+bwd at [128, 10].  These ops have no defaulted arguments to fill."""

    @staticmethod
    def forward(ctx, op, *inputs):
        output = op(*inputs)   # grad mode is off here: the op's autograd kernel only redispatches
        _setup_context(ctx, inputs, output)
        ctx.fused_op = op
        return output

    @staticmethod
    def backward(ctx, grad_loss, _unused_grad_of_grad):
        grads = (None,) * (3 + len(ctx.op_args))   # op, logits, target, the op's other arguments
        if grad_loss is None:
            return grads
        return (None, _backward(ctx.fused_op, _SCALE_ON_DEVICE[ctx.fused_op], ctx, grad_loss)) + grads[2:]


def call_fused(op, logits: torch.Tensor, *args):
    """op(logits, *args), differentiable as registered: in eager mode through _EagerFusedLoss,
    while tracing (torch.compile, make_fx, fake tensors) through the registered op itself."""
    if op in _SCALE_ON_DEVICE and torch.is_grad_enabled() and logits.requires_grad and not _tracing(logits):
        return _EagerFusedLoss.apply(op, logits, *args)
    return op(logits, *args)


# The compiled extension registers torch.ops.apl_kernels.fused_loss (CPU, and
# CUDA when built).  Without it the package still works with the reference.
try:
    from . import _C
    EXTENSION_ERROR = None
except ImportError as error:
    _C = None
    EXTENSION_ERROR = error
# The backward's C++ "scale unless 1" op (apl_kernels::scale_rows_) has a CUDA
# kernel only in a CUDA build of the extension.
_CUDA_SCALE_OP = _C is not None and bool(_C.build_info()["cuda"])

if _C is not None:
    torch.library.register_fake("apl_kernels::fused_loss")(fake_fused_loss)
    register_fused_autograd("apl_kernels::fused_loss")
