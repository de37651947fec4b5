"""bench.roofline (PREDICTED GPU speed from compiled code) and bench.sass, its SASS reader.

The counting and the model are checked on hand-made SASS and hand-computed
figures; one test runs the tool itself on its CI subset (skipped, with the
reason, where Triton 3.6.0 or nvcc is absent).  The launch count of
bench.kernels is checked to use the training step's call, `loss.backward()`.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import common, goals, kernels, roofline, sass  # noqa: E402


def _sass(name, lines, start=0):
    """cuobjdump -sass text of one function: one instruction per line, 16 bytes apart."""
    out = [f"        Function : {name}", '        .headerflags    @"EF_CUDA_SM90"']
    for n, text in enumerate(lines):
        out.append(f"        /*{start + 16 * n:04x}*/                   {text} ;" + " " * 20 + "/* 0x000fe2000001ff00 */")
        out.append(" " * 80 + "/* 0x000fc80000000f00 */")
    return "\n".join(out) + "\n"


# A row loop (0x20..0xc0) holding two chunk loops; a trap and padding at the end.
NESTED = [
    "MOV R1, c[0x0][0x28]",             # 0x00
    "S2R R0, SR_TID.X",                 # 0x10
    "IADD3 R2, R2, 0x1, RZ",            # 0x20 row loop header
    "LDG.E.128 R4, desc[UR4][R8.64]",   # 0x30 chunk loop 1 header
    "FADD R3, R4, R5",                  # 0x40
    "@P0 BRA 0x30",                     # 0x50 latch of chunk loop 1
    "LDG.E.128 R4, desc[UR4][R8.64]",   # 0x60 chunk loop 2 header
    "MUFU.EX2 R6, R4",                  # 0x70
    "STG.E.128 desc[UR4][R10.64], R4",  # 0x80
    "@!P1 BRA 0x60",                    # 0x90 latch of chunk loop 2
    "SHFL.BFLY PT, R3, R3, 0x1, 0x1f",  # 0xa0
    "ISETP.GE.AND P2, PT, R2, R7, PT",  # 0xb0
    "@!P2 BRA 0x20",                    # 0xc0 latch of the row loop
    "EXIT",                             # 0xd0
    "BRA 0xe0",                         # 0xe0 trap: a branch to itself is not a loop
    "NOP",                              # 0xf0
]


def test_parse_sass_reads_functions_predicates_and_widths():
    text = _sass("first", ["@!P1 LDG.E.U16 R2, desc[UR4][R2.64]", "@PT STS.128 [R1], R4", "EXIT"]) + \
        _sass("second", ["LDS R0, [R1]", "BRA 0x0"])
    functions = sass.parse_sass(text)
    assert list(functions) == ["first", "second"]
    load, store, _ = functions["first"]
    assert (load.address, load.op, load.opcode, load.predicate, load.access_bytes) == (0, "LDG", "LDG.E.U16", "!P1", 2)
    assert load.conditional and not store.conditional        # @PT always runs
    assert store.access_bytes == 16 and functions["second"][0].access_bytes == 4
    assert functions["second"][1].target == 0 and load.target is None


def test_loops_are_backward_branches_with_nesting_and_counts():
    instructions = sass.parse_sass(_sass("k", NESTED))["k"]
    assert sass.code_size(instructions) == 14                 # trap and NOP padding left out
    loops = sass.find_loops(instructions)
    assert [(hex(l.header), hex(l.latch), l.static) for l in loops] == \
        [("0x20", "0xc0", 11), ("0x30", "0x50", 3), ("0x60", "0x90", 4)]
    row = sass.top_level(loops)
    assert len(row) == 1 and [hex(c.header) for c in row[0].children] == ["0x30", "0x60"]
    assert loops[2].loads == {"LDG": 16} and loops[2].stores == {"STG": 16}
    # One row iteration with each chunk loop run 5 times: 11 + 4 * 3 + 4 * 4 = 39 instructions.
    assert sass.executed(row[0], lambda loop: 5) == 39
    assert sass.executed(row[0], lambda loop: 1) == 11


# A loop body with a run-time choice: a long side (a term that is on) and a short one.
BRANCHY = [
    "LDS.U16 R2, [R1]",                 # 0x00 header
    "@P0 BRA 0x60",                     # 0x10 skip the term
    "MUFU.EX2 R3, R2",                  # 0x20
    "FMUL R3, R3, R4",                  # 0x30
    "FADD R5, R5, R3",                  # 0x40
    "FFMA R5, R5, R3, R6",              # 0x50
    "IADD3 R1, R1, 0x2, RZ",            # 0x60
    "@P1 BRA 0x0",                      # 0x70 latch
    "EXIT",
]


def test_shortest_path_and_the_cheapest_path_that_does_the_work():
    instructions = sass.parse_sass(_sass("k", BRANCHY))["k"]
    (loop,) = sass.find_loops(instructions)
    assert loop.static == 8
    assert loop.shortest == 4                                 # LDS, BRA, IADD3, BRA: the term skipped
    body = [i for i in instructions if loop.header <= i.address <= loop.latch]
    # Loading one element and running one exp forces the long side: all 8.
    assert sass.shortest_doing(body, loop.latch, elements=1, element_bytes=2, exps=1) == 8
    assert sass.shortest_doing(body, loop.latch, elements=1, element_bytes=2, exps=0) == 4
    assert sass.shortest_doing(body, loop.latch, elements=2, element_bytes=2, exps=0) is None


def test_resource_usage_and_occupancy():
    usage = sass.resource_usage(
        "Resource usage:\n Common:\n  GLOBAL:11\n Function chunked_kernel:\n"
        "  REG:121 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:648 TEXTURE:0\n")
    assert usage == {"chunked_kernel": {"REG": 121, "STACK": 8, "SHARED": 1024, "LOCAL": 0}}
    # 121 registers round up to 128 per thread = 4096 per warp: one 16-warp block (65536 registers) per SM.
    occ = roofline.occupancy(121, 1024, 16)
    assert (occ["blocks_per_sm"], occ["warps_per_sm"], occ["limited_by"]) == (1, 16, "registers")
    assert occ["occupancy_pct"] == 25.0
    # 225 KB of shared memory and 16 warps: one block; 64 KB: three (228 KB per SM, 1 KB reserved each).
    assert roofline.occupancy(32, 230400, 16)["blocks_per_sm"] == 1
    assert roofline.occupancy(32, 64 * 1024, 8)["blocks_per_sm"] == 3


def test_a_grid_of_one_block_per_sm_uses_every_sm_whatever_the_occupancy_allows():
    """The block scheduler spreads a grid breadth first: 132 blocks of a kernel that could run two per SM
    still take all 132 SMs, one block (16 warps) each, not 66 SMs with two (the model's old reading)."""
    assert roofline.grid_spread(132, 16, blocks_per_sm=2) == (132, 16)
    assert roofline.grid_spread(264, 16, blocks_per_sm=2) == (132, 32)
    assert roofline.grid_spread(1000, 8, blocks_per_sm=3) == (132, 24)
    assert roofline.grid_spread(10, 4, blocks_per_sm=8) == (10, 4)
    run = roofline.KernelRun("k", 132, 16, "chunked", {"BLOCK_K": 8192, "NEEDS_PASS2": True})
    one, two = (roofline.model("triton", "nce+rce", "bf16", 8192, 131072, [run], _kernels_for(run, 40.0, regs))
                for regs in (128, 64))
    assert one["predicted_pct_copy"] == two["predicted_pct_copy"] > 70


def _chunked_fixture(K=131072, block_k=8192, warps=16):
    run = roofline.KernelRun("k", 132, warps, "chunked", {"BLOCK_K": block_k, "NEEDS_PASS2": False})
    instructions = sass.parse_sass(_sass("k", NESTED))["k"]
    return run, instructions


def test_per_element_count_of_a_chunked_kernel():
    run, instructions = _chunked_fixture()
    info = roofline.per_element(run, instructions, 8192, 131072)
    # 512 threads, 16 chunks of 8192: a row is 11 + 15 * 3 + 15 * 4 = 116 instructions per thread
    # over 131072 / 512 = 256 elements.
    assert info["sass_per_element"] == pytest.approx(116 / 256)
    assert [h["per_element"] for h in info["hot_loops"]] == [round(3 / 16, 2), round(4 / 16, 2)]
    # One MUFU in chunk loop 2, run 16 times a row: 16 per 256 elements.
    assert info["mufu_per_element"] == pytest.approx(16 / 256)
    # Both chunk loops load from global memory: 2 passes x 16 chunks = 32 iterations that wait a row.
    assert info["waits_per_row"] == 32


def test_a_pipelined_chunk_loop_waits_once_a_row():
    """Triton's software-pipelined loops (tl.range num_stages) copy chunks into shared memory by
    cp.async (LDGSTS): such a loop waits for its first stages once a row, a plain one every chunk."""
    pipelined = [line.replace("LDG.E.128 R4, desc[UR4][R8.64]", "LDGSTS.E.BYPASS.128 [R4], desc[UR4][R8.64]", 1)
                 if n == 3 else line for n, line in enumerate(NESTED)]
    run = roofline.KernelRun("k", 132, 16, "chunked", {"BLOCK_K": 8192, "NEEDS_PASS2": False})
    instructions = sass.parse_sass(_sass("k", pipelined))["k"]
    assert instructions[3].op == "LDGSTS" and instructions[3].access_bytes == 16
    assert roofline.per_element(run, instructions, 8192, 131072)["waits_per_row"] == 1 + 16


# large_k_fixed's shape in small: a row loop holding a cp.async fill loop and a streamed-tail loop,
# then the wait for the copies.
FIXED_ROW = [
    "MOV R1, c[0x0][0x28]",                          # 0x00
    "IADD3 R2, R2, 0x1, RZ",                         # 0x10 row loop header
    "LDGSTS.E.BYPASS.128 [R3], desc[UR4][R8.64]",    # 0x20 fill loop
    "IADD3 R3, R3, 0x2000, RZ",                      # 0x30
    "@P0 BRA 0x20",                                  # 0x40
    "LDG.E.128.CONSTANT R4, desc[UR4][R8.64]",       # 0x50 tail loop
    "HMNMX2.BF16 R6, R4, R6",                        # 0x60
    "@P1 BRA 0x50",                                  # 0x70
    "LDGDEPBAR",                                     # 0x80
    "DEPBAR.LE SB0, 0x0",                            # 0x90
    "@!P2 BRA 0x10",                                 # 0xa0 latch of the row loop
    "EXIT",                                          # 0xb0
]


def test_cp_async_rows_wait_once_for_their_copies_and_a_held_tail_not_at_all():
    instructions = sass.parse_sass(_sass("k", FIXED_ROW))["k"]
    row = [l for l in sass.find_loops(instructions) if l.children][0]
    fill, tail = sorted(row.children, key=lambda l: l.header)
    assert fill.loads == {"LDGSTS": 16} and tail.loads == {"LDG": 16}
    run = roofline.KernelRun("cuda large_k_fixed<c10::BFloat16, 0, 0>", 132, 16, "large_k",
                             {"V": 8, "cap": 14336, "second_pass": False})
    visits = {"fill": 14336, "tail": 3 * 512}   # per row, all 512 threads: 3 tail iterations a thread
    args = (run, instructions, row, ["fill", "tail"], [fill, tail], visits, 512, 131072, 8, 2)
    assert roofline._large_k_sum(*args)["waits_per_row"] == 3 + 1              # the tail's loads, the copies
    assert roofline._large_k_sum(*args, no_wait=("tail",))["waits_per_row"] == 1   # the tail held in registers


def test_the_mufu_rate_bounds_a_loss_with_many_exps_and_roots():
    """Five MUFU instructions per element (nfl+rce's three exps and two square roots) at 16 per clock per
    SM: 8192 * 131072 * 5 / (16 * 132 * 1.98e9) = 1.284 ms, over the 0.999 ms of its I/O and the 0.649 ms
    its 10 SASS per element take to issue: 77.8%, MUFU-bound."""
    run = roofline.KernelRun("k", 132, 16, "chunked", {"BLOCK_K": 8192, "NEEDS_PASS2": True})
    kernels = _kernels_for(run, 10.0)
    kernels["k"]["mufu_per_element"] = 5.0
    r = roofline.model("triton", "nfl+rce", "bf16", 8192, 131072, [run], kernels)
    assert r["bound"] == "MUFU" and r["mufu_per_element"] == 5.0
    mufu_s = 8192 * 131072 * 5 / (16 * 132 * 1.98e9)
    assert r["predicted_pct_copy"] == pytest.approx(100 * (2 * 8192 * 131072 * 2 / 4.3e12) / mufu_s, abs=0.05)
    kernels["k"]["mufu_per_element"] = 1.0
    assert roofline.model("triton", "nfl+rce", "bf16", 8192, 131072, [run], kernels)["bound"] == "I/O"


def _kernels_for(run, per_element, regs=128):
    return {run.variant: {"sass_per_element": per_element, "count": "static", "toolchain": "test",
                          "occupancy": roofline.occupancy(regs, 1024, run.warps)}}


def test_model_of_the_chunked_fwd_bwd_by_hand(monkeypatch):
    """With a backward that multiplies out of place (one launch, a pass, a new buffer) and a host label check."""
    monkeypatch.setitem(roofline.BACKWARD, "triton", {"launches": 1, "passes": 1, "buffers": 1, "host_syncs": 0})
    monkeypatch.setattr(roofline, "CHECK_TARGETS", {"launches": 6, "host_syncs": 1})
    B, K = 8192, 131072
    L = B * K * 2                                             # bf16 logits: 2 GiB, far over L2
    run = roofline.KernelRun("k", 132, 16, "chunked", {"BLOCK_K": 8192, "NEEDS_PASS2": True})
    runs = [roofline.KernelRun("labels", 128, 4, "prepass", {}), run,
            roofline.KernelRun("sum", 1, 4, "serial", {}, 16)]
    r = roofline.model("triton", "nce+rce", "bf16", B, K, runs, _kernels_for(run, 10.0))
    # 132 rows of 256 KB in flight (34.6 MB) fit L2: passes 2 and 3 hit it.  Forward: logits read, gradient
    # written, labels twice (pre-pass and kernel); backward (one pass): the gradient read back (2 GiB > L2)
    # and written anew.
    assert r["hbm_bytes"] == 2 * L + 16 * B + 2 * L
    # Two [N, K] buffers (the forward's and the backward's), the workspace: ticket, 128 counts, 132 partials.
    assert r["extra_mem_ratio"] == pytest.approx((2 * L + 4 * (1 + 128 + 132) + 4) / L, abs=1e-3)
    # 3 forward launches (labels, loss, sum) + backward multiply; + 6 of check_targets.  Not autograd's seed.
    assert (r["launches_check_targets_false"], r["launches"], r["host_syncs"]) == (4, 10, 1)
    # 10 instructions per element: 8192 * 131072 * 10 / 32 warp-instructions at 132 * 4 * 1.98e9 per second
    # = 0.649 ms, under the forward's 2 * L / 4.3e12 = 0.999 ms: I/O-bound.  Total: forward 0.999 ms, 16
    # serial iterations 16 us, backward 0.999 ms; minimal I/O 0.999 ms: 49.6%.
    assert r["bound"] == "I/O"
    forward = (2 * L + 16 * B) / 4.3e12
    expected = 2 * L / 4.3e12 / (forward + 16e-6 + 2 * L / 4.3e12)
    assert r["predicted_pct_copy"] == pytest.approx(100 * expected, abs=0.05)
    assert 49 < r["predicted_pct_copy"] < 50


def test_serial_passes_of_one_block_per_sm_add_up(monkeypatch):
    """One 16-warp block per SM: a row's passes run one after another.  Pass 1 reads the logits, pass 2
    moves no HBM bytes, pass 3 writes the gradient; each phase takes its own max(I/O, issue, MUFU)."""
    monkeypatch.setitem(roofline.BACKWARD, "cuda", {"launches": 1, "passes": 0, "buffers": 0, "host_syncs": 0})
    B, K = 8192, 131072
    L = B * K * 2
    run = roofline.KernelRun("k", 132, 16, "large_k", {"V": 8, "cap": 16384, "second_pass": True})
    phases = [roofline._phase("read", 4.0, 0.0), roofline._phase("reread", 10.0, 1.0),
              roofline._phase("write", 6.0, 0.0), roofline._phase("none", 1.0, 0.0)]
    kernels = _kernels_for(run, 21.0, regs=100)        # 100 registers x 512 threads: one block a SM
    kernels["k"].update(phases=phases, mufu_per_element=1.0)
    r = roofline.model("cuda", "nce+rce", "bf16", B, K, [run], kernels)
    issue = B * K / 32 / (132 * 4 * 1.98e9)             # seconds per instruction per element
    read, write = (L + 8 * B) / 4.3e12, L / 4.3e12
    # Overlapped: 21 instructions per element (1.36 ms) against 2.0 ms of I/O: I/O-bound, 100%.
    assert r["bound"] == "I/O" and r["predicted_pct_copy"] == pytest.approx(100 * 2 * L / (2 * L + 8 * B), abs=0.05)
    # Serial: read 1.0 ms (4 instr. take 0.26 ms), pass 2 10 instr. 0.65 ms (its one MUFU 0.26 ms), write
    # 1.0 ms, fixed 1 instr. 0.065 ms: 2.71 ms against the minimal 2.0 ms.
    serial = read + 10 * issue + write + 1 * issue
    assert r["predicted_pct_copy_serial_passes"] == pytest.approx(100 * (2 * L / 4.3e12) / serial, abs=0.05)
    assert 73 < r["predicted_pct_copy_serial_passes"] < 74
    # With the next row prefetched into L2: pass 1 reads L2 (L / 8e12 = 0.27 ms, over its 4 instr.), and
    # the next row's read overlaps the later phases: max(2 L / 4.3e12 = 2.0 ms, 17 instr. 1.1 ms).
    fetched = roofline.KernelRun("k", 132, 16, "large_k", {**run.params, "prefetch": True})
    r = roofline.model("cuda", "nce+rce", "bf16", B, K, [fetched], {"k": kernels["k"]})
    serial = L / 8e12 + 2 * L / 4.3e12
    assert r["predicted_pct_copy_serial_passes"] == pytest.approx(100 * (2 * L / 4.3e12) / serial, abs=0.05)
    assert r["predicted_pct_copy"] == pytest.approx(100 * 2 * L / (2 * L + 8 * B), abs=0.05)   # unchanged
    # large_k_fixed also reads the next row in this row's pass 3 (fused_pass1): pass 1's 4 instructions
    # move into the write phase, no pass 1 of its own; the serial bound is the overlapped one.
    fused = roofline.KernelRun("k", 132, 16, "large_k", {**run.params, "prefetch": True, "fused_pass1": True})
    fused_kernels = _kernels_for(fused, 21.0, regs=100)
    fused_kernels["k"].update(mufu_per_element=1.0, phases=[
        roofline._phase("read", 0.0, 0.0), phases[1], roofline._phase("write", 10.0, 0.0), phases[3]])
    r = roofline.model("cuda", "nce+rce", "bf16", B, K, [fused], fused_kernels)
    assert r["predicted_pct_copy_serial_passes"] == r["predicted_pct_copy"]
    # Two blocks a SM (64 registers, a grid of 264): one's passes overlap the other's, the figures agree.
    run2 = roofline.KernelRun("k", 264, 16, "large_k", run.params)
    two = _kernels_for(run2, 21.0, regs=64)
    two["k"].update(phases=phases, mufu_per_element=1.0)
    r2 = roofline.model("cuda", "nce+rce", "bf16", B, K, [run2], two)
    assert r2["predicted_pct_copy_serial_passes"] == r2["predicted_pct_copy"]


def test_model_reads_the_backward_table(monkeypatch):
    """A backward that costs nothing when grad_output is 1 (the defects branch) drops a pass and a buffer."""
    B, K = 8192, 131072
    L = B * K * 2
    run = roofline.KernelRun("k", 132, 16, "chunked", {"BLOCK_K": 8192, "NEEDS_PASS2": True})
    monkeypatch.setitem(roofline.BACKWARD, "triton", {"launches": 0, "passes": 0, "buffers": 0, "host_syncs": 0})
    r = roofline.model("triton", "nce+rce", "bf16", B, K, [run], _kernels_for(run, 10.0))
    assert r["hbm_bytes"] == 2 * L + 8 * B               # no pre-pass: the labels read once
    assert r["extra_mem_ratio"] == pytest.approx(1.0, abs=1e-3)
    assert r["launches_check_targets_false"] == 1             # the loss kernel (autograd's seed fill aside)
    # Issue-bound now: 40 instructions per element take 2.6 ms against 1.0 ms of I/O.
    slow = roofline.model("triton", "nce+rce", "bf16", B, K, [run], _kernels_for(run, 40.0))
    issue = B * K * 40 / 32 / (132 * 4 * 1.98e9)
    assert slow["bound"] == "issue"
    assert slow["predicted_pct_copy"] == pytest.approx(100 * (2 * L / 4.3e12) / issue, abs=0.05)


def test_fp32_rows_in_flight_overflow_l2(monkeypatch):
    # fp32 [8192, 131072]: 132 rows of 512 KB = 69 MB in flight > 50 MB: passes 2 and 3 re-read HBM.
    # Forward: logits read, gradient written, passes 2 and 3 read again, labels and row losses.
    B, K = 8192, 131072
    L = B * K * 4
    run = roofline.KernelRun("k", 132, 16, "chunked", {"BLOCK_K": 8192, "NEEDS_PASS2": True})
    monkeypatch.setitem(roofline.BACKWARD, "triton", {"launches": 1, "passes": 0, "buffers": 0, "host_syncs": 0})
    r = roofline.model("triton", "nce+rce", "fp32", B, K, [run], _kernels_for(run, 1.0))
    assert r["hbm_bytes"] == 2 * L + 2 * L + 8 * B
    # A backward pass over the gradient (read + write, 4 GiB each way here) adds 2 L.
    monkeypatch.setitem(roofline.BACKWARD, "triton", {"launches": 1, "passes": 1, "buffers": 1, "host_syncs": 0})
    r = roofline.model("triton", "nce+rce", "fp32", B, K, [run], _kernels_for(run, 1.0))
    assert r["hbm_bytes"] == 2 * L + 2 * L + 8 * B + 2 * L


def test_plans_follow_the_launch_heuristics():
    pytest.importorskip("triton")
    single = roofline.triton_plan("nce+rce", "bf16", 128, 10)
    assert [r.kind for r in single] == ["single"] and single[0].params["BLOCK_K"] == 16
    chunked = roofline.triton_plan("nfl+rce", "bf16", 8192, 131072)
    assert [r.kind for r in chunked] == ["prepass", "chunked"] and chunked[0].grid == 8   # 8192 labels by 1024
    assert chunked[1].grid == 132 and chunked[1].warps == 16 and chunked[1].params["NEEDS_PASS2"]
    assert not roofline.triton_plan("ce", "bf16", 8192, 131072)[1].params["NEEDS_PASS2"]
    large = roofline.cuda_plan("nce+rce", "bf16", 8192, 131072)
    assert large[-1].variant == "cuda large_k_fixed<c10::BFloat16, 1, 4>"   # constant terms: shapes nce, rce
    assert large[-1].params["cap"] == (232448 - 2048) // 16 and large[-1].params["threads"] == 512
    # 132 blocks: the count inside the loss kernel (132 * 32 B of labels <= a row's 256 KB), a workspace memset.
    assert [r.kind for r in large] == ["memset", "large_k"]
    assert roofline.cuda_plan("nce+agce", "bf16", 8192, 131072)[-1].variant == "cuda large_k_fixed<c10::BFloat16, 1, 0>"
    general = roofline.cuda_plan("sce", "bf16", 8192, 131072)   # ce + rce: no fixed variant instantiated
    assert general[-1].variant == "cuda large_k_kernel<c10::BFloat16, true, -1, -1>"
    tiny = roofline.cuda_plan("nfl+rce", "fp32", 128, 10)
    assert tiny[-1].variant == "cuda small_k_kernel<float, 4, true>" and tiny[-1].params["group"] == 1
    assert len(tiny) == 1                           # [128, 10] mean: one block counts itself, no workspace
    many = roofline.cuda_plan("ce", "bf16", 8192, 1000)  # 8 * 132 blocks of short rows: a count kernel first
    assert [r.kind for r in many] == ["serial", "small_k"] and many[0].variant == "cuda count_kept_kernel"
    # 256 rows of 1000: 2-warp blocks, 128 of them (not 32 of 8 warps); the labels counted in the kernel.
    short = roofline.cuda_plan("ce", "fp32", 256, 1000)
    assert [r.kind for r in short] == ["memset", "small_k"] and (short[1].grid, short[1].warps) == (128, 2)
    # K = 32000: a bf16 row fits an SM's shared memory twice (256-thread blocks), an fp32 row does not.
    assert roofline.cuda_plan("nce+rce", "bf16", 4096, 32000)[-1].warps == 8
    assert roofline.cuda_plan("nce+rce", "fp32", 4096, 32000)[-1].warps == 16
    short16 = roofline.cuda_plan("nce+rce", "bf16", 1024, 100)   # 16 lanes a row: 8 rows a 4-warp block
    assert [r.kind for r in short16] == ["memset", "small_k"] and (short16[1].grid, short16[1].warps) == (128, 4)


def test_exposed_latency_of_one_block_per_sm_rows(monkeypatch):
    """One 16-warp program per SM loops over its rows; each of a row's 32 chunk iterations waits
    LOOP_LATENCY_S for its loads and nothing else on the SM overlaps it."""
    monkeypatch.setitem(roofline.BACKWARD, "triton", {"launches": 1, "passes": 0, "buffers": 0, "host_syncs": 0})
    monkeypatch.setitem(roofline.LOOP_LATENCY_S, "triton", 0.75e-6)
    B, K = 8192, 131072
    run = roofline.KernelRun("k", 132, 16, "chunked", {"BLOCK_K": 8192, "NEEDS_PASS2": False})
    kernels = _kernels_for(run, 10.0, regs=100)          # one block a SM
    kernels["k"]["waits_per_row"] = 32
    r = roofline.model("triton", "ce", "bf16", B, K, [run], kernels)
    # A row: 32 x 0.75 us + 10 x 131072 / 32 warp-instructions at 4 a clock (5.17 us) = 29.17 us; 63 rows
    # a program (8192 / 132, rounded up): 1.838 ms, against the minimal 2 x 2 GiB / 4.3e12 = 0.999 ms.
    row = 32 * 0.75e-6 + 10 * K / 32 / (4 * 1.98e9)
    minimal = 2 * B * K * 2 / 4.3e12
    assert r["predicted_pct_copy_latency"] == pytest.approx(100 * minimal / (63 * row), abs=0.05)
    assert 54 < r["predicted_pct_copy_latency"] < 55 and r["waits_per_row"] == 32
    assert r["predicted_pct_copy"] == pytest.approx(100 * 2 * B * K * 2 / (2 * B * K * 2 + 8 * B), abs=0.05)
    # Two blocks a SM hide each other's waits: no such figure.
    two = _kernels_for(run, 10.0, regs=64)
    two["k"]["waits_per_row"] = 32
    run2 = roofline.KernelRun("k", 264, 16, "chunked", run.params)
    assert roofline.model("triton", "ce", "bf16", B, K, [run2], {"k": two["k"]})["predicted_pct_copy_latency"] is None


def test_goals_show_predictions_labelled_predicted():
    predictions = {"meta": {"what": "PREDICTED", "toolchains": {}}, "records": [
        {"backend": "triton", "loss": "nce+rce", "dtype": "bf16", "B": 8192, "K": 131072, "launches": 11,
         "launches_check_targets_false": 5, "host_syncs": 1, "extra_mem_ratio": 2.0, "predicted_pct_copy": 27.4,
         "predicted_us": 3600.0, "bound": "issue", "sass_per_element": 81.8}]}
    evaluated = goals.evaluate({"meta": {"device": "cuda"}, "records": []}, predictions)
    by_name = {g["goal"]: g for g in evaluated}
    line = by_name["triton nce+rce bf16 [8192, 131072] fwd+bwd >= 85% of copy bandwidth"]
    assert line["status"] == "not measured" and line["predicted"].startswith("predicted 27.4%")
    assert "predicted 27.4%" in goals.format_goal(line)
    assert by_name["peak extra memory of fused fwd+bwd <= 1.1x logits size"]["predicted"].startswith(
        "predicted 2.00x")
    assert by_name["triton nfl+rce bf16 [8192, 131072] fwd+bwd >= 70% of copy bandwidth"]["predicted"] is None
    assert all(g["predicted"] is None for g in goals.evaluate({"meta": {"device": "cuda"}, "records": []}))
    # The serial-passes bound, when below: beside the figure, and said to be that.
    predictions["records"][0]["predicted_pct_copy_serial_passes"] = 20.1
    by_name = {g["goal"]: g for g in goals.evaluate({"meta": {"device": "cuda"}, "records": []}, predictions)}
    line = by_name["triton nce+rce bf16 [8192, 131072] fwd+bwd >= 85% of copy bandwidth"]["predicted"]
    assert line == ("predicted 27.4% (issue-bound, 82 SASS instructions per element; 20.1% if a row's passes "
                    "do not overlap)"), line
    # ... and the exposed-latency figure, when lower still.
    predictions["records"][0]["predicted_pct_copy_latency"] = 15.2
    by_name = {g["goal"]: g for g in goals.evaluate({"meta": {"device": "cuda"}, "records": []}, predictions)}
    line = by_name["triton nce+rce bf16 [8192, 131072] fwd+bwd >= 85% of copy bandwidth"]["predicted"]
    assert line.endswith("; 15.2% with each load's latency exposed (calibrated on the H200))"), line


def test_launch_count_uses_loss_backward(tmp_path, monkeypatch):
    """bench.kernels counts the launches of `loss.backward()`, the training step's call."""
    seen = []
    real_backward = torch.Tensor.backward

    def spy_backward(self, *args, **kwargs):
        seen.append("loss.backward()")
        return real_backward(self, *args, **kwargs)

    def fake_count(fn, device):
        seen.clear()
        fn()
        calls.append(list(seen))
        return None

    calls = []
    monkeypatch.setattr(torch.Tensor, "backward", spy_backward)
    monkeypatch.setattr(common, "count_launches", fake_count)
    args = kernels.build_parser().parse_args(
        ["--quick", "--device", "cpu", "--backends", "reference", "--losses", "ce", "--shapes", "8x10",
         "--passes", "fwd+bwd", "--no-memory", "--no-plots", "--min-time", "0.01", "--out", str(tmp_path / "r.json")])
    kernels.run(args)
    assert calls == [["loss.backward()"]]


def test_ci_subset_runs(tmp_path):
    """The tool on its CI subset, nce+rce bf16 [8192, 131072]: Triton 3.6.0's chunked kernel where that
    Triton is installed, the CUDA large-K kernel where nvcc is (about a minute of compile on 2 cores)."""
    chosen = [name for name, ok in (("triton", roofline.triton36_path()), ("cuda", roofline.nvcc_path())) if ok]
    if not chosen:
        pytest.skip("neither Triton 3.6.0 (python -m pip install --target build/toolchains/triton-3.6.0 "
                    "--no-deps triton==3.6.0) nor nvcc is available to compile for sm_90")
    backends = ",".join(chosen)
    out = tmp_path / "roofline.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.roofline", "--subset", "ci", "--backends", backends,
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PREDICTED" in proc.stdout
    data = json.loads(out.read_text())
    assert "PREDICTED" in data["meta"]["what"]
    if "triton" in chosen:
        assert data["meta"]["toolchains"]["triton"].startswith("triton 3.6.0")
    fields = {"backend", "loss", "dtype", "B", "K", "launches", "host_syncs", "hbm_bytes", "extra_mem_ratio",
              "sass_per_element", "predicted_pct_copy"}
    assert {r["backend"] for r in data["records"]} == set(backends.split(","))
    for r in data["records"]:
        assert fields <= set(r)
        assert 0 < r["predicted_pct_copy"] <= 100 and r["sass_per_element"] > 0
    for k in data["kernels"].values():
        assert k["registers"] > 0 and k["blocks_per_sm"] >= 1


def test_default_arguments_add_no_label_check_launch_or_sync():
    """check_targets=True on CUDA tensors leaves the labels to the kernels (functional._host_label_check)."""
    import torch
    from apl_kernels import functional
    assert roofline.CHECK_TARGETS == {"launches": 0, "host_syncs": 0}
    assert functional._host_label_check(True, torch.device("cuda")) is False


def test_measured_launches_leave_out_autograd_seed_only():
    """bench.kernels' launch count: one ones_like seed fill per loss.backward() is autograd's, not the loss's;
    a second fill (a loss's own zero_) still counts."""
    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>"
    ours = ["resident_kernel", "_scale_rows_kernel"]
    assert common.launches_per_call((ours + [fill]) * 5, reps=5) == 2
    assert common.launches_per_call((ours + [fill, fill]) * 5, reps=5) == 3
    assert common.launches_per_call(ours * 5, reps=5) == 2      # no seed (autograd.grad with grad_outputs)


def test_triton_plan_compiles_the_square_root_focal_path_as_the_launch_does():
    """gamma = 0.5 (nfl's default) launches with GAMMA_HALF: the roofline must compile that variant."""
    pytest.importorskip("triton")
    run = roofline.triton_plan("nfl+rce", "bf16", 8192, 131072)[-1]
    assert run.params["GAMMA_HALF"] is True and "GAMMA_HALF=True" in run.variant


def test_small_k_row_loop_is_the_first_loop_that_reads_and_writes():
    """The small-K kernel's loops as nvcc 13.0 laid them out (headers, sizes, bytes of the sm_90 cubin):
    label-count loops first, the row loop, then a larger back-branch region inside it, which the
    largest-loop rule took for the row loop (a 4x overcount)."""
    def loop(header, latch, static, loads, stores):
        return sass.Loop(header, latch, static, static, loads, stores)
    count = loop(0x380, 0x5D0, 38, {"LDG": 32}, {})
    row = loop(0x1840, 0x104E0, 3787, {"LDG": 42}, {"STG": 68})
    region = loop(0x3140, 0x11F30, 3808, {"LDS": 513, "LDG": 32}, {"STG": 80, "STS": 17})
    assert roofline.small_k_row_loop("k", [count, row, region]) is row
    assert roofline.small_k_row_loop("k", [count]) is count      # no gradient store: the largest loader


def test_cuda_plan_constants_are_read_from_the_kernel_sources():
    """The plan constants (kSpreadBytes, kTailBatch, kSmallBlock, kTwoPerSmThreads, ...) have one home,
    csrc/cuda/; a renamed one fails loudly."""
    assert (roofline.CUDA_SMALL_BLOCK, roofline.CUDA_TWO_PER_SM_THREADS, roofline.CUDA_LARGE_BLOCK) == (256, 256, 512)
    assert roofline.CUDA_SPREAD_BYTES == 64 * 1024      # apl_cuda_small_k.cu: `64 * 1024`
    assert roofline.cuda_constant("apl_cuda_large_k.cu", "kTailBatch") == roofline.CUDA_TAIL_BATCH
    with pytest.raises(RuntimeError, match="no longer defines"):
        roofline.cuda_constant("apl_cuda_large_k.cu", "kNoSuchConstant")
