"""Fixtures of the emulated CUDA tests: one build of the emulated op per test session."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # emu_build, emu_helpers

import emu_build  # noqa: E402
import emu_plants  # noqa: E402


@pytest.fixture(scope="session")
def emu_build_dir(tmp_path_factory) -> Path:
    """A folder of this test run, or CUDA_EMU_BUILD_DIR (kept: ninja then recompiles only what changed)."""
    kept = os.environ.get("CUDA_EMU_BUILD_DIR")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept).resolve()
    return tmp_path_factory.mktemp("cuda_emu_build")


def _need_cuda_headers():
    if emu_build.cuda_include_dir() is None:
        pytest.skip("cuda_emu needs nvcc's include folder (cuda_bf16.h, crt/host_config.h); none found")


@pytest.fixture(scope="session")
def planted_csrc(tmp_path_factory) -> Path:
    """A copy of csrc/ with the bugs of emu_plants.py planted (switched off)."""
    _need_cuda_headers()
    return emu_plants.plant_all(emu_build.CSRC, tmp_path_factory.mktemp("planted") / "csrc")


@pytest.fixture(scope="session")
def emu_op(emu_build_dir):
    """torch.ops.apl_kernels_emu.fused_loss: the CUDA kernels of this checkout's csrc/, emulated on the CPU."""
    _need_cuda_headers()
    import torch
    emu_build.build(emu_build_dir, emu_build.PLAIN)
    return torch.ops.apl_kernels_emu.fused_loss
