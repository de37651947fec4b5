// Large CPU outputs on transparent huge pages.
//
// A fresh 16 MiB buffer from malloc is new mmap'd memory: its first write takes
// 4096 page faults, each zeroing 4 KiB.  On the 2-core benchmark machine that
// costs about 7 ms, more than the whole fused loss of [4096, 1000] fp32.
// Asked for with MADV_HUGEPAGE (honoured when the kernel's
// transparent_hugepage setting is "madvise" or "always"), the same buffer takes
// 8 faults of 2 MiB, about 1 ms.  torch does this for all of its CPU
// allocations when THP_MEM_ALLOC_ENABLE=1 is set; here it is done for the
// gradient the fused op returns, whatever the environment.
#pragma once

#include <ATen/ATen.h>

namespace apl_cpu {

// at::empty(sizes, options) on the CPU, on 2 MiB-aligned memory advised for huge
// pages when it is at least 4 MiB (smaller ones come from at::empty).  The
// tensor is an ordinary resizable CPU tensor; its allocations and frees are
// reported to torch.profiler like the default allocator's.
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace apl_cpu
