// cuda_emu stub of torch's ATen/cuda/CUDAContext.h: one device (the emulated H200), one stream.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace at::cuda {
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
inline cudaDeviceProp* getCurrentDeviceProperties() { return ::cuda_emu::device_props(); }
inline cudaDeviceProp* getDeviceProperties(c10::DeviceIndex) { return ::cuda_emu::device_props(); }
inline c10::DeviceIndex current_device() { return 0; }
inline int getNumGPUs() { return 1; }
}  // namespace at::cuda
