// The CPU gradient buffer the fused op returns.
//
// A fresh 16 MiB buffer is new mmap'd (or sbrk'd) memory: its first write takes
// page faults, and the kernel zeroes every page.  On the 2-core benchmark
// machine that costs 5-10 ms, more than the whole fused loss of [4096, 1000]
// fp32 (5 ms).  malloc hands out fresh memory whenever it has given the last
// block back to the system, which it does as soon as other allocations (a
// training step's activations, the eager reference in bench.kernels) shrink
// its heap.  So the buffer:
//   * is advised MADV_HUGEPAGE (honoured when the kernel's transparent_hugepage
//     setting is "madvise" or "always"): whole 2 MiB pages take one fault each;
//   * when freed, goes to a small cache of this file and is handed out again to
//     the next gradient of exactly its size (a training step's next call):
//     no faults, no zeroing.  The cache holds the most recently freed blocks,
//     at most kMaxCachedBytes (256 MiB) in all; APL_CPU_GRAD_CACHE=0 turns it
//     off.  Its blocks stay reserved until the process exits.
// Each allocation and free (cached or not) is reported to torch.profiler like
// those of torch's own CPU allocator.
#pragma once

#include <ATen/ATen.h>

namespace apl_cpu {

// at::empty(sizes, options) on the CPU from the allocator above.  The tensor is an
// ordinary resizable CPU tensor.
at::Tensor empty_gradient(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace apl_cpu
