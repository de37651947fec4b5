"""The functional API: ``apl_loss(logits, target, "nce+rce", ...)``."""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from . import backends, ops
from .reference import reference_loss
from .spec import REDUCTIONS, LossSpec

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, reduction: str, ignore_index: int) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError("logits and target must be tensors")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"logits must be [B, K] or [B, K, d1, ...], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"need at least K = 2 classes, got logits of shape {tuple(logits.shape)}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits shape "
                         f"{tuple(logits.shape)}: expected {expected}")
    if target.device != logits.device:
        raise ValueError(f"logits are on {logits.device} but target is on {target.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum' or 'none'")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index={ignore_index} is outside the int64 range of labels "
                         f"[{_INT64_MIN}, {_INT64_MAX}]")


def _targets_checkable(target: torch.Tensor) -> bool:
    """False where the labels' values cannot be read: tracing, graph capture, meta tensors, torch.func."""
    if torch.compiler.is_compiling() or target.device.type == "meta":
        return False
    if _functorch_transforming():
        # vmap cannot branch on values; the reference, which runs under a
        # transform, rejects a label outside [0, K) itself (one_hot, gather).
        return False
    return not (target.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _functorch_transforming() -> bool:
    """True inside torch.func.grad, vjp, jacrev, vmap..."""
    return torch._C._are_functorch_transforms_active()


def validate_check_targets(check_targets) -> None:
    if not (isinstance(check_targets, bool) or check_targets == "sync"):
        raise ValueError(f"check_targets must be True, False or 'sync', got {check_targets!r}")


def _host_label_check(check_targets: Union[bool, str], device: torch.device) -> bool:
    """Whether the labels' range is checked on the host before the kernels run.

    True checks on the host where that is free (CPU and other non-CUDA tensors); on
    CUDA tensors the kernels check each label themselves (a device-side assert, as
    F.cross_entropy), so the default path never waits for the GPU.  "sync" checks on
    the host on every device (one host sync on CUDA) for an exception that names the label.
    """
    if check_targets is False:
        return False
    if check_targets == "sync":
        return True
    return device.type != "cuda"


def _check_target_range(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    # Compare in int64, as the kernels do: in uint8, ignore_index=-100 wraps to
    # 156 and would excuse a label 156.
    labels = target.long()
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        value = int(labels[bad].reshape(-1)[0])
        raise ValueError(f"target value {value} is outside [0, {num_classes}) and is not "
                         f"ignore_index={ignore_index}")


def _check_overwrite(logits: torch.Tensor, backend: str) -> str:
    """The backend of overwrite_logits=True (only the Triton kernels write in place)."""
    if backend == "auto":
        backend = "triton"
    if backend != "triton":
        raise ValueError(f"overwrite_logits=True is supported by backend 'triton' only, got {backend!r}")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("overwrite_logits=True needs 2-D logits [N, K] with unit class stride, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    if logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]:
        # e.g. expand(): rows that share memory would be written concurrently.
        raise ValueError("overwrite_logits=True needs rows that do not overlap in memory (row stride >= K), "
                         f"got shape {tuple(logits.shape)} and strides {logits.stride()}")
    return backend


def fused_loss(logits: torch.Tensor, target: torch.Tensor, spec: LossSpec, *, reduction: str = "mean",
               ignore_index: int = -100, backend: str = "auto", check_targets: Union[bool, str] = True,
               overwrite_logits: bool = False) -> torch.Tensor:
    """``apl_loss`` with a ready ``LossSpec``; see ``apl_loss`` for the arguments."""
    _check_inputs(logits, target, reduction, ignore_index)
    validate_check_targets(check_targets)
    if overwrite_logits:
        backend = _check_overwrite(logits, backend)
    num_classes = logits.shape[1]
    if _host_label_check(check_targets, target.device) and _targets_checkable(target):
        _check_target_range(target, num_classes, ignore_index)
    if _functorch_transforming():
        if backend not in ("auto", "reference"):
            raise RuntimeError(f"backend {backend!r} does not support torch.func transforms (grad, vjp, jacrev, "
                               "vmap, ...): the fused ops have no functorch rules; use backend='auto', which "
                               "runs the reference formulas under a transform, or 'reference'")
        backend = "reference"
    name = backends.resolve(backend, logits.device)
    if name == "reference":
        return reference_loss(logits, target.long(), spec, reduction, ignore_index)

    if logits.dim() > 2:  # [B, K, d1, ...] -> rows of K, as cross_entropy does
        rows = logits.movedim(1, -1).reshape(-1, num_classes)
    else:
        rows = logits
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    flat_target = target.reshape(-1).long().contiguous()
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    if overwrite_logits and compute_grad:
        from .triton.op import inplace_loss
        loss = inplace_loss(rows, flat_target, *spec.op_args(), REDUCTIONS[reduction], ignore_index)
        return loss.reshape(target.shape) if reduction == "none" else loss
    loss, _ = ops.call_fused(backends.fused_op(name), rows, flat_target, *spec.op_args(), REDUCTIONS[reduction],
                             ignore_index, compute_grad)
    return loss.reshape(target.shape) if reduction == "none" else loss


@functools.lru_cache(maxsize=256)
def _cached_spec(name: str, typed_params: tuple) -> LossSpec:
    return LossSpec.from_name(name, **{key: value for key, _, value in typed_params})


def _spec_from_name(name, params: dict) -> LossSpec:
    """``LossSpec.from_name``, cached: parsing and validating the spec took ~25 us of a small
    call's host time (LossSpec is frozen, so one instance serves every call).  The key holds
    each value's type: True == 1 and hash alike, and alpha=True must still be refused."""
    try:
        return _cached_spec(name, tuple((key, type(value), value) for key, value in params.items()))
    except TypeError:  # an unhashable argument (a list as alpha, say): from_name names the problem
        return LossSpec.from_name(name, **params)


def apl_loss(logits: torch.Tensor, target: torch.Tensor, loss: Union[str, LossSpec] = "nce+rce", *,
             alpha: Optional[float] = None, beta: Optional[float] = None, gamma: Optional[float] = None,
             q: Optional[float] = None, A: Optional[float] = None, reduction: str = "mean",
             ignore_index: int = -100, grad: Optional[str] = None, backend: str = "auto",
             check_targets: Union[bool, str] = True, overwrite_logits: bool = False, a: Optional[float] = None,
             m: Optional[float] = None, t: Optional[int] = None, min_prob: Optional[float] = None) -> torch.Tensor:
    """Active-passive loss ``alpha * active + beta * passive`` of logits, fused with the softmax.

    Args:
        logits: [B, K] or [B, K, d1, ...] float16/bfloat16/float32/float64 scores.
        target: integer labels, [B] or [B, d1, ...], in [0, K) or equal to ``ignore_index``.
        loss: ``"nce+rce"``, ``"nfl+mae"``, ``"nce+agce"``, ``"ce"``, ``"sce"``... or a ``LossSpec``.
        alpha, beta, gamma, q, A, grad, a, m, t, min_prob: override the ``LossSpec``
            defaults (each term's official one; see ``LossSpec``).
        reduction: ``"mean"`` (over rows not ignored), ``"sum"`` or ``"none"``.
        ignore_index: label whose rows get zero loss and zero gradient.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        check_targets: how a label outside [0, K) that is not ``ignore_index``
            is reported (labels compared in int64, whatever their dtype):
            ``True`` (default): on CPU tensors a ValueError naming the label
            (checked on the host, which costs nothing there); on CUDA tensors
            the kernel checks each label and raises a device-side assert, as
            ``F.cross_entropy`` does: no host sync, the error surfaces at the
            next synchronizing call and, as after any device-side assert, the
            CUDA context cannot be used any more.  ``"sync"``: the ValueError on
            every device, at the cost of one host sync on CUDA.  ``False``: no
            host check (the CPU kernels give the row a NaN loss; the CUDA and
            Triton kernels still assert).  The host check is skipped inside
            CUDA-graph capture, under torch.compile (where such a row's loss is
            NaN on the CPU), on meta tensors and under torch.func transforms
            (where the reference rejects the label).
        overwrite_logits: write the gradient over ``logits`` instead of a new
            [N, K] buffer (backend "triton" only; "auto" picks it).  Needs 2-D
            logits with unit class stride that are a non-leaf nothing else uses
            afterwards, with rows that do not overlap in memory; they hold the
            gradient after the call, and backward runs once.  Misuse raises (a
            leaf requiring grad; backward through an op that saved the logits;
            a second backward; create_graph=True; expanded rows).

    Returns:
        The loss, float32 for half-precision logits (as ``cross_entropy`` under
        autocast), float64 for float64 logits.

    Autograd: the first backward scales the gradient the forward computed (in
    fp32) and hands that buffer over, with no pass over it when grad_output is
    1.  The logits and labels stay saved until the graph is freed: each later
    backward (``retain_graph=True``) recomputes the gradient with the fused
    kernel into a new buffer, so returned gradients never share memory, and a
    backward with ``create_graph=True`` recomputes it differentiably from the
    reference formulas (gradient penalties, double backward).  Under torch.func
    transforms ``backend="auto"`` runs the reference formulas.
    """
    params = dict(alpha=alpha, beta=beta, gamma=gamma, q=q, A=A, grad=grad, a=a, m=m, t=t, min_prob=min_prob)
    if isinstance(loss, LossSpec):
        given = [k for k, v in params.items() if v is not None]
        if given:
            raise ValueError(f"pass either a LossSpec or parameters, not both (got {given})")
        spec = loss
    else:
        spec = _spec_from_name(loss, params)
    return fused_loss(logits, target, spec, reduction=reduction, ignore_index=ignore_index,
                      backend=backend, check_targets=check_targets, overwrite_logits=overwrite_logits)
