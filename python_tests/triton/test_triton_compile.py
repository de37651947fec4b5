"""The kernels compile with the real Triton compiler for sm_90 (H100/H200), no GPU needed.

The interpreter accepts code the compiler would reject, and computes index math
in numpy int64; these tests close that gap on machines without a GPU.
``aot_compile.py`` (run in a subprocess without TRITON_INTERPRET) compiles the
variant the JIT really launches: the real ``kernels.launch`` on each case's
shape, then the JIT's own specialisation (constexprs, integer specialisation,
pointer and stride divisibility hints).  Checked on each compiled kernel:
  * no vector register spills in the bandwidth-critical configurations;
  * no int32 product of the program id (``program_id * BLOCK_R`` wraps at 2^31 rows);
  * the label assert only where the launch checks labels, and there its kernel's
    loops at most 2% longer than the same kernel's without it (debug=True with
    sanitize_overflow=False, see kernels.py).
The same runs against Triton 3.6.0 (the GPU machine's version) when it is
installed beside the project's triton, at ``build/toolchains/triton-3.6.0``
(or $APL_TRITON36_PATH):
``python -m pip install --target build/toolchains/triton-3.6.0 --no-deps triton==3.6.0``.
Runs in the plain pytest process only (not again under TRITON_INTERPRET=1),
about 30 s of CPU per Triton version.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from aot_compile import find_int32_index_products  # noqa: E402
from apl_triton_helpers import INTERPRET  # noqa: E402

pytestmark = [pytest.mark.no_device,
              pytest.mark.skipif(INTERPRET, reason="compiled in the plain (non-interpreter) pytest process")]

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TRITON36 = os.environ.get("APL_TRITON36_PATH") or os.path.join(REPO, "build", "toolchains", "triton-3.6.0")
# A few stack bytes are scalar spills (a coefficient or two); vector spills in a
# chunk loop cost hundreds of bytes (e.g. 16384-element bf16 chunks: 128-352).
STACK_LIMIT = 32


def compile_all(tmp_path, first_on_path=None):
    """Results of aot_compile.py; first_on_path (a triton install) goes before everything on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    paths = ([first_on_path] if first_on_path else []) + [REPO, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    run = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile.py")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULTS")]
    if not lines:
        if "ptxas" in run.stderr and "not found" in run.stderr.lower():
            pytest.skip("triton's ptxas is not available")
        pytest.fail(f"compile script failed:\n{run.stderr[-4000:]}")
    return json.loads(lines[0][len("RESULTS"):])


def check(report):
    results = report["results"]
    failed = [r for r in results if not r["ok"]]
    assert not failed, failed
    main = [r for r in results if r["kernel"] in ("resident_kernel", "chunked_kernel")]
    assert {r["regime"] for r in main} == {"single", "tiles", "chunked"}
    # the JIT's variant: the six pointers are 16-byte aligned (torch allocations)
    assert all(r["hints"] >= 6 for r in main), [(r["name"], r["hints"]) for r in main]
    spilled = [(r["name"], r["stack"]) for r in results if r["strict"] and (r["stack"] or 0) > STACK_LIMIT]
    assert not spilled, f"triton {report['triton']}: register spills (stack bytes) in bandwidth-critical kernels"
    overflow = [(r["name"], r["int32_products"]) for r in results if r["int32_products"]]
    assert not overflow, f"triton {report['triton']}: int32 products of the program id (wrap at 2^31): {overflow}"
    check_label_asserts(report)


def check_label_asserts(report):
    """The label assert is compiled in where the launch checks labels (the one-program kernel, the
    labels pre-pass) and nowhere else; where it is, the kernel's loops are no longer than without it."""
    results = report["results"]
    for r in results:
        expected = r["kernel"] == "_labels_kernel" or r["regime"] == "single"
        assert r["asserts"] == expected, (report["triton"], r["name"], r["asserts"])
    compared = [r for r in results if "loops" in r]
    assert compared, "no one-program kernel was compared with and without the assert"
    for r in compared:
        with_assert, without = r["loops"], r["loops_without_asserts"]
        assert None not in (with_assert, without), "cuobjdump is missing"
        # the loops of the kernel without the assert come first (the label loop is the kernel's last)
        for (n_with, depth_with), (n_without, depth_without) in zip(with_assert, without):
            # measured: +0.3% (3.6.0) and +3 instructions of 145 (3.8.0) in nfl+rce's tile loop; the other
            # main kernels: none.  2% plus a few instructions of register-allocation noise in short loops.
            assert depth_with == depth_without and n_with <= n_without * 1.02 + 4, (report["triton"], r["name"],
                                                                                     with_assert, without)
        assert len(with_assert) == len(without) + 1, (report["triton"], r["name"], with_assert, without)


def test_kernels_compile_for_sm90(tmp_path):
    check(compile_all(tmp_path))


def test_kernels_compile_for_sm90_with_triton_3_6(tmp_path):
    """The GPU machine runs Triton 3.6.0, whose register allocation differs from the project's."""
    if not os.path.isdir(os.path.join(TRITON36, "triton")):
        pytest.skip(f"Triton 3.6.0 is not installed at {TRITON36} (install it there with pip --target, "
                    f"or set APL_TRITON36_PATH)")
    report = compile_all(tmp_path, TRITON36)
    assert report["triton"] == "3.6.0", f"{TRITON36} holds triton {report['triton']}"
    check(report)


def test_int32_index_check_finds_the_pattern():
    """The TTIR check flags an i32 product of the program id (directly, or through a
    loop over rows that starts at it) and passes the same product in i64."""
    bad = """
    %row0 = tt.get_program_id x : i32 loc(#loc1)
    %row0_7 = arith.muli %row0, %c2_i32 : i32 loc(#loc2)
    %n = tt.get_num_programs x : i32
    %r = scf.for %row = %row0 to %N step %n iter_args(%a = %c0) -> (i32) : i32 {
      %off = arith.muli %row, %stride_row : i32 loc(#loc3)
    """
    assert len(find_int32_index_products(bad)) == 2
    good = """
    %row0 = tt.get_program_id x : i32 loc(#loc1)
    %row0_6 = arith.extsi %row0 : i32 to i64 loc(#loc2)
    %row0_7 = arith.muli %row0_6, %c2_i64 : i64 loc(#loc2)
    %cols = arith.muli %c4_i32, %c2_i32 : i32
    """
    assert find_int32_index_products(good) == []
