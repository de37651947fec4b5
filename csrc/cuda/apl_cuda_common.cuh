// Shared pieces of the CUDA kernels of apl_kernels::fused_loss: the launch
// arguments, 16-byte "slots" of a row, warp/block reductions of the mergeable
// sums of csrc/apl_loss_math.h, row status, and the deterministic loss reduction.
//
// Slots.  A row starting at address a is cut at 16-byte boundaries: slot j holds
// elements [j*V - shift, j*V - shift + V) with V = 16 / sizeof(scalar_t) and
// shift = (a mod 16) / sizeof(scalar_t).  Interior slots are one aligned 16-byte
// load whatever the row stride or storage offset; the (at most two) edge slots
// are read element by element, so no byte outside the row is ever touched.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

// Per-element exps run on ex2.approx (see apl_exp); the tolerances of the
// contract tests hold with it.  Remove this line for libdevice's expf.
#define APL_CUDA_FAST_EXP 1
#include "apl_loss_math.h"

namespace apl_cuda {

using apl::GradCoefs;
using apl::LossParams;
using apl::NormalizerSums;
using apl::SoftmaxStats;

// Device workspace of the mean/sum reductions of a grid of several blocks
// (16-byte header, then one partial per block).  A one-block grid has none.
struct Workspace {
  unsigned long long count;  // rows whose target != ignore_index (mean, counted by count_kept_kernel)
  unsigned int ticket;       // blocks done; the last one reduces the partials
  unsigned int pad;
};
constexpr int64_t kWorkspaceHeader = 16;
__device__ __forceinline__ double* partials(Workspace* ws) {
  return reinterpret_cast<double*>(reinterpret_cast<char*>(ws) + kWorkspaceHeader);
}

// What every kernel gets, by value.  `loss` is [N] (reduction none) or the scalar.
template <typename scalar_t>
struct Args {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits;
  int64_t row_stride, N, K;
  const int64_t* target;
  int64_t ignore_index;
  scalar_t* grad;  // nullptr: no gradient
  acc_t* loss;
  Workspace* ws;  // nullptr for reduction none and for a one-block grid
  bool count_in_kernel;  // mean: every block counts the kept rows itself (else ws->count has them)
  bool prefetch_next_row;  // large K: the block's next row into L2 during a row's on-chip passes
  LossParams P;
  int reduction;
  bool second_pass;
  int device;  // the tensors' CUDA device (host-side planning)
};

// ---------------------------------------------------------------- slots
// A hint: the 32-byte sectors holding [p, p + bytes) into L2, spread over the block's
// threads (a no-op off the GPU: the CPU emulator compiles the host form).
__device__ __forceinline__ void prefetch_l2(const void* p, int64_t bytes, int64_t tid, int64_t T) {
#if defined(__CUDA_ARCH__)
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(31);
  const int64_t span = int64_t(reinterpret_cast<uintptr_t>(p) - first) + bytes;
  for (int64_t off = tid * 32; off < span; off += T * 32)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(first + off));
#endif
}

// 16 bytes from global to shared memory with no register in between (sm_80+: cp.async.cg,
// L2 only), in flight until this thread's async_copies_wait(): a loop of them issues the
// whole batch without waiting.  The CPU emulator defers the write to the wait; the host
// pass of nvcc copies at once.
__device__ __forceinline__ void async_copy16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(to), "l"(gmem) : "memory");
#elif defined(CUDA_EMU_ASYNC_COPY16)
  CUDA_EMU_ASYNC_COPY16(smem, gmem);
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}
// Every async_copy16 of this thread has landed (its own copies only: a slot another thread
// copied needs a barrier after that thread's wait).
__device__ __forceinline__ void async_copies_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;" ::: "memory");
#elif defined(CUDA_EMU_ASYNC_WAIT_ALL)
  CUDA_EMU_ASYNC_WAIT_ALL();
#endif
}

template <typename scalar_t>
struct alignas(16) Slot {
  static constexpr int V = 16 / int(sizeof(scalar_t));
  scalar_t v[V];
};

template <typename scalar_t>
__device__ __forceinline__ int slot_shift(const scalar_t* p) {
  return int((reinterpret_cast<uintptr_t>(p) & 15) / sizeof(scalar_t));
}

// Number of slots of a row of K elements with this shift.
template <typename scalar_t>
__device__ __forceinline__ int64_t slot_count(int64_t K, int shift) {
  constexpr int V = Slot<scalar_t>::V;
  return (K + shift + V - 1) / V;
}

template <typename scalar_t>
__device__ __forceinline__ bool slot_full(int64_t e0, int64_t K) {
  return e0 >= 0 && e0 + Slot<scalar_t>::V <= K;
}

