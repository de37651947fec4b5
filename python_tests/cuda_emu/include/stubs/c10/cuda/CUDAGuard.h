// cuda_emu stub of torch's c10/cuda/CUDAGuard.h: one device, nothing to switch.
#pragma once
#include <c10/core/Device.h>
#include <optional>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace c10::cuda
