// See huge_pages.h.
#include "cpu/huge_pages.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace apl_cpu {
namespace {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;

// torch's CPU allocator, plus the advice on the whole huge pages inside each
// block (memory malloc reuses is already mapped and keeps its pages).
struct HugePageAdvisingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr block = c10::GetDefaultCPUAllocator()->allocate(n);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t begin = reinterpret_cast<uintptr_t>(block.get());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = (begin + n) & ~(kHugePage - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint only
#endif
    return block;
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static HugePageAdvisingAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

}  // namespace apl_cpu
