// Large K: one block per row (blocks loop over rows).  The first `cap` slots of
// the row stay in dynamic shared memory (up to the opt-in limit, 227 KB on
// H100/H200), so a row that fits is read from HBM once and its gradient written
// once.  Slots beyond `cap` (rows longer than shared memory) are streamed from
// global memory again in each pass, where L2 usually still holds them.
//
// Thread t owns slots t, t + T, t + 2T, ... in every pass, so each thread only
// reads back what it wrote to shared memory itself: the passes need barriers
// only inside the block reductions.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "cuda/apl_cuda_common.cuh"

namespace apl_cuda {
namespace {

constexpr int kLargeBlockMax = 512;
constexpr int kLoadBatch = 8;  // 16-byte loads in flight per thread while filling shared memory

// max that skips NaN (one FMNMX): a NaN logit still poisons its row, through
// its exp in the row's sum.
__device__ __forceinline__ float max_skipping_nan(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_skipping_nan(double a, double b) { return fmax(a, b); }

// d loss / d z_k of a class k that is not the label (the label's entry is
// written apart, once per row).  Constant terms fold the choices away.
template <int kActive, int kPassive, typename T>
__device__ __forceinline__ T grad_not_label(T z, const GradCoefs<T>& c, const LossParams& P) {
  const T log_p = apl::log_prob(z, c.max, c.log_sum);
  const T p = apl::apl_exp(log_p);
  T focal_d = 0;
  if (c.c_focal != T(0) || c.c_neg_focal != T(0)) {
    const T one_minus_p = apl::apl_one_minus_exp(log_p, p);
    focal_d = apl::focal_deriv_from(log_p, p, one_minus_p, apl::apl_pow(one_minus_p, T(P.gamma)), T(P.gamma),
                                    P.grad_mode);
  }
  const bool live = apl::unclamped(p), live_neg = apl::above_min_prob(p, P);
  // Without rce / nrce, p_coef is -g_sum: no clamp test.
  if constexpr (kPassive != kAnyTerm && kPassive != apl::kRCE && kPassive != apl::kNRCE)
    return apl::grad_common(p, live, live_neg, focal_d, c, P) - p * c.g_sum;
  else
    return apl::grad_other_from(p, live, live_neg, focal_d, c, P);
}

template <typename scalar_t, bool kPow, int kActive = kAnyTerm, int kPassive = kAnyTerm>
__global__ void __launch_bounds__(kLargeBlockMax) large_k_kernel(const Args<scalar_t> a, const int64_t cap) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Slot<scalar_t>::V;
  // sum (z - max) is read by the NCE normaliser only.
  constexpr bool kShifted = kActive == kAnyTerm || kActive == apl::kNCE;
  extern __shared__ uint4 smem_rows[];
  Slot<scalar_t>* cache = reinterpret_cast<Slot<scalar_t>*>(smem_rows);
  // Scratch of the block reductions, for the largest type reduced.
  __shared__ alignas(16) unsigned char scratch[32 * sizeof(NormalizerSums<acc_t>)];

  const LossParams P = pair_params<kActive, kPassive>(a.P);
  const bool second_pass = kActive == kAnyTerm ? a.second_pass : apl::needs_second_pass(P);
  const int64_t K = a.K, T = blockDim.x, tid = threadIdx.x;
  const unsigned long long kept = kept_rows(a, reinterpret_cast<unsigned long long*>(scratch));
  const acc_t weight = grad_weight(a, kept);
  double partial = 0;

  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const int64_t y = a.target[row];
    const RowStatus st = row_status(a, y);
    scalar_t* g = a.grad != nullptr ? a.grad + row * K : nullptr;
    if (st != kRowOk) {  // uniform over the block
      if (tid == 0) {
        const acc_t l = row_loss_value(st, acc_t(0));
        if (a.reduction == apl::kReduceNone) a.loss[row] = l;
        else partial += static_cast<double>(l);
      }
      if (g != nullptr) fill_row(g, K, static_cast<scalar_t>(st == kRowIgnored ? 0.0f : NAN), tid, T);
      continue;
    }

    const scalar_t* z = a.logits + row * a.row_stride;
    const int shift = slot_shift(z);
    const int64_t ns = slot_count<scalar_t>(K, shift), nc = ns < cap ? ns : cap;
    const acc_t z_y = static_cast<acc_t>(z[y]);
    const int64_t jy = (y + shift) / V;  // the label's slot, and its place there
    const int ty = int(y + shift - jy * V);
    // f(t, e, z) over slot j: only the first and the last slot can be partial.
    auto visit = [&](const Slot<scalar_t>& b, int64_t j, auto&& f) {
      if (j > 0 && j < ns - 1) for_each_in_full_slot(b, j * V - shift, f);
      else for_each_in_slot(b, j * V - shift, K, f);
    };

    // Pass 1: the cached slots into shared memory (batches of loads in flight)
    // and this thread's max; then its sum of exp from shared memory.
    acc_t m = -INFINITY;
    for (int64_t j0 = tid; j0 < nc; j0 += kLoadBatch * T) {
      Slot<scalar_t> buf[kLoadBatch];
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) {
        const int64_t j = j0 + u * T;
        if (j < nc) load_slot(z, j * V - shift, K, buf[u]);
      }
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) {
        const int64_t j = j0 + u * T;
        if (j < nc) {
          cache[j] = buf[u];
          visit(buf[u], j, [&](int, int64_t, acc_t v) { m = max_skipping_nan(m, v); });
        }
      }
    }
    SoftmaxStats<acc_t> s;
    s.max = m;
    {
      const acc_t m_shift = m == -INFINITY ? acc_t(0) : m;  // hoisted: see add_with_shift
      for (int64_t j = tid; j < nc; j += T)
        visit(copy_slot(cache + j), j, [&](int, int64_t, acc_t v) { s.template add_with_shift<kShifted>(v, m_shift); });
    }
    {  // the streamed tail, online
      SoftmaxStats<acc_t> tail;
      for (int64_t j = nc + tid; j < ns; j += T) {
        Slot<scalar_t> b;
        load_slot(z, j * V - shift, K, b);
        visit(b, j, [&](int, int64_t, acc_t v) { tail.add(v); });
      }
      s.merge(tail);
    }
    s = block_allreduce(s, reinterpret_cast<SoftmaxStats<acc_t>*>(scratch));

