"""Shared fixtures of the foundation tests.

``backend`` parametrises a test over every fused backend: "cpu" always runs;
"cuda" and "triton" carry the ``gpu`` marker and skip without a CUDA device.
A new backend under test is one more entry in BACKENDS.
"""
import pytest
import torch

from apl_kernels import backends

from apl_testing import Backend

BACKENDS = (
    pytest.param(Backend("cpu", "cpu"), id="cpu"),
    pytest.param(Backend("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(Backend("triton", "cuda"), id="triton", marks=pytest.mark.gpu),
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    b = request.param
    reason = backends.unavailable_reason(b.name, torch.device(b.device))
    if reason is not None:
        if b.name == "cpu":  # the CPU kernel is part of every install
            pytest.fail(f"backend 'cpu' unavailable: {reason}")
        pytest.skip(f"backend {b.name!r} unavailable: {reason}")
    return b


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
