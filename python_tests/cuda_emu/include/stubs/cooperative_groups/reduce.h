// cuda_emu: refuses cooperative groups.
#error "cuda_emu: cooperative groups is not emulated (see the docstring of python_tests/cuda_emu/test_emu_kernels.py): the emulator will not run this kernel"