    // Pass 2: the normaliser sums, only for the losses that need them.  The
    // label is found by slot (jy, ty), not by a 64-bit compare per element.
    NormalizerSums<acc_t> n;
    if (second_pass) {
      const acc_t mx = s.max, log_sum = s.log_sum();
      const LossParams P2 = sums_params<kPow>(P);
      // Constant rce / nrce: its sums from e = exp(z - max), split at
      // live_threshold(S) (no log p, no clamp per class), as the CPU kernel.
      // (Not with nfl: its focal sums need log p and p per class anyway.)
      constexpr bool kSplitE = (kPassive == apl::kRCE || kPassive == apl::kNRCE) &&
                               (kActive == apl::kNCE || kActive == apl::kCE);
      const acc_t live_e_min = apl::live_threshold(s.sumexp), inv_sumexp = acc_t(1) / s.sumexp;
      acc_t live_e = 0, dead_e = 0, n_dead = 0;
      auto add_slot = [&](const Slot<scalar_t>& b, int64_t j) {
        const int t_y = j == jy ? ty : -1;  // the label's place in this slot
        if constexpr (kSplitE) {
          visit(b, j, [&](int t, int64_t, acc_t v) {
            const acc_t e = apl::apl_exp(v - mx);
            const bool other = t != t_y, live = e >= live_e_min;
            live_e += other && live ? e : acc_t(0);
            dead_e += other && !live ? e : acc_t(0);
            n_dead += other && !live ? acc_t(1) : acc_t(0);
          });
        } else {
          const int t_before = j < jy ? V : (j == jy ? ty : 0);  // places before the label
          visit(b, j, [&](int t, int64_t, acc_t v) { n.add_flagged(v, t == t_y, t < t_before, mx, log_sum, P2); });
        }
      };
      for (int64_t j = tid; j < nc; j += T) add_slot(copy_slot(cache + j), j);
      for (int64_t j = nc + tid; j < ns; j += T) {
        Slot<scalar_t> b;
        load_slot(z, j * V - shift, K, b);
        add_slot(b, j);
      }
      if constexpr (kSplitE) n.add_other_unnormalised(live_e, dead_e, n_dead, inv_sumexp);
      n = block_allreduce(n, reinterpret_cast<NormalizerSums<acc_t>*>(scratch));
    }
    const apl::RowResult<acc_t> r = apl::finish_row(s, n, z_y, K, P, weight);
    const GradCoefs<acc_t> c = grad_coefs<kPow, acc_t, kActive, kPassive>(r.grad);
    if (tid == 0) {
      if (a.reduction == apl::kReduceNone) a.loss[row] = r.loss;
      else partial += static_cast<double>(r.loss);
    }