// Slot whose first element is row[e0] (e0 may be negative in the first slot).
template <typename scalar_t>
__device__ __forceinline__ void load_slot(const scalar_t* row, int64_t e0, int64_t K, Slot<scalar_t>& s) {
  constexpr int V = Slot<scalar_t>::V;
  if (slot_full<scalar_t>(e0, K)) {
    *reinterpret_cast<uint4*>(&s) = __ldg(reinterpret_cast<const uint4*>(row + e0));
  } else {
#pragma unroll
    for (int t = 0; t < V; ++t) {
      const int64_t e = e0 + t;
      s.v[t] = (e >= 0 && e < K) ? row[e] : scalar_t(0);
    }
  }
}

// A slot of shared memory as one 16-byte load (LDS.128); element reads through
// a reference to the shared slot would be one LDS.U16 / LDS each.
template <typename scalar_t>
__device__ __forceinline__ Slot<scalar_t> copy_slot(const Slot<scalar_t>* p) {
  Slot<scalar_t> s;
  *reinterpret_cast<uint4*>(&s) = *reinterpret_cast<const uint4*>(p);
  return s;
}

// A full 16-byte slot of the gradient: a streaming store (evict first), so that the
// gradient does not push out of L2 the rows still to be re-read or prefetched.
template <typename scalar_t>
__device__ __forceinline__ void store_full_slot(scalar_t* p, const Slot<scalar_t>& s) {
  __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&s));
}

// Store the in-row elements of a slot; one 16-byte store when `vec` (the
// destination row has the same shift as the source row) and the slot is full.
template <typename scalar_t>
__device__ __forceinline__ void store_slot(scalar_t* row, int64_t e0, int64_t K, const Slot<scalar_t>& s, bool vec) {
  constexpr int V = Slot<scalar_t>::V;
  if (vec && slot_full<scalar_t>(e0, K)) {
    store_full_slot(row + e0, s);
  } else {
#pragma unroll
    for (int t = 0; t < V; ++t) {
      const int64_t e = e0 + t;
      if (e >= 0 && e < K) row[e] = s.v[t];
    }
  }
}

// f(t, e, z) for every in-row element of a slot, z in the accumulation type.
// One predicated copy of the body (no separate full-slot path): smaller code,
// faster builds, and the compares are cheap next to the exp per element.
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_each_in_slot(const Slot<scalar_t>& s, int64_t e0, int64_t K, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Slot<scalar_t>::V;
  const int lo = e0 < 0 ? int(-e0) : 0;
  const int hi = K - e0 >= V ? V : int(K - e0);
#pragma unroll
  for (int t = 0; t < V; ++t)
    if (t >= lo && t < hi) f(t, e0 + t, static_cast<acc_t>(s.v[t]));
}

// The same for a slot known to be full: no per-element bounds (interior slots).
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_each_in_full_slot(const Slot<scalar_t>& s, int64_t e0, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma unroll
  for (int t = 0; t < Slot<scalar_t>::V; ++t) f(t, e0 + t, static_cast<acc_t>(s.v[t]));
}

// Fill a whole row (ignored rows: 0, bad labels: NaN), slots j = first, first + step, ...
template <typename scalar_t>
__device__ __forceinline__ void fill_row(scalar_t* row, int64_t K, scalar_t value, int64_t first, int64_t step) {
  constexpr int V = Slot<scalar_t>::V;
  const int shift = slot_shift(row);
  Slot<scalar_t> s;
#pragma unroll
  for (int t = 0; t < V; ++t) s.v[t] = value;
  const int64_t n = slot_count<scalar_t>(K, shift);
  for (int64_t j = first; j < n; j += step) store_slot(row, j * V - shift, K, s, true);
}

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ unsigned long long shfl_xor(unsigned long long v, int o) {
  return __shfl_xor_sync(0xffffffffu, v, o);
}

// SoftmaxStats / NormalizerSums word by word, so that a field added to them
// in apl_loss_math.h is carried along without a change here.
template <typename R>
__device__ __forceinline__ R shfl_xor_words(const R& v, int o) {
  static_assert(sizeof(R) % sizeof(uint32_t) == 0, "a struct of float or double fields");
  constexpr int n = sizeof(R) / sizeof(uint32_t);
  uint32_t w[n];
  memcpy(w, &v, sizeof(R));
#pragma unroll
  for (int i = 0; i < n; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], o);
  R r;
  memcpy(&r, w, sizeof(R));
  return r;
}
template <typename T>
__device__ __forceinline__ SoftmaxStats<T> shfl_xor(const SoftmaxStats<T>& s, int o) { return shfl_xor_words(s, o); }
template <typename T>
__device__ __forceinline__ NormalizerSums<T> shfl_xor(const NormalizerSums<T>& s, int o) {
  return shfl_xor_words(s, o);
}

