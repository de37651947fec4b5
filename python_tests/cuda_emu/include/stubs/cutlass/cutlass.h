// cuda_emu: refuses CUTLASS (TMA/wgmma).
#error "cuda_emu: CUTLASS (TMA/wgmma) is not emulated (see the docstring of python_tests/cuda_emu/test_emu_kernels.py): the emulator will not run this kernel"