    // Pass 3: the gradient, one write; the label's entry is computed once and
    // stored over its slot's by the thread that wrote the slot.
    if (g != nullptr) {
      const bool vec = slot_shift(g) == shift;
      const scalar_t g_y = static_cast<scalar_t>(apl::grad_element(z_y, true, c, P));
      for (int64_t j = tid; j < ns; j += T) {
        Slot<scalar_t> in, o;
        if (j < nc) in = copy_slot(cache + j);
        else load_slot(z, j * V - shift, K, in);
        visit(in, j, [&](int t, int64_t, acc_t v) {
          o.v[t] = static_cast<scalar_t>(grad_not_label<kActive, kPassive>(v, c, P));
        });
        store_slot(g, j * V - shift, K, o, vec);
        if (j == jy) g[y] = g_y;
      }
    }
  }
  reduce_loss(a, partial, reinterpret_cast<double*>(scratch), kept);
}

// Threads per block for a row of `slots` 16-byte slots.
int block_threads(int64_t slots) {
  return slots >= 2048 ? 512 : (slots >= 512 ? 256 : 128);
}

// APL_CUDA_SMEM_PER_BLOCK (bytes; a tuning knob, 0 = stream everything; -1 when
// unset), read once.
int64_t smem_env() {
  static const int64_t value = [] {
    const char* env = std::getenv("APL_CUDA_SMEM_PER_BLOCK");
    const long long v = env ? std::atoll(env) : -1;
    return int64_t(v >= 0 ? v : -1);
  }();
  return value;
}

// What plan_large_k needs of a device and kernel variant, queried once per pair;
// guarded by one mutex, since the op may run on several host threads at once.
struct KernelOnDevice {
  int64_t smem_budget = 0;  // dynamic shared memory allowed per block
  int64_t raised = 0;       // cudaFuncAttributeMaxDynamicSharedMemorySize set so far
  int64_t sms = 0;
  std::map<std::pair<int, int64_t>, int> blocks_per_sm;  // (threads, dynamic smem) -> occupancy
};

std::mutex& plan_mutex() {
  static std::mutex m;
  return m;
}

// Under plan_mutex().
KernelOnDevice& kernel_on_device(int device, const void* kernel, int64_t static_smem) {
  static std::map<std::pair<int, const void*>, KernelOnDevice> known;
  auto it = known.find({device, kernel});
  if (it != known.end()) return it->second;
  KernelOnDevice k;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  // The opt-in maximum less the kernel's static shared memory (its reduction scratch).
  const int64_t hw = int64_t(prop->sharedMemPerBlockOptin) - static_smem;
  k.smem_budget = smem_env() >= 0 ? std::min<int64_t>(hw, smem_env()) : hw;
  k.sms = prop->multiProcessorCount;
  return known.emplace(std::make_pair(device, kernel), std::move(k)).first->second;
}

}  // namespace

