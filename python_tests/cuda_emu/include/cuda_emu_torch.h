// cuda_emu: device allocations of the emulated op start as 0xff bytes (NaN in
// every float type), so that a read of memory no kernel wrote shows in the
// results.  emu_build.py rewrites at::empty / at::empty_like in CUDA sources to these.
#pragma once
#include <ATen/ATen.h>

#include <cstring>
#include <optional>

namespace cuda_emu {
inline at::Tensor poison(at::Tensor t) {
  if (t.defined() && t.nbytes() > 0) memset(t.data_ptr(), 0xff, t.nbytes());
  return t;
}
inline at::Tensor poisoned_empty(at::IntArrayRef size, at::TensorOptions options = {},
                                 std::optional<at::MemoryFormat> format = std::nullopt) {
  return poison(at::empty(size, options, format));
}
inline at::Tensor poisoned_empty_like(const at::Tensor& t, at::TensorOptions options = {},
                                      std::optional<at::MemoryFormat> format = std::nullopt) {
  return poison(at::empty_like(t, options, format));
}
}  // namespace cuda_emu
