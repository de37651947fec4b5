"""Shared setup of the Triton backend tests.

They run on CPU tensors under the interpreter (CI: ``TRITON_INTERPRET=1 python
-m pytest -q python_tests/triton``, its own process because the variable must be
set before triton is imported) or on CUDA tensors without it, and skip cleanly
when neither is possible.
"""
import pytest

from apl_triton_helpers import DEVICE, REGIMES, SKIP_REASON


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "no_device: runs without a GPU and without the interpreter")
    # The interpreter evaluates both sides of tl.where with numpy (log(0), 0/0 in masked lanes).
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def _need_triton_device(request):
    if DEVICE is None and request.node.get_closest_marker("no_device") is None:
        pytest.skip(SKIP_REASON)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=REGIMES)
def regime_name(request):
    return request.param