// The kernel variant a loss runs: the hot pairs have their own (constant
// terms), the others the general one; fp64 keeps only the general one (build time).
template <typename scalar_t>
auto large_k_variant(const LossParams& P) {
  using apl::kCE;
  using apl::kMAE;
  using apl::kNCE;
  using apl::kNFL;
  using apl::kRCE;
  if constexpr (sizeof(scalar_t) == 8) {
    return large_k_kernel<scalar_t, true>;
  } else {
    const int a = P.active, p = P.passive;
    if (a == kCE && p == apl::kPassiveNone) return large_k_kernel<scalar_t, false, kCE, apl::kPassiveNone>;
    if (a == kNCE && p == kRCE) return large_k_kernel<scalar_t, false, kNCE, kRCE>;
    if (a == kNCE && p == kMAE) return large_k_kernel<scalar_t, false, kNCE, kMAE>;
    if (a == kNFL && p == kRCE) return large_k_kernel<scalar_t, true, kNFL, kRCE>;
    if (a == kNFL && p == kMAE) return large_k_kernel<scalar_t, true, kNFL, kMAE>;
    return has_pow_terms(P) ? large_k_kernel<scalar_t, true> : large_k_kernel<scalar_t, false>;
  }
}

template <typename scalar_t>
LaunchPlan plan_large_k(const Args<scalar_t>& a) {
  constexpr int V = Slot<scalar_t>::V;
  const int64_t max_slots = (a.K + 2 * V - 2) / V;
  const auto kernel = large_k_variant<scalar_t>(a.P);
  LaunchPlan p;
  p.threads = block_threads(max_slots);
  // a.device is current (the op's CUDAGuard), so cudaFuncSetAttribute applies to it.
  const std::lock_guard<std::mutex> lock(plan_mutex());
  // Static shared memory of large_k_kernel: the reduction scratch, reduce_loss's flag, alignment.
  constexpr int64_t kStaticSmem = 32 * int64_t(sizeof(NormalizerSums<at::opmath_type<scalar_t>>)) + 256;
  KernelOnDevice& k = kernel_on_device(a.device, reinterpret_cast<const void*>(kernel), kStaticSmem);
  p.cap = std::min<int64_t>(max_slots, k.smem_budget / 16);
  p.smem = size_t(p.cap) * 16;
  if (p.smem > 48 * 1024 && k.raised < int64_t(p.smem)) {  // raised to the largest size asked for so far
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(p.smem)));
    k.raised = int64_t(p.smem);
  }
  auto occupancy = k.blocks_per_sm.find({p.threads, int64_t(p.smem)});
  if (occupancy == k.blocks_per_sm.end()) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, p.threads, p.smem));
    occupancy = k.blocks_per_sm.emplace(std::make_pair(p.threads, int64_t(p.smem)), per_sm).first;
  }
  const int64_t resident = int64_t(std::max(occupancy->second, 1)) * k.sms;
  p.grid = std::max<int64_t>(1, std::min(a.N, resident));  // persistent: each block loops over rows
  return p;
}

template <typename scalar_t>
void launch_large_k(const Args<scalar_t>& a, const LaunchPlan& p, cudaStream_t stream) {
  large_k_variant<scalar_t>(a.P)<<<unsigned(p.grid), p.threads, p.smem, stream>>>(a, p.cap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define APL_INSTANTIATE(T)                              \
  template LaunchPlan plan_large_k<T>(const Args<T>&); \
  template void launch_large_k<T>(const Args<T>&, const LaunchPlan&, cudaStream_t);
APL_INSTANTIATE(float)
APL_INSTANTIATE(double)
APL_INSTANTIATE(c10::Half)
APL_INSTANTIATE(c10::BFloat16)
#undef APL_INSTANTIATE

}  // namespace apl_cuda