template <typename T>
__device__ __forceinline__ void combine(SoftmaxStats<T>& a, const SoftmaxStats<T>& b) { a.merge(b); }
template <typename T>
__device__ __forceinline__ void combine(NormalizerSums<T>& a, const NormalizerSums<T>& b) { a.merge(b); }
__device__ __forceinline__ void combine(double& a, double b) { a += b; }
__device__ __forceinline__ void combine(unsigned long long& a, unsigned long long b) { a += b; }

// Butterfly over aligned groups of `width` lanes (a power of two <= 32); every
// lane of the warp must call it.  merge() is commutative, so all lanes of a
// group end with bit-identical results.
template <typename R>
__device__ __forceinline__ void group_allreduce(R& v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) combine(v, shfl_xor(v, o));
}

// Block-wide; every thread gets the same value.  `scratch` holds 32 R in
// shared memory.  Warps are merged in a fixed order: deterministic.
template <typename R>
__device__ __forceinline__ R block_allreduce(R v, R* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  __syncthreads();  // the previous call's readers are done with scratch
  group_allreduce(v, 32);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  R r = scratch[0];
  for (int w = 1; w < nwarps; ++w) combine(r, scratch[w]);
  return r;
}

// ---------------------------------------------------------------- variants
// Each kernel has a general variant (kPow) and one for losses without nfl,
// ngce or nnfl terms (nce+rce, ce, sce, nce+agce, nce+amse, ...).  There,
// constants let the compiler drop the pow and focal code from the per-element
// loops: less code, fewer branches.  The large-K kernel also has variants for
// the hot pairs (kActive, kPassive): the terms are constants, so every choice
// of a term in the per-element code folds away.  kAnyTerm: read at run time.
constexpr int kAnyTerm = -1;

inline __host__ __device__ bool has_pow_terms(const LossParams& P) {
  return P.active == apl::kNFL || P.active == apl::kNGCE || P.passive == apl::kNNFL;
}

// The params a variant computes with: its constant terms in place of the run-time ones.
template <int kActive, int kPassive>
__device__ __forceinline__ LossParams pair_params(LossParams P) {
  if constexpr (kActive != kAnyTerm) P.active = kActive;
  if constexpr (kPassive != kAnyTerm) P.passive = kPassive;
  return P;
}

// Params of the normaliser pass: without nfl/ngce the only active term with
// sums is ece (its argmax ties), so the other active codes can go.
template <bool kPow>
__device__ __forceinline__ LossParams sums_params(LossParams P) {
  if constexpr (!kPow) P.active = P.active == apl::kECE ? apl::kECE : apl::kActiveNone;
  return P;
}

// Gradient coefficients: c_focal, c_pow and c_neg_focal are exactly 0 without
// nfl/ngce/nnfl; with constant terms, every coefficient the pair has not is 0.
template <bool kPow, typename T, int kActive = kAnyTerm, int kPassive = kAnyTerm>
__device__ __forceinline__ GradCoefs<T> grad_coefs(GradCoefs<T> c) {
  if constexpr (!kPow) {
    c.c_focal = 0;
    c.c_pow = 0;
    c.c_neg_focal = 0;
  }
  if constexpr (kActive != kAnyTerm) {
    if constexpr (kActive != apl::kNCE) c.c_const = 0;
    if constexpr (kActive != apl::kNFL) c.c_focal = 0;
    if constexpr (kActive != apl::kNGCE) c.c_pow = 0;
  }
  if constexpr (kPassive != kAnyTerm) {
    if constexpr (kPassive != apl::kAMSE) c.c_sq = 0;
    if constexpr (kPassive != apl::kNNCE) c.c_neg = 0;
    if constexpr (kPassive != apl::kNNFL) c.c_neg_focal = 0;
  }
  return c;
}

// ---------------------------------------------------------------- rows
enum RowStatus : int { kRowOk = 0, kRowIgnored = 1, kRowBad = 2 };

// A label outside [0, K) that is not ignore_index stops the kernel with a
// device-side assert, as F.cross_entropy does (no host sync).  Where asserts
// are compiled out, the row's loss and gradient are NaN.
template <typename scalar_t>
__device__ __forceinline__ RowStatus row_status(const Args<scalar_t>& a, int64_t y) {
  if (y == a.ignore_index) return kRowIgnored;
  const bool in_range = y >= 0 && y < a.K;
  CUDA_KERNEL_ASSERT(in_range && "fused_loss: a target is outside [0, K) and is not ignore_index");
  return in_range ? kRowOk : kRowBad;
}

// Labels each thread loads at once in count_kept_rows (apl_cuda_op.cu's
// count_in_kernel keeps the count in the loss kernel when one round covers N).
constexpr int kCountLoadsPerThread = 8;

