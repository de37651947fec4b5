"""Builds the CUDA kernels of a csrc/ tree for the CPU emulator (include/cuda_emu.h).

generate() writes a copy of csrc/ in which only what g++ cannot read is
rewritten, keeping every line where it was and starting each file with a
`#line` directive, so that errors and fault reports name the original file
and line:

  kernel<<<grid, block, smem, stream>>>(args)
      -> kernel % ::cuda_emu::LaunchConfig(site, grid, block, smem, stream)(args)
  extern __shared__ T name[];     -> T* const name = (T*) ::cuda_emu::dynamic_shared();
  __shared__ alignas(N)           -> alignas(N) __shared__   (g++ wants it first)
  TORCH_LIBRARY_IMPL(ns, CUDA, m) -> TORCH_LIBRARY_IMPL(ns_emu, CPU, m)
  .is_cuda()                      -> .is_cpu()   (the emulated "device" is the CPU)
  CUDA_KERNEL_ASSERT(cond)        -> CUDA_EMU_KERNEL_ASSERT(cond)   (a fault report, not glibc's abort)
  at::empty(...), at::empty_like  -> the same, filled with 0xff bytes (NaN): reads
                                     of memory no kernel wrote show in the results

and a module source that defines the op schemas of csrc/*.cpp under the
namespace `<ns>_emu`, so that the emulated op loads beside the real
apl_kernels._C without a clash.  Features the emulator does not model (inline
PTX, cooperative groups, cp.async, TMA, wgmma) are refused here, with the line;
a prefetch hint, and the 16-byte cp.async and its wait of apl_cuda_common.cuh
(which route to include/cuda_emu.h's hooks off the GPU), pass.

build() compiles the generated sources with torch.utils.cpp_extension.load,
with APL_EMULATE_GPU_MATH defined: csrc/apl_loss_math.h then compiles its device
math form (what the GPU runs), with libm stand-ins (ftz) for MUFU ex2 / lg2 / sqrt.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
INCLUDE = HERE / "include"
REPO = HERE.parents[1]
CSRC = REPO / "csrc"
NAMESPACE_SUFFIX = "_emu"


class Refused(RuntimeError):
    """The sources use a feature the emulator does not model."""


# (pattern on comment-free source, what it is)
_REFUSED = [
    (re.compile(r"\b(asm|__asm__|__asm)\s*(volatile|__volatile__)?\s*\("), "inline PTX (asm)"),
    (re.compile(r"\bcooperative_groups\b|\bcg::"), "cooperative groups"),
    (re.compile(r"cp\.async|__pipeline_memcpy_async|memcpy_async\b"), "cp.async"),
    (re.compile(r"\bwgmma\b|\bmma\.sync\b|\bwmma::"), "tensor-core MMA (wgmma/wmma)"),
    (re.compile(r"\bCUtensorMap\b|cp\.async\.bulk|\btensormap\b"), "TMA"),
    (re.compile(r"\bcuda::(barrier|pipeline|ptx)\b"), "asynchronous barriers / PTX wrappers"),
]


def _strip_comments(text: str) -> str:
    """Comments and string literals blanked out, newlines kept (so line numbers hold)."""
    def blank(m):
        return re.sub(r"[^\n]", " ", m.group(0))
    return re.sub(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"', blank, text, flags=re.S)


# A cache hint (`prefetch.global.L2`, under #ifdef __CUDA_ARCH__) changes no result: allowed, and absent
# from the host form the emulator compiles.
_ASM_OPEN = r"(asm|__asm__|__asm)\s*(volatile|__volatile__)?\s*\(\s*\""
_HINT = re.compile(_ASM_OPEN + r"prefetch\.")
# The two cp.async forms of apl_cuda_common.cuh (16 bytes global to shared, wait for all): allowed only in
# a file whose host form routes them to the emulator's hooks (include/cuda_emu.h: the copy deferred to
# the wait, an exit before it a fault), so that the emulated kernel keeps their semantics.
_EMULATED_ASM = [(re.compile(_ASM_OPEN + r"cp\.async\.cg\.shared\.global \["), "CUDA_EMU_ASYNC_COPY16"),
                 (re.compile(_ASM_OPEN + r"cp\.async\.wait_all;"), "CUDA_EMU_ASYNC_WAIT_ALL")]


def _emulated_asm(text: str, at: int) -> bool:
    return bool(_HINT.match(text, at)) or any(p.match(text, at) and hook in text for p, hook in _EMULATED_ASM)


def _check_supported(path: Path, text: str) -> None:
    code = _strip_comments(text)
    for pattern, what in _REFUSED:
        for m in pattern.finditer(code):
            if what.startswith("inline PTX") and _emulated_asm(text, m.start()):
                continue
            line = code.count("\n", 0, m.start()) + 1
            raise Refused(f"{path}:{line}: {what} is not emulated by cuda_emu; the emulator refuses to run "
                          f"these kernels (see the docstring of python_tests/cuda_emu/test_emu_kernels.py)")


_LAUNCH = re.compile(r"<<<(.*?)>>>", re.S)
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:(alignas\s*\([^)]*\)|__align__\s*\([^)]*\))\s+)?([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED_ALIGNAS = re.compile(r"__shared__\s+(alignas\s*\([^)]*\))")
_LIBRARY_IMPL_CUDA = re.compile(r"TORCH_LIBRARY_IMPL\(\s*(\w+)\s*,\s*CUDA\s*,")


def rewrite(text: str, suffix: str = NAMESPACE_SUFFIX) -> str:
    """The g++-readable form of one CUDA source (same lines)."""
    text = _LAUNCH.sub(lambda m: f" % ::cuda_emu::LaunchConfig(CUDA_EMU_SITE, {m.group(1)})", text)
    text = _EXTERN_SHARED.sub(
        lambda m: f"{m.group(2)}* const {m.group(3)} = reinterpret_cast<{m.group(2)}*>(::cuda_emu::dynamic_shared());",
        text)
    text = _SHARED_ALIGNAS.sub(lambda m: f"{m.group(1)} __shared__", text)
    text = _LIBRARY_IMPL_CUDA.sub(lambda m: f"TORCH_LIBRARY_IMPL({m.group(1)}{suffix}, CPU,", text)
    text = re.sub(r"\.is_cuda\(\)", ".is_cpu()", text)
    text = re.sub(r"\bCUDA_KERNEL_ASSERT\(", "CUDA_EMU_KERNEL_ASSERT(", text)
    text = re.sub(r"\bat::empty(_like)?\(", lambda m: f"::cuda_emu::poisoned_empty{m.group(1) or ''}(", text)
    return text


def _library_blocks(text: str):
    """(namespace, parameter, body) of each TORCH_LIBRARY(ns, m) { body } in a C++ source."""
    for m in re.finditer(r"TORCH_LIBRARY\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*\{", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        yield m.group(1), m.group(2), text[m.end():i - 1]


@dataclasses.dataclass(frozen=True)
class Generated:
    root: Path
    sources: list
    include_dir: Path


def _write_if_changed(path: Path, text: str) -> None:
    """Unchanged files keep their time stamps: a rebuild in the same folder recompiles only what changed."""
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def generate(csrc: Path, out: Path, suffix: str = NAMESPACE_SUFFIX) -> Generated:
    """Write the rewritten copy of `csrc` under `out`; return the sources to compile.
    The op namespaces get `suffix` (apl_kernels -> apl_kernels_emu)."""
    csrc, out = Path(csrc).resolve(), Path(out).resolve()
    gen = out / "csrc"
    sources, written = [], set()
    for path in sorted(p for p in csrc.rglob("*") if p.is_file()):
        rel = path.relative_to(csrc)
        text = path.read_text()
        cuda = path.suffix in (".cu", ".cuh")
        prefix = ""
        if cuda:
            _check_supported(path, text)
            text = rewrite(text, suffix)
            if "::cuda_emu::poisoned_empty" in text:
                prefix = "#include <cuda_emu_torch.h>\n"
        dest = gen / rel
        _write_if_changed(dest, f'{prefix}#line 1 "{path}"\n{text}')
        written.add(dest)
        if path.suffix == ".cu":
            cpp = dest.with_name(dest.name + ".cpp")  # g++, not nvcc
            _write_if_changed(cpp, f'#include "{dest}"\n')
            written.add(cpp)
            sources.append(str(cpp))
    for stale in [p for p in gen.rglob("*") if p.is_file() and p not in written]:
        stale.unlink()
    schemas = []
    for cpp in sorted(csrc.glob("*.cpp")):
        for ns, param, body in _library_blocks(cpp.read_text()):
            schemas.append(f"TORCH_LIBRARY({ns}{suffix}, {param}) {{{body}}}\n")
    if not schemas:
        raise RuntimeError(f"no TORCH_LIBRARY block in {csrc}/*.cpp: nothing defines the op schemas")
    module = out / "emu_module.cpp"
    _write_if_changed(module, "// Generated by python_tests/cuda_emu/emu_build.py: the op schemas of csrc/*.cpp, renamed.\n"
                      "#include <torch/library.h>\n\n" + "".join(schemas))
    sources.append(str(module))
    return Generated(out, sources, gen)


def cuda_include_dir() -> Path | None:
    """nvcc's include folder (cuda_bf16.h and crt/host_config.h; the pip headers lack the latter)."""
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                                 capture_output=True, text=True, timeout=60)
            candidates += [Path(p) for p in re.findall(r'INCLUDES="-I([^"]+?)"', dry.stdout + dry.stderr)]
        except (OSError, subprocess.SubprocessError):
            pass
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "include")
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)]
    for c in candidates:
        if (c / "crt" / "host_config.h").is_file() and (c / "cuda_bf16.h").is_file():
            return c.resolve()
    return None


