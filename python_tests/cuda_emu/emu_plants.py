"""Known bugs to plant in a copy of csrc/ (test_emu_faults.py, test_emu_asan.py).

All plants go into one copy, each written as `CUDA_EMU_PLANTED(k) ? bug :
original` (include/cuda_emu.h) and switched on by CUDA_EMU_PLANT=k, so that one
build serves them all; with no plant switched on the copy runs as the original.
A plant whose original text is no longer in the sources fails loudly: update it
with the kernel.
"""
import dataclasses
import shutil
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Plant:
    number: int
    file: str          # under csrc/
    original: str
    planted: str       # same number of lines; CUDA_EMU_PLANTED(number) switches the bug on
    marker: str        # text of the line the report must name (in the planted copy)


PLANTS = {
    "removed_syncthreads": Plant(
        1, "cuda/apl_cuda_common.cuh",
        "    __syncthreads();\n    if (!is_last) return;",
        "    if (!CUDA_EMU_PLANTED(1)) __syncthreads();\n    if (!is_last) return;",
        "__syncthreads();  // the previous call's readers"),
    "off_by_one_ticket": Plant(
        2, "cuda/apl_cuda_common.cuh",
        "== gridDim.x - 1;",
        "== gridDim.x - (CUDA_EMU_PLANTED(2) ? 2 : 1);",
        "atomicAdd(&a.ws->ticket"),
    "half_width_butterfly": Plant(
        3, "cuda/apl_cuda_common.cuh",
        "for (int o = width >> 1; o > 0; o >>= 1)",
        "for (int o = width >> (CUDA_EMU_PLANTED(3) ? 2 : 1); o > 0; o >>= 1)",
        "for (int o = width >>"),
    "divergent_shuffle": Plant(
        4, "cuda/apl_cuda_op.cu",
        "  for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);",
        "  if (CUDA_EMU_PLANTED(10) && (threadIdx.x & 31) == 0) __syncwarp(3u);"
        " if (!CUDA_EMU_PLANTED(4) || (threadIdx.x & 1)) for (int o = 16; o > 0; o >>= 1)"
        " c += __shfl_xor_sync(0xffffffffu, c, o);",
        "c += __shfl_xor_sync(0xffffffffu, c, o)"),
    "forced_misalignment": Plant(
        5, "cuda/apl_cuda_common.cuh",
        "  return int((reinterpret_cast<uintptr_t>(p) & 15) / sizeof(scalar_t));",
        "  return CUDA_EMU_PLANTED(5) ? 0 : int((reinterpret_cast<uintptr_t>(p) & 15) / sizeof(scalar_t));",
        "__ldg(reinterpret_cast<const uint4*>(row + e0))"),
    "read_past_row_end": Plant(
        6, "cuda/apl_cuda_common.cuh",
        "s.v[t] = (e >= 0 && e < K) ? row[e] : scalar_t(0);",
        "s.v[t] = (e >= 0 && e < K + CUDA_EMU_PLANTED(6)) ? row[e] : scalar_t(0);",
        "? row[e] : scalar_t(0);"),
    "null_row_segfault": Plant(
        7, "cuda/apl_cuda_large_k.cu",
        "const scalar_t* z = a.logits + row * a.row_stride;",
        "const scalar_t* z = CUDA_EMU_PLANTED(7) && row == 1 ? nullptr : a.logits + row * a.row_stride;",
        "const scalar_t* z ="),
    "smem_not_raised": Plant(
        8, "cuda/apl_cuda_large_k.cu",
        "if (p.smem > 48 * 1024 &&",
        "if (!CUDA_EMU_PLANTED(8) && p.smem > 48 * 1024 &&",
        "large_k_variant<scalar_t>(a.P)<<<"),
    "divergent_syncthreads": Plant(
        9, "cuda/apl_cuda_common.cuh",
        "  if (lane == 0) scratch[warp] = v;\n  __syncthreads();",
        "  if (CUDA_EMU_PLANTED(9) && lane == 0) { scratch[warp] = v; __syncthreads(); } else {"
        " if (lane == 0) scratch[warp] = v;\n  __syncthreads(); }",
        "if (CUDA_EMU_PLANTED(9) && lane == 0)"),
    "exit_before_barrier": Plant(
        11, "cuda/apl_cuda_op.cu",
        "  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = c;",
        "  if (CUDA_EMU_PLANTED(11) && threadIdx.x >= 32) return;"
        " if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = c;",
        "warp_sums[threadIdx.x >> 5] = c;"),
    "missing_cp_async_wait": Plant(
        12, "cuda/apl_cuda_large_k.cu",
        "    async_copies_wait();\n    full_slots(tid, nc_r, T, ns_r,",
        "    if (!CUDA_EMU_PLANTED(12)) async_copies_wait();\n    full_slots(tid, nc_r, T, ns_r,",
        "if (!CUDA_EMU_PLANTED(12)) async_copies_wait();"),
    "cp_async_before_read": Plant(
        13, "cuda/apl_cuda_large_k.cu",
        "          store_full(j, grad_slot(copy_slot(cache + j)));\n"
        "          async_copy16(cache + j, zn + (j * V - shift_n));",
        "          if (CUDA_EMU_PLANTED(13)) async_copy16(cache + j, zn + (j * V - shift_n));"
        " store_full(j, grad_slot(copy_slot(cache + j)));\n"
        "          if (!CUDA_EMU_PLANTED(13)) async_copy16(cache + j, zn + (j * V - shift_n));",
        "if (CUDA_EMU_PLANTED(13)) async_copy16"),
}
# Plant 10 (a __syncwarp(0x3) that lane 1 never joins: a deadlock) shares plant 4's line.
DEADLOCK = 10


def plant_all(csrc: Path, dest: Path) -> Path:
    """A copy of csrc/ with every plant in place (switched off)."""
    shutil.copytree(csrc, dest)
    for name, p in PLANTS.items():
        path = dest / p.file
        text = path.read_text()
        count = text.count(p.original)
        assert count == 1, (f"plant {name}: {p.original!r} occurs {count} times in {p.file} (expected once); "
                            f"update PLANTS in {__file__} to the current kernel")
        assert p.planted.count("\n") == p.original.count("\n")
        path.write_text(text.replace(p.original, p.planted))
    return dest


def line_of(csrc: Path, plant: Plant) -> str:
    """`file:line` of the plant's marker in the planted copy, as the emulator reports it."""
    path = csrc / plant.file
    lines = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if plant.marker in line]
    assert len(lines) == 1, f"marker {plant.marker!r} of {plant.file} on lines {lines}"
    return f"{path}:{lines[0]}"
