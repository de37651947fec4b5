"""Compile the Triton kernels for sm_90 exactly as the JIT would launch them, without a GPU.

Run as a script by test_triton_compile.py, in a subprocess without
TRITON_INTERPRET and with whichever triton comes first on sys.path (the
project's, or 3.6.0 from build/toolchains/).  It calls the real
``kernels.launch`` on CPU tensors of each case's shape with ``wrap_triton``
replaced by a recorder, then compiles every recorded launch through the JIT's
own specialisation (its binder and ``_pack_args``): the same constexprs,
integer specialisations and pointer/stride divisibility hints as a launch on
the GPU.  Prints one line ``RESULTS<json>``.

The functions below the script part (``find_int32_index_products``) are plain
Python: the test imports them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

# (loss, logits dtype, shape, reduction, grad mode, must_not_spill): the shapes
# pick the launch regime (single program, row-resident tiles, chunked) and the
# strides the JIT sees (K = 1000: no divisibility hint on the row stride;
# 131072 and 8192: divisible by 16).
CASES = [
    ("nce+rce", "bf16", (128, 10), "mean", "official", True),
    ("nce+rce", "bf16", (4096, 1000), "none", "official", True),
    ("nce+rce", "bf16", (64, 131072), "mean", "official", True),
    ("nce+mae", "bf16", (64, 131072), "mean", "official", True),
    ("nfl+rce", "bf16", (128, 10), "mean", "official", True),
    ("nfl+rce", "bf16", (4096, 1000), "none", "official", True),
    ("nfl+rce", "bf16", (64, 131072), "mean", "official", True),
    ("nfl+rce", "fp32", (64, 131072), "mean", "exact", True),
    ("nfl+rce", "fp32", (4096, 1000), "none", "exact", True),
    ("ce", "bf16", (64, 131072), "mean", "official", True),
    ("ngce+nrce", "fp16", (64, 131072), "sum", "official", True),
    ("ngce+nrce", "fp16", (4096, 1000), "mean", "official", True),
    ("nce+agce", "bf16", (64, 131072), "mean", "official", True),
    ("nce+nnce", "bf16", (64, 131072), "mean", "official", True),
    ("nfl+nnfl", "bf16", (64, 131072), "mean", "official", True),
    ("nfl+nnfl", "bf16", (4096, 1000), "none", "official", True),
    ("nce+amse", "bf16", (64, 131072), "mean", "official", True),
    ("ece+mae", "bf16", (64, 131072), "mean", "official", True),
    ("ece+mae", "bf16", (4096, 1000), "mean", "official", True),
    ("taylor", "bf16", (128, 10), "mean", "official", True),
    ("gce+nmae", "fp64", (64, 20000), "mean", "exact", False),
    ("gce+nmae", "fp64", (128, 10), "mean", "exact", False),
]

# One-program cases (the only main kernels that carry the label assert) that are
# also compiled without the assert's options, to compare their loops' SASS.
COMPARE_ASSERTS = ("nce+rce bf16 [128, 10] mean official", "nfl+rce bf16 [128, 10] mean official")


# ------------------------------------------------------------------ TTIR check
_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_FOR = re.compile(r"scf\.for\s+(%[\w.#]+)\s*=\s*(%[\w.#]+)\s+to\s+(%[\w.#]+)\s+step\s+(%[\w.#]+)")
_VALUE = re.compile(r"%[\w.#]+")
_LOC = re.compile(r"\s+loc\([^()]*\)\s*$")


def find_int32_index_products(ttir: str) -> list:
    """The i32 multiplies (``arith.muli``) that take a value derived from the program id.

    ``tl.program_id(0) * BLOCK_R`` is i32 and wraps at 2^31; the interpreter
    computes it in numpy int64 and hides that.  Values derived from
    ``tt.get_program_id`` / ``tt.get_num_programs`` (through any op, and through
    an ``scf.for`` whose bounds they feed) are tracked; an i32 multiply of one
    is returned as its TTIR line.  Multiplies in i64 are what the kernels must use.
    """
    tainted = set()
    found = []
    for line in ttir.splitlines():
        line = _LOC.sub("", line)
        loop = _FOR.search(line)
        if loop:
            if any(v in tainted for v in loop.groups()[1:]):
                tainted.add(loop.group(1))
            continue
        match = _DEF.match(line)
        if not match:
            continue
        result, op, rest = match.groups()
        operands = set(_VALUE.findall(rest.split(" : ")[0] if " : " in rest else rest))
        if op in ("tt.get_program_id", "tt.get_num_programs") or operands & tainted:
            tainted.add(result)
            if op == "arith.muli" and re.search(r":\s*(tensor<[^>]*xi32>|i32)\s*$", rest):
                found.append(line.strip())
    return found


# ------------------------------------------------------------------ script
def _main():
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from apl_kernels.spec import LossSpec, REDUCTIONS
    from apl_kernels.triton import kernels

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}

    launches = []

    class Recorder:   # stands in for torch.library.wrap_triton: records kernel[grid](*args, **kwargs)
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    torch.library.wrap_triton = Recorder

    def stack_bytes(compiled):
        if not os.path.exists(cuobjdump):
            return None, None
        path = "apl_kernel.cubin"
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        field = lambda name: max(int(t.split(":")[1]) for t in out.split() if t.startswith(name + ":"))
        return field("STACK"), field("REG")

    def loop_sizes(compiled):
        """Instructions of each loop body of the kernel's SASS, in address order."""
        from bench import sass
        if not os.path.exists(cuobjdump):
            return None
        path = "apl_kernel_loops.cubin"
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
        (instructions,) = sass.parse_sass(text).values()
        loops = sass.find_loops(instructions)
        # (instructions of the body, nesting depth) of each loop, in address order
        return [(loop.static, sum(1 for outer in loops if outer.contains(loop)))
                for loop in sorted(loops, key=lambda l: l.header)]

    def compile_as_jit(fn, args, kwargs):
        """What JITFunction.run compiles for these arguments (its binder and _pack_args)."""
        kwargs = dict({"debug": False}, **kwargs)   # the launch's own options (the label assert's) win
        if hasattr(triton.knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        key = (fn.__name__, str(signature), str(sorted(constexprs.items())), str(sorted(attrs.items())),
               options.num_warps)
        return key, (lambda: triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                            options=options.__dict__)), attrs

    results, done = [], {}
    for loss, dt, (n, k), reduction, grad, strict in CASES:
        name = f"{loss} {dt} [{n}, {k}] {reduction} {grad}"
        launches.clear()
        spec = LossSpec.from_name(loss, grad=grad)
        logits = torch.empty(n, k, dtype=dtypes[dt])
        target_ = torch.zeros(n, dtype=torch.long)
        try:
            kernels.launch(logits, target_, *spec.op_args(), REDUCTIONS[reduction], -100, True)
        except Exception as error:
            results.append(dict(name=name, ok=False, error="launch: " + repr(error)[:2000]))
            continue
        for fn, args, kwargs in launches:
            entry = dict(name=f"{name}: {fn.__name__}", kernel=fn.__name__, regime=kernels.last_plan[0],
                         strict=strict and fn.__name__ in ("resident_kernel", "chunked_kernel"))
            try:
                key, build, attrs = compile_as_jit(fn, args, kwargs)
                entry["hints"] = sum(1 for v in attrs.values() if v)   # args with a divisibility hint
                if key not in done:
                    compiled = build()
                    stack, regs = stack_bytes(compiled)
                    done[key] = dict(stack=stack, regs=regs,
                                     int32_products=find_int32_index_products(compiled.asm["ttir"]),
                                     asserts="__assertfail" in compiled.asm["ptx"])
                    if name in COMPARE_ASSERTS and entry["kernel"] == "resident_kernel":
                        # the same kernel without the assert's options: its loops' instruction counts
                        plain = {k: v for k, v in kwargs.items() if k not in ("debug", "sanitize_overflow")}
                        _, build_plain, _ = compile_as_jit(fn, args, plain)
                        done[key]["loops"] = loop_sizes(compiled)
                        done[key]["loops_without_asserts"] = loop_sizes(build_plain())
                entry.update(done[key], ok=True)
            except Exception as error:
                entry.update(ok=False, error=repr(error)[:2000])
            results.append(entry)
    print("RESULTS" + json.dumps(dict(triton=triton.__version__, results=results)))


if __name__ == "__main__":
    sys.exit(_main())
