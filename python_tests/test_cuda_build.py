"""The CUDA backend is registered whenever it was built.  Runs without a GPU (CI)."""
import pytest
import torch

import apl_kernels
from apl_kernels import backends


def _info():
    info = apl_kernels.build_info()
    if not info["extension"]:
        pytest.skip(f"apl_kernels._C did not import: {info['extension_error']}")
    return info


def test_cuda_kernel_registered_iff_built():
    info = _info()
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("apl_kernels::fused_loss", "CUDA")
    assert registered == info["cuda"], (
        f"build_info()['cuda'] = {info['cuda']} but the CUDA kernel is "
        f"{'registered' if registered else 'not registered'}")


def test_cpu_kernel_registered_next_to_cuda():
    _info()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("apl_kernels::fused_loss", "CPU")


def test_cuda_backend_resolves_when_built():
    info = _info()
    if not info["cuda"]:
        pytest.skip("the CUDA kernels were not built")
    assert info["cuda_arch_list"], "a CUDA build records its arch list"
    # Only the device type is looked at: no GPU is needed to resolve.
    assert backends.unavailable_reason("cuda", torch.device("cuda")) is None
    assert backends.resolve("auto", torch.device("cuda")) == "cuda"
