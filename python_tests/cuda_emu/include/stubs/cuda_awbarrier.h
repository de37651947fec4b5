// cuda_emu: refuses asynchronous barriers (cuda_awbarrier.h).
#error "cuda_emu: asynchronous barriers (cuda_awbarrier.h) is not emulated (see the docstring of python_tests/cuda_emu/test_emu_kernels.py): the emulator will not run this kernel"
