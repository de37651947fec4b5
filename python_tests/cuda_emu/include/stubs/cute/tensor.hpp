// cuda_emu: refuses CuTe (TMA/wgmma).
#error "cuda_emu: CuTe (TMA/wgmma) is not emulated (see the docstring of python_tests/cuda_emu/test_emu_kernels.py): the emulator will not run this kernel"