@dataclasses.dataclass(frozen=True)
class Variant:
    """A build of the emulated op: its library name, the suffix of its op namespace, extra flags."""
    name: str
    suffix: str
    cflags: tuple = ()
    ldflags: tuple = ()


# The GPU's math form of csrc/apl_loss_math.h in every build (the one the kernels run under
# __CUDA_ARCH__: the fma-based exp arguments, the per-row corrections of ShiftedExp2, the fast
# pow and 1 - exp), with libm stand-ins for the MUFU ex2 / lg2 / sqrt instructions.
GPU_MATH_FLAGS = ("-DAPL_EMULATE_GPU_MATH",)
_ASAN_FLAGS = ("-fsanitize=address", "-fno-omit-frame-pointer")
PLAIN = Variant("apl_cuda_emu", "_emu")                      # torch.ops.apl_kernels_emu
PLANTED = Variant("apl_cuda_emu_planted", "_emu_planted")    # test_emu_faults.py: bugs planted
ASAN = Variant("apl_cuda_emu_asan", "_emu_asan", _ASAN_FLAGS, ("-fsanitize=address",))


def build(build_dir: Path, variant: Variant = PLAIN, csrc: Path = CSRC, verbose: bool = False):
    """Generate, compile and load into torch.ops (an ASan variant only in a process with libasan
    preloaded: asan_runner.py); returns the path of the shared library."""
    import torch.utils.cpp_extension as ext

    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise RuntimeError("cuda_emu needs nvcc's include folder (cuda_bf16.h, crt/host_config.h): "
                           "no nvcc on PATH, no $CUDA_HOME/include, no /usr/local/cuda*/include")
    build_dir = Path(build_dir)
    gen = generate(csrc, build_dir / f"{variant.name}_generated", variant.suffix)
    out = build_dir / variant.name
    out.mkdir(parents=True, exist_ok=True)
    includes = [str(INCLUDE / "stubs"), str(INCLUDE), str(gen.include_dir), str(cuda_inc)]
    if (cuda_inc / "cccl").is_dir():
        includes.append(str(cuda_inc / "cccl"))
    cflags = ["-O1", "-g1", "-fvisibility=hidden", "-fvisibility-inlines-hidden", "-Wno-unused-variable",
              *GPU_MATH_FLAGS, *variant.cflags]
    ext.load(name=variant.name, sources=gen.sources, extra_cflags=cflags, extra_ldflags=list(variant.ldflags),
             extra_include_paths=includes, build_directory=str(out), with_cuda=False, is_python_module=False,
             verbose=verbose, keep_intermediates=False)
    return out / f"{variant.name}.so"

