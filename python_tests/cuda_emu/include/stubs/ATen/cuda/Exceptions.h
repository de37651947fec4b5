// cuda_emu stub of torch's ATen/cuda/Exceptions.h: the checks of the c10/cuda/CUDAException.h stub.
#pragma once
#include <c10/cuda/CUDAException.h>
