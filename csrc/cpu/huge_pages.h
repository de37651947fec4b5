// Large CPU outputs on transparent huge pages.
//
// A fresh 16 MiB buffer from malloc is new mmap'd memory: its first write takes
// 4096 page faults, each zeroing 4 KiB.  On the 2-core benchmark machine that
// costs about 7 ms, more than the whole fused loss of [4096, 1000] fp32.
// Advised with MADV_HUGEPAGE (honoured when the kernel's transparent_hugepage
// setting is "madvise" or "always"), the whole 2 MiB pages inside it take one
// fault each.  Memory that malloc reuses is already mapped and costs nothing
// either way.  torch advises huge pages for all of its CPU allocations when
// THP_MEM_ALLOC_ENABLE=1 is set; here it is done for the gradient the fused op
// returns, whatever the environment.
#pragma once

#include <ATen/ATen.h>

namespace apl_cpu {

// at::empty(sizes, options) on the CPU from torch's CPU allocator, with the
// advice above.  The tensor is an ordinary resizable CPU tensor, reported to
// torch.profiler like any other.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace apl_cpu
