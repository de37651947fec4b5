// cuda_emu: refuses tensor-core MMA (mma.h).
#error "cuda_emu: tensor-core MMA (mma.h) is not emulated (see the docstring of python_tests/cuda_emu/test_emu_kernels.py): the emulator will not run this kernel"
