// cuda_emu: refuses cp.async (cuda_pipeline.h).
#error "cuda_emu: cp.async (cuda_pipeline.h) is not emulated (see the docstring of python_tests/cuda_emu/test_emu_kernels.py): the emulator will not run this kernel"
