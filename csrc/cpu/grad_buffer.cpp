// See grad_buffer.h.
#include "cpu/grad_buffer.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace apl_cpu {
namespace {

constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
constexpr size_t kAlignment = 64;                    // as c10's CPU allocator
constexpr size_t kMaxCachedBytes = size_t(256) << 20;

struct Block {
  void* ptr;
  size_t bytes;
};

// Freed blocks, oldest first.
class BlockCache {
 public:
  // A cached block of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes == bytes) {
        void* ptr = it->ptr;
        cached_bytes_ -= bytes;
        blocks_.erase(std::next(it).base());
        return ptr;
      }
    }
    return nullptr;
  }

  // Keeps a freed block, evicting the oldest ones to stay within kMaxCachedBytes.
  void keep(void* ptr, size_t bytes) {
    if (bytes > kMaxCachedBytes) {
      std::free(ptr);
      return;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    while (cached_bytes_ + bytes > kMaxCachedBytes) {
      std::free(blocks_.front().ptr);
      cached_bytes_ -= blocks_.front().bytes;
      blocks_.pop_front();
    }
    blocks_.push_back({ptr, bytes});
    cached_bytes_ += bytes;
  }

 private:
  std::mutex mutex_;
  std::deque<Block> blocks_;
  size_t cached_bytes_ = 0;
};

bool cache_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("APL_CPU_GRAD_CACHE");
    return !(value && std::strcmp(value, "0") == 0);
  }();
  return enabled;
}

// Never destroyed: a gradient freed during the interpreter's exit may still come back.
BlockCache& cache() {
  static BlockCache* blocks = new BlockCache;
  return *blocks;
}

std::atomic<size_t> live_bytes{0};  // handed out and not yet freed (for the profiler's totals)

void report(void* ptr, int64_t delta) {
  const size_t live = live_bytes.fetch_add(static_cast<size_t>(delta)) + static_cast<size_t>(delta);
  c10::reportMemoryUsageToProfiler(ptr, delta, live, live, c10::Device(c10::DeviceType::CPU));
}

void release(void* context) {
  Block* block = static_cast<Block*>(context);
  report(block->ptr, -static_cast<int64_t>(block->bytes));
  if (cache_enabled()) {
    cache().keep(block->ptr, block->bytes);
  } else {
    std::free(block->ptr);
  }
  delete block;
}

struct GradientAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) return c10::DataPtr(nullptr, cpu);
    void* ptr = cache_enabled() ? cache().take(n) : nullptr;
    if (!ptr) {
      if (posix_memalign(&ptr, kAlignment, n) != 0) ptr = nullptr;
      TORCH_CHECK(ptr, "apl_kernels: out of memory allocating a ", n, "-byte gradient on the CPU");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      const uintptr_t begin = reinterpret_cast<uintptr_t>(ptr);
      const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = (begin + n) & ~(kHugePage - 1);
      if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint only
#endif
    }
    report(ptr, static_cast<int64_t>(n));
    return {ptr, new Block{ptr, n}, &release, cpu};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static GradientAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

}  // namespace apl_cpu
