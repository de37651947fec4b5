// Small K (<= kSmallKMax): a group of G lanes (a power of two <= 32; G = 1 for
// tiny rows) per row, blockDim / G rows per block (256 threads, fewer for short batches).  The row is read once, as 16-byte slots into
// registers (at most NV slots per lane); the softmax statistics, the normaliser
// sums and the gradient are all computed from those registers, with butterfly
// shuffles merging the per-lane SoftmaxStats / NormalizerSums of a row.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdlib>

#include "cuda/apl_cuda_common.cuh"

namespace apl_cuda {
namespace {

constexpr int kSmallBlock = 256;  // threads, the most; fewer for short batches (plan_small_k)
constexpr int64_t kSpreadBytes = 64 * 1024;  // logits above it spread over the SMs

// Slots of a row of K elements whatever its alignment (shift up to V - 1).
template <typename scalar_t>
constexpr int64_t max_slots(int64_t K) {
  constexpr int V = Slot<scalar_t>::V;
  return (K + 2 * V - 2) / V;
}

// Slots per thread of the thread-per-row variant.
constexpr int kTinyNV = 4;

// Slots per lane of the wide variant: enough for K = kSmallKMax in 32 lanes.
template <typename scalar_t>
constexpr int wide_nv() {
  return int((max_slots<scalar_t>(kSmallKMax) + 31) / 32);
}

template <typename scalar_t, int NV, bool kPow>
__global__ void __launch_bounds__(kSmallBlock) small_k_kernel(const Args<scalar_t> a, const int G) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Slot<scalar_t>::V;
  __shared__ double scratch[32];

  const int gl = threadIdx.x & (G - 1);  // lane within the row's group
  const int64_t groups = blockDim.x / G, my_group = threadIdx.x / G;
  const int64_t K = a.K;
  const unsigned long long kept = kept_rows(a, reinterpret_cast<unsigned long long*>(scratch));
  const acc_t weight = grad_weight(a, kept);
  double partial = 0;

  // `first` is uniform over the block, so every lane of a warp runs every shuffle.
  for (int64_t first = blockIdx.x * groups; first < a.N; first += int64_t(gridDim.x) * groups) {
    const int64_t row = first + my_group;
    const bool in = row < a.N;
    const int64_t y = in ? a.target[row] : a.ignore_index;
    const RowStatus st = in ? row_status(a, y) : kRowIgnored;
    const bool ok = st == kRowOk;
    const scalar_t* z = a.logits + (in ? row * a.row_stride : 0);
    const int shift = slot_shift(z);
    const int64_t ns = slot_count<scalar_t>(K, shift);

    Slot<scalar_t> cache[NV];
    acc_t z_y = 0;
    if (ok) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int64_t j = gl + int64_t(i) * G;
        if (j < ns) load_slot(z, j * V - shift, K, cache[i]);
      }
      z_y = static_cast<acc_t>(z[y]);
    }
    // f(i, t, e, z) over this lane's elements of the row.
    auto each = [&](auto&& f) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int64_t j = gl + int64_t(i) * G;
        if (ok && j < ns)
          for_each_in_slot(cache[i], j * V - shift, K, [&](int t, int64_t e, acc_t v) { f(i, t, e, v); });
      }
    };

    // Lane max first, then one exp per element; lanes merge with SoftmaxStats::merge.
    acc_t m = -INFINITY;
    each([&](int, int, int64_t, acc_t v) { m = apl::nan_max(m, v); });
    SoftmaxStats<acc_t> s;
    s.max = m;
    each([&](int, int, int64_t, acc_t v) { s.add_known_max(v); });
    group_allreduce(s, G);

    NormalizerSums<acc_t> n;
    if (a.second_pass) {
      const acc_t mx = s.max, log_sum = s.log_sum();
      const LossParams P2 = sums_params<kPow>(a.P);
      each([&](int, int, int64_t e, acc_t v) { n.add(v, e, y, mx, log_sum, P2); });
      group_allreduce(n, G);
    }
    const apl::RowResult<acc_t> r = apl::finish_row(s, n, z_y, K, a.P, weight);
    const GradCoefs<acc_t> c = grad_coefs<kPow>(r.grad);

    if (in && gl == 0) {
      const acc_t l = row_loss_value(st, r.loss);
      if (a.reduction == apl::kReduceNone) a.loss[row] = l;
      else partial += static_cast<double>(l);
    }
    if (a.grad != nullptr && in) {
      scalar_t* g = a.grad + row * K;
      if (ok) {
        const bool vec = slot_shift(g) == shift;
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          const int64_t j = gl + int64_t(i) * G;
          if (j < ns) {
            Slot<scalar_t> o;
            for_each_in_slot(cache[i], j * V - shift, K, [&](int t, int64_t e, acc_t v) {
              o.v[t] = static_cast<scalar_t>(apl::grad_element(v, e == y, c, a.P));
            });
            store_slot(g, j * V - shift, K, o, vec);
          }
        }
      } else {
        fill_row(g, K, static_cast<scalar_t>(st == kRowIgnored ? 0.0f : NAN), gl, G);
      }
    }
  }
  reduce_loss(a, partial, scratch, kept);
}

}  // namespace

