// The fused CPU kernel's row loops (fused_rows_impl.h) compiled for AVX512
// (avx512f,avx512vl,avx512bw,avx512dq,avx2,fma); fused_loss_cpu.cpp calls them when cpuid reports these features.
// Every header comes before the target pragma (fused_rows.h), so that their
// inline functions keep the baseline ISA; see fused_rows_impl.h.
#include "cpu/fused_rows.h"

#if APL_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")

namespace apl_cpu {
namespace avx512 {
#include "cpu/fused_rows_impl.h"
}  // namespace avx512
}  // namespace apl_cpu

#pragma GCC pop_options
#endif  // APL_CPU_X86_VARIANTS
