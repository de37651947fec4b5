// cuda_emu stub of torch's ATen/cuda/CUDAContextLight.h: the same declarations as the CUDAContext.h stub.
#pragma once
#include <ATen/cuda/CUDAContext.h>
