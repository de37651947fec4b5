"""The source generator of the emulator (emu_build.py): what it rewrites, and what it refuses."""
import subprocess

import pytest

import emu_build

KERNEL = """\
#include <cuda_runtime.h>
__global__ void k(float* x, int n) {
  extern __shared__ __align__(16) float buf[];
  __shared__ alignas(16) unsigned char scratch[64];
  x[threadIdx.x] = buf[0] + scratch[0];
}
void launch(float* x, int n, cudaStream_t s) {
  k<<<dim3(2, 1),
      128, 64, s>>>(x, n);
}
TORCH_LIBRARY_IMPL(my_ops, CUDA, m) { m.impl("f", &f); }
"""


def test_rewrite_keeps_lines_and_rewrites_what_gcc_cannot_read():
    out = emu_build.rewrite(KERNEL, "_emu")
    assert out.count("\n") == KERNEL.count("\n")
    assert "<<<" not in out and ">>>" not in out
    assert "k % ::cuda_emu::LaunchConfig(CUDA_EMU_SITE, dim3(2, 1),\n      128, 64, s)(x, n);" in out
    assert "float* const buf = reinterpret_cast<float*>(::cuda_emu::dynamic_shared());" in out
    assert "alignas(16) __shared__ unsigned char scratch[64];" in out
    assert "TORCH_LIBRARY_IMPL(my_ops_emu, CPU," in out


def test_generate_names_the_original_lines(tmp_path):
    csrc = tmp_path / "csrc"
    (csrc / "cuda").mkdir(parents=True)
    (csrc / "cuda" / "k.cu").write_text(KERNEL)
    (csrc / "ops.cpp").write_text('TORCH_LIBRARY(my_ops, m) {\n  m.def("f(Tensor x) -> Tensor");\n}\n')
    gen = emu_build.generate(csrc, tmp_path / "out", "_emu")
    text = (gen.include_dir / "cuda" / "k.cu").read_text()
    assert text.startswith(f'#line 1 "{csrc / "cuda" / "k.cu"}"\n')
    module = (tmp_path / "out" / "emu_module.cpp").read_text()
    assert 'TORCH_LIBRARY(my_ops_emu, m) {\n  m.def("f(Tensor x) -> Tensor");\n}' in module


@pytest.mark.parametrize("code, what", [
    ('  asm volatile("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));', "inline PTX"),
    ("  namespace cg = cooperative_groups;", "cooperative groups"),
    ("  __pipeline_memcpy_async(dst, src, 16);", "cp.async"),
    ("  wgmma::fence();", r"tensor-core MMA \(wgmma"),
    ("  CUtensorMap map;", "TMA"),
])
def test_unsupported_features_are_refused_with_their_line(tmp_path, code, what):
    csrc = tmp_path / "csrc"
    (csrc / "cuda").mkdir(parents=True)
    (csrc / "cuda" / "k.cu").write_text(f"// asm( in a comment is fine\n__global__ void k() {{\n{code}\n}}\n")
    with pytest.raises(emu_build.Refused, match=rf"k\.cu:3: {what}.* is not emulated"):
        emu_build.generate(csrc, tmp_path / "out")


def test_a_prefetch_hint_is_allowed_and_other_ptx_after_it_still_refused(tmp_path):
    """prefetch.global.L2 changes no result (the host form the emulator compiles leaves it out)."""
    csrc = tmp_path / "csrc"
    (csrc / "cuda").mkdir(parents=True)
    hint = '  asm volatile("prefetch.global.L2 [%0];" :: "l"(p));\n'
    (csrc / "cuda" / "k.cu").write_text(f"__global__ void k(const char* p) {{\n{hint}}}\n")
    (csrc / "ops.cpp").write_text('TORCH_LIBRARY(my_ops, m) {\n  m.def("f(Tensor x) -> Tensor");\n}\n')
    emu_build.generate(csrc, tmp_path / "out")
    (csrc / "cuda" / "k.cu").write_text(f"__global__ void k(const char* p) {{\n{hint}"
                                        '  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));\n}\n')
    with pytest.raises(emu_build.Refused, match=r"k\.cu:3: inline PTX"):
        emu_build.generate(csrc, tmp_path / "out2")


@pytest.mark.parametrize("hooked", [True, False])
def test_cp_async_asm_passes_only_beside_the_emulator_hooks(tmp_path, hooked):
    """The cp.async forms of apl_cuda_common.cuh run under the emulator only through its hooks (copy at
    the wait, a fault at an exit before it); the same asm without them, or another cp.async, is refused."""
    csrc = tmp_path / "csrc"
    (csrc / "cuda").mkdir(parents=True)
    (csrc / "ops.cpp").write_text('TORCH_LIBRARY(my_ops, m) {\n  m.def("f(Tensor x) -> Tensor");\n}\n')
    host = ("#elif defined(CUDA_EMU_ASYNC_COPY16)\n  CUDA_EMU_ASYNC_COPY16(s, g);\n  CUDA_EMU_ASYNC_WAIT_ALL();\n"
            if hooked else "#else\n")
    (csrc / "cuda" / "k.cu").write_text(
        "__device__ void f(void* s, const void* g) {\n#if defined(__CUDA_ARCH__)\n"
        '  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(0), "l"(g));\n'
        '  asm volatile("cp.async.wait_all;" ::: "memory");\n' + host + "#endif\n}\n")
    if hooked:
        emu_build.generate(csrc, tmp_path / "out")
    else:
        with pytest.raises(emu_build.Refused, match=r"k\.cu:3: inline PTX"):
            emu_build.generate(csrc, tmp_path / "out")
    text = (csrc / "cuda" / "k.cu").read_text().replace("cp.async.cg.shared.global [%0], [%1], 16;",
                                                       "cp.async.ca.shared.global [%0], [%1], 8;")
    (csrc / "cuda" / "k.cu").write_text(text)
    with pytest.raises(emu_build.Refused, match=r"k\.cu:3: inline PTX"):
        emu_build.generate(csrc, tmp_path / "out2")


def test_unsupported_headers_are_refused_by_the_compiler(tmp_path):
    src = tmp_path / "k.cpp"
    src.write_text("#include <cuda_pipeline.h>\n")
    r = subprocess.run(["g++", "-fsyntax-only", f"-I{emu_build.INCLUDE / 'stubs'}", str(src)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "cuda_emu: cp.async (cuda_pipeline.h) is not emulated" in r.stderr, r.stderr
