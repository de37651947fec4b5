"""The emulated op built with AddressSanitizer (-fsanitize=address), run in a subprocess with
libasan preloaded: a subset of the checks passes clean, and a planted read one element past the
row end (emu_plants.py, plant 6), which no result shows, is reported with its line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu_plants import PLANTS, line_of

RUNNER = Path(__file__).resolve().parent / "asan_runner.py"


def libasan():
    try:
        path = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def run_runner(build_dir, csrc, mode, **extra_env):
    lib = libasan()
    if lib is None:
        pytest.skip("g++ has no libasan.so")
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:symbolize=1",
               **extra_env)
    env.pop("CUDA_EMU_PLANT", None)
    return subprocess.run([sys.executable, str(RUNNER), str(build_dir), str(csrc), mode], env=env,
                          capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def asan_subset(emu_build_dir, planted_csrc):
    """The first run builds the ASan variant (the second reuses it)."""
    return run_runner(emu_build_dir, planted_csrc, "subset")


def test_asan_subset_is_clean(asan_subset):
    r = asan_subset
    assert r.returncode == 0 and "ASAN SUBSET PASSED" in r.stdout, (
        f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-6000:]}")


def test_asan_catches_read_past_row_end(asan_subset, emu_build_dir, planted_csrc):
    assert asan_subset.returncode == 0, "the ASan build failed: see test_asan_subset_is_clean"
    r = run_runner(emu_build_dir, planted_csrc, "read_past")
    assert r.returncode != 0 and "NOT CAUGHT" not in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    assert "AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-6000:]
    assert line_of(planted_csrc, PLANTS["read_past_row_end"]) in r.stderr, r.stderr[-6000:]
    assert "cuda_emu: the AddressSanitizer report above is from block (0,0,0) thread (6,0,0)" in r.stderr, (
        r.stderr[-6000:])  # row 6 is thread 6's (a thread per row of 13)
