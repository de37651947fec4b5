"""Helpers of the Triton tests (a module name of its own: python_tests/ has several conftests)."""
import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

try:
    import triton  # noqa: F401
    TRITON = True
except ImportError:
    TRITON = False

DEVICE = None
if TRITON and INTERPRET:
    DEVICE = "cpu"
elif TRITON and HAS_CUDA:
    DEVICE = "cuda"

SKIP_REASON = ("the Triton tests need TRITON_INTERPRET=1 (CPU tensors) or a CUDA device"
               if TRITON else "triton is not installed")


# The three launch regimes, forced on small shapes so the interpreter stays fast:
#   single   one program for the whole batch (default for small N, K)
#   tiles    several row-resident tiles: a pre-pass over the labels, then one tile per program
#   chunked  online lse over chunks of 16 columns
REGIMES = ("single", "tiles", "chunked")


@contextlib.contextmanager
def regime(name: str):
    from apl_kernels.triton import kernels
    if name == "single":
        yield
    elif name == "tiles":
        saved = kernels.TILE_ELEMS
        kernels.TILE_ELEMS = 32      # K <= 16 -> 2 rows per tile
        try:
            yield
        finally:
            kernels.TILE_ELEMS = saved
    elif name == "chunked":
        with kernels.force_chunked(16):
            yield
    else:
        raise ValueError(name)