// The rows whose target is not ignore_index, counted by the whole block; every
// thread gets the total.  Integers: the same in every block and every run.
template <typename scalar_t>
__device__ unsigned long long count_kept_rows(const Args<scalar_t>& a, unsigned long long* scratch) {
  unsigned long long c = 0;
  const int64_t T = blockDim.x;
  int64_t i = threadIdx.x;
  constexpr int U = kCountLoadsPerThread;
  for (; i + (U - 1) * T < a.N; i += U * T) {  // U independent loads in flight per thread
    int64_t v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = __ldg(a.target + i + u * T);
#pragma unroll
    for (int u = 0; u < U; ++u) c += v[u] != a.ignore_index;
  }
  for (; i < a.N; i += T) c += __ldg(a.target + i) != a.ignore_index;
  return block_allreduce(c, scratch);
}

// The mean's divisor (0 for sum and none); every thread of the block must call it.
template <typename scalar_t>
__device__ __forceinline__ unsigned long long kept_rows(const Args<scalar_t>& a, unsigned long long* scratch) {
  if (a.reduction != apl::kReduceMean) return 0;
  return a.count_in_kernel ? count_kept_rows(a, scratch) : __ldcg(&a.ws->count);
}

// The reduction's factor of every gradient row.
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> grad_weight(const Args<scalar_t>& a, unsigned long long kept) {
  using acc_t = at::opmath_type<scalar_t>;
  if (a.reduction != apl::kReduceMean) return acc_t(1);
  return kept > 0 ? acc_t(1) / static_cast<acc_t>(kept) : acc_t(0);
}

// The loss of a row as the output holds it: 0 when ignored, NaN for a bad label.
template <typename acc_t>
__device__ __forceinline__ acc_t row_loss_value(RowStatus st, acc_t loss) {
  return st == kRowOk ? loss : (st == kRowIgnored ? acc_t(0) : acc_t(NAN));
}

// Mean/sum: every block sums its rows (`partial`, any thread's share) in a fixed
// order; one block writes its sum, several write per-block partials and the
// last block to finish sums them in index order.  No float atomics, so the
// result does not depend on scheduling.  `kept`: kept_rows().
template <typename scalar_t>
__device__ void reduce_loss(const Args<scalar_t>& a, double partial, double* scratch, unsigned long long kept) {
  if (a.reduction == apl::kReduceNone) return;
  __shared__ bool is_last;
  const double block_sum = block_allreduce(partial, scratch);
  double total = block_sum;
  if (gridDim.x > 1) {
    if (threadIdx.x == 0) {
      partials(a.ws)[blockIdx.x] = block_sum;
      __threadfence();  // the partial is visible before the ticket says so
      is_last = atomicAdd(&a.ws->ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    double v = 0;
    const int64_t n = gridDim.x;
    for (int64_t i = threadIdx.x; i < n; i += 4 * int64_t(blockDim.x)) {  // 4 loads in flight
      double w[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t k = i + u * int64_t(blockDim.x);
        w[u] = k < n ? __ldcg(partials(a.ws) + k) : 0.0;
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) v += w[u];
    }
    total = block_allreduce(v, scratch);
  }
  if (threadIdx.x == 0) {
    if (a.reduction == apl::kReduceMean) total = kept > 0 ? total / static_cast<double>(kept) : 0.0;
    *a.loss = static_cast<at::opmath_type<scalar_t>>(total);
  }
}

// ---------------------------------------------------------------- launchers
// Defined in apl_cuda_small_k.cu and apl_cuda_large_k.cu.  plan_*() picks the
// launch shape; the op then sizes the workspace (one partial per block) and
// calls launch_*() with the same plan.
constexpr int64_t kSmallKMax = 1024;  // K up to this: a group of lanes per row

// Whether the small-K kernel takes rows of K.  fp64 only has the one-slot-per-lane
// variant (K up to 62): a wide fp64 variant would double the build for a rare type.
template <typename scalar_t>
constexpr bool small_k_supports(int64_t K) {
  constexpr int V = Slot<scalar_t>::V;
  return K <= kSmallKMax && (sizeof(scalar_t) < 8 || (K + 2 * V - 2) / V <= 32);
}

struct LaunchPlan {
  int64_t grid = 1;
  int threads = 0;
  int group = 0;      // small K: lanes per row
  int nv = 1;         // small K: register slots per lane (the kernel variant)
  int64_t cap = 0;    // large K: slots kept in shared memory
  size_t smem = 0;    // large K: dynamic shared memory bytes
};

template <typename scalar_t>
LaunchPlan plan_small_k(const Args<scalar_t>& a);
template <typename scalar_t>
void launch_small_k(const Args<scalar_t>& a, const LaunchPlan& p, cudaStream_t stream);
template <typename scalar_t>
LaunchPlan plan_large_k(const Args<scalar_t>& a);
template <typename scalar_t>
void launch_large_k(const Args<scalar_t>& a, const LaunchPlan& p, cudaStream_t stream);

}  // namespace apl_cuda
