"""The one place that decides which backend runs a loss.

``resolve(name, device)`` turns ``"auto"`` into the fastest backend available
for the tensor's device and checks that an explicitly requested backend can run,
raising an error that says why not.  ``fused_op(name)`` returns the op to call.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from . import ops

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# Preference of "auto", per device type, fastest first.  The GPU order is the
# one measured on the H200 (bench/results/); "reference" always works.
AUTO_ORDER = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


def extension():
    """The compiled ``apl_kernels._C``, or None if it failed to import."""
    return ops._C


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend `name` can run on tensors of `device`, else the reason."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if extension() is None:
            return (f"the C++ extension apl_kernels._C did not import ({ops.EXTENSION_ERROR}); "
                    "reinstall with `pip install --no-build-isolation -e .`")
        if name == "cpu":
            return None if device.type == "cpu" else f"backend 'cpu' needs CPU tensors, got {device.type} tensors"
        if torch.version.cuda is None:
            return "the CUDA kernels were not built because this torch has no CUDA support"
        if not extension().build_info()["cuda"]:
            return ("the CUDA kernels were not built: nvcc was not found or APL_BUILD_CUDA=0 at install time; "
                    "reinstall with APL_BUILD_CUDA=1")
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device.type} tensors"
        return None
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as error:
            return f"triton is not installed ({error})"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (f"backend 'triton' needs CUDA tensors, got {device.type} tensors "
                "(CPU tensors run only under the interpreter: set TRITON_INTERPRET=1 before importing)")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend that will run: "auto" resolved, availability checked."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} is unavailable: {reason}")
    return name


def fused_op(name: str) -> Callable:
    """The torch.library op of a fused backend (schema in ops.py)."""
    if name in ("cpu", "cuda"):
        return torch.ops.apl_kernels.fused_loss.default
    if name == "triton":
        from .triton.op import fused_loss_triton
        return fused_loss_triton
    raise ValueError(f"backend {name!r} has no fused op")
