"""``build_info()``: what was built, against what, and what runs now."""
from __future__ import annotations

import importlib.metadata

import torch


def build_info() -> dict:
    """A dict describing the installed package.

    version: package version.  extension: whether apl_kernels._C imported;
    extension_error: why not (None if it did).  cpu: the fused CPU kernel is
    available.  cuda: the CUDA kernels were built.  cuda_version, cuda_arch_list,
    torch_built: what the extension was built against (None without it).
    torch_runtime: the torch imported now.  triton: its version, or None.
    """
    from . import __version__, ops

    info = {
        "version": __version__,
        "extension": ops._C is not None,
        "extension_error": None if ops.EXTENSION_ERROR is None else str(ops.EXTENSION_ERROR),
        "cpu": False,
        "cuda": False,
        "cuda_version": None,
        "cuda_arch_list": None,
        "torch_built": None,
        "torch_runtime": torch.__version__,
        "triton": None,
    }
    if ops._C is not None:
        built = ops._C.build_info()
        info.update(cpu=bool(built["cpu"]), cuda=bool(built["cuda"]), cuda_version=built["cuda_version"],
                    cuda_arch_list=built["cuda_arch_list"], torch_built=built["torch_version"])
    try:  # the installed version, without importing triton
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info