template <typename scalar_t>
LaunchPlan plan_small_k(const Args<scalar_t>& a) {
  LaunchPlan p;
  p.threads = kSmallBlock;
  const int64_t ns = max_slots<scalar_t>(a.K);
  // APL_CUDA_TINY_ROWS=0: A/B knob for the GPU session, read once.
  static const bool tiny_rows = [] {
    const char* env = std::getenv("APL_CUDA_TINY_ROWS");
    return !(env && env[0] == '0');
  }();
  if (sizeof(scalar_t) < 8 && ns <= kTinyNV && tiny_rows) {
    // Tiny rows (K up to 10 fp32, 18 fp16/bf16): a thread per row, so that the
    // per-row work (finish_row) is shared by 32 rows and no shuffles are needed.
    p.nv = kTinyNV;
    p.group = 1;
  } else if (ns <= 32) {
    // The smallest power of two of lanes holding the row in one slot each.
    p.nv = 1;
    p.group = 32;
    while (p.group / 2 >= ns) p.group /= 2;
  } else {
    p.nv = wide_nv<scalar_t>();
    p.group = 32;
  }
  const int64_t sms = at::cuda::getDeviceProperties(a.device)->multiProcessorCount;
  auto blocks_of = [&](int threads) { return (a.N + threads / p.group - 1) / (threads / p.group); };
  // Few rows of many bytes ([256, 1000]: 32 blocks of 256 threads) would leave most
  // SMs idle: the blocks shrink, down to one warp, until they cover 3/4 of the SMs.
  // Small batches keep one block (one launch, no workspace: [128, 10]).
  p.threads = kSmallBlock;
  if (a.N * a.K * int64_t(sizeof(scalar_t)) > kSpreadBytes)
    while (p.threads / 2 >= std::max(32, p.group) && blocks_of(p.threads) < sms * 3 / 4) p.threads /= 2;
  // About two waves of blocks; each loops over its rows (and the last block
  // of a mean/sum adds one partial per block).
  p.grid = std::max<int64_t>(1, std::min(blocks_of(p.threads), sms * 8));
  return p;
}

template <typename scalar_t, bool kPow>
void launch_small_k_variant(const Args<scalar_t>& a, const LaunchPlan& p, cudaStream_t stream) {
  const unsigned grid = unsigned(p.grid);
  if constexpr (sizeof(scalar_t) == 8) {  // fp64: one variant (small_k_supports)
    TORCH_INTERNAL_ASSERT(p.nv == 1, "fp64 rows this long go to the large-K kernel");
    small_k_kernel<scalar_t, 1, kPow><<<grid, p.threads, 0, stream>>>(a, p.group);
  } else {
    if (p.nv == 1)
      small_k_kernel<scalar_t, 1, kPow><<<grid, p.threads, 0, stream>>>(a, p.group);
    else if (p.nv == kTinyNV)
      small_k_kernel<scalar_t, kTinyNV, kPow><<<grid, p.threads, 0, stream>>>(a, p.group);
    else
      small_k_kernel<scalar_t, wide_nv<scalar_t>(), kPow><<<grid, p.threads, 0, stream>>>(a, p.group);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_small_k(const Args<scalar_t>& a, const LaunchPlan& p, cudaStream_t stream) {
  // fp64 keeps only the general variant (build time; a rare type).
  if constexpr (sizeof(scalar_t) == 8) launch_small_k_variant<scalar_t, true>(a, p, stream);
  else if (has_pow_terms(a.P)) launch_small_k_variant<scalar_t, true>(a, p, stream);
  else launch_small_k_variant<scalar_t, false>(a, p, stream);
}

#define APL_INSTANTIATE(T)                              \
  template LaunchPlan plan_small_k<T>(const Args<T>&); \
  template void launch_small_k<T>(const Args<T>&, const LaunchPlan&, cudaStream_t);
APL_INSTANTIATE(float)
APL_INSTANTIATE(double)
APL_INSTANTIATE(c10::Half)
APL_INSTANTIATE(c10::BFloat16)
#undef APL_INSTANTIATE

}  // namespace apl_cuda
