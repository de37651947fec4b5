// Large K: one block per row (blocks loop over rows).  The first `cap` slots of
// the row stay in dynamic shared memory (up to the opt-in limit, 227 KB on
// H100/H200), so a row that fits is read from HBM once and its gradient written
// once.  Slots beyond `cap` (rows longer than shared memory) are streamed from
// global memory again in each pass, where L2 usually still holds them.
//
// Thread t owns slots t, t + T, t + 2T, ... in every pass, so each thread only
// reads back what it wrote to shared memory itself: the passes need barriers
// only inside the block reductions.  So large_k_fixed refills a thread's slots
// with the block's next row (prefetched into L2 during this row's on-chip passes)
// while the same thread writes this row's gradient from them: HBM reads and
// writes overlap even with one block per SM.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "cuda/apl_cuda_common.cuh"

namespace apl_cuda {
namespace {

constexpr int kLargeBlockMax = 512;
constexpr int kLoadBatch = 8;  // 16-byte loads in flight per thread while large_k_kernel fills shared memory

// Called when a row's loads are issued: the block's next row into L2 while this
// one's on-chip passes (shared memory, the L2 tail) run.  With one block a SM,
// that SM's share of HBM would otherwise idle through them (bench/roofline.py:
// predicted_pct_copy_serial_passes); the next row's pass 1 then reads L2.
template <typename scalar_t>
__device__ __forceinline__ void prefetch_next_row(const Args<scalar_t>& a, int64_t row, int64_t tid, int64_t T) {
  const int64_t next = row + gridDim.x;
  if (a.prefetch_next_row && next < a.N)
    prefetch_l2(a.logits + next * a.row_stride, a.K * int64_t(sizeof(scalar_t)), tid, T);
}

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

    const scalar_t* const z = a.logits + row * a.row_stride;
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
    prefetch_next_row(a, row, tid, T);
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

// ---------------------------------------------------------------- constant-term variants
// The kernel of the losses of csrc/apl_loss_math.h whose per-element code has one of a few
// shapes, with every choice made at compile time: the loop bodies are straight-line, and
// what the row needs once (the label's terms, the partial edge slots) is taken out of them.
//   * active shape:  kShapeLabel (ce, fl, gce, taylor: terms of p_y alone), kShapeNCE (+ the
//     sum of log p), kShapeNFL (focal sums; gamma = 1/2 and the official gradient only),
//     kShapeNGCE (sums of clamp(p)^q);
//   * passive shape: kShapeLabel (none, mae, nmae, agce, aul, ael), kShapeRCE (rce, nrce: the
//     sums of the clamped p, k != y), kShapeAMSE (sum p^2, k != y), kShapeNNCE (sums of the
//     live A + log p, k != y).
// The terms' own parameters and coefficients stay run-time (finish_row, once per row).
// Every exp of the row is ShiftedExp2 at the row's max: e_k = 2^(z_k log2 e - c) = exp(z_k -
// max) / unscale, one FFMA and one MUFU; p_k = e_k kp with kp = unscale / sumexp folded into
// the coefficients.  The sums over k != y add every class and take the label's term out once
// per row, after the block reduction (the label's e_k is recomputed from the same bits).
// The first and last slots of a row may be partial: they run the masked element loop, apart
// from the loops over full slots.
enum Shape : int { kShapeLabel = 0, kShapeNCE = 1, kShapeNFL = 2, kShapeNGCE = 3, kShapeRCE = 4, kShapeAMSE = 5,
                   kShapeNNCE = 6 };

// The shapes of a loss, or false when the general kernel must run it.
inline bool fixed_shapes(const LossParams& P, int& active, int& passive) {
  switch (P.active) {
    case apl::kCE: case apl::kFL: case apl::kGCE: case apl::kTaylor: active = kShapeLabel; break;
    case apl::kNCE: active = kShapeNCE; break;
    case apl::kNFL:
      if (P.gamma != 0.5 || P.grad_mode != apl::kOfficial) return false;
      active = kShapeNFL;
      break;
    case apl::kNGCE: active = kShapeNGCE; break;
    default: return false;  // none (a passive term alone), ece (argmax ties)
  }
  switch (P.passive) {
    case apl::kPassiveNone: case apl::kMAE: case apl::kNMAE: case apl::kAGCE: case apl::kAUL: case apl::kAEL:
      passive = kShapeLabel;
      break;
    case apl::kRCE: case apl::kNRCE: passive = kShapeRCE; break;
    case apl::kAMSE: passive = kShapeAMSE; break;
    case apl::kNNCE: passive = kShapeNNCE; break;
    default: return false;  // nnfl
  }
  return true;
}

// (1 - p)^(1/2), the focal weight of gamma = 1/2.  GPU: 1 - p is exact for p >= 1/2 (Sterbenz)
// and as accurate as p is, one MUFU.SQRT; host: from expm1 as focal_weight.
__device__ __forceinline__ float focal_weight_half(float p, float log_p) {
#ifdef APL_CUDA_FAST_MATH
  (void)log_p;
  return apl::apl_sqrt_ftz(1.0f - p);
#else
  return sqrtf(apl::apl_one_minus_exp(log_p, p));
#endif
}

// The running max of a thread's full slots.  GPU, bf16 / fp16: two values per instruction on
// the packed slot (HMNMX2 skips NaN as fmaxf does; a max of 16-bit values is exact in them),
// so pass 1 neither converts nor compares element by element.
template <typename scalar_t>
struct SlotMax {
  float m = -INFINITY;
  __device__ __forceinline__ void add(const Slot<scalar_t>& b) {
#pragma unroll
    for (int t = 0; t < Slot<scalar_t>::V; ++t) m = fmaxf(m, static_cast<float>(b.v[t]));
  }
  __device__ __forceinline__ float value() const { return m; }
};
#if defined(__CUDA_ARCH__)
template <>
struct SlotMax<c10::BFloat16> {
  __nv_bfloat162 m2 = __halves2bfloat162(__ushort_as_bfloat16(0xff80), __ushort_as_bfloat16(0xff80));  // -inf
  __device__ __forceinline__ void add(const Slot<c10::BFloat16>& b) {
    const __nv_bfloat162* w = reinterpret_cast<const __nv_bfloat162*>(&b);
#pragma unroll
    for (int i = 0; i < 4; ++i) m2 = __hmax2(m2, w[i]);
  }
  __device__ __forceinline__ float value() const {
    return fmaxf(__bfloat162float(__low2bfloat16(m2)), __bfloat162float(__high2bfloat16(m2)));
  }
};
template <>
struct SlotMax<c10::Half> {
  __half2 m2 = __halves2half2(__ushort_as_half(0xfc00), __ushort_as_half(0xfc00));  // -inf
  __device__ __forceinline__ void add(const Slot<c10::Half>& b) {
    const __half2* w = reinterpret_cast<const __half2*>(&b);
#pragma unroll
    for (int i = 0; i < 4; ++i) m2 = __hmax2(m2, w[i]);
  }
  __device__ __forceinline__ float value() const {
    return fmaxf(__half2float(__low2half(m2)), __half2float(__high2half(m2)));
  }
};
#endif

// The pass-2 sums of a shape (fields unused by a shape stay 0).
struct FixedSums {
  float a0 = 0, a1 = 0;  // NFL: sum w l, sum w;  NGCE: sum clamp(p)^q, sum m p^q;  AMSE: sum e^2;  NNCE: sum live A + l, #live
  float a2 = 0, a3 = 0;  // RCE: sum of the dead e, #dead
  __device__ __forceinline__ void merge(const FixedSums& o) {
    a0 += o.a0;
    a1 += o.a1;
    a2 += o.a2;
    a3 += o.a3;
  }
};
__device__ __forceinline__ FixedSums shfl_xor(const FixedSums& s, int o) { return shfl_xor_words(s, o); }
__device__ __forceinline__ void combine(FixedSums& a, const FixedSums& b) { a.merge(b); }
// Pass 1's block reductions: the row's max, then its sums of exp (and of their arguments).
struct RowMax {
  float v;
};
__device__ __forceinline__ RowMax shfl_xor(const RowMax& s, int o) { return {__shfl_xor_sync(0xffffffffu, s.v, o)}; }
__device__ __forceinline__ void combine(RowMax& a, const RowMax& b) { a.v = fmaxf(a.v, b.v); }
struct ExpSums {
  float sum = 0, sum_arg = 0;
};
__device__ __forceinline__ ExpSums shfl_xor(const ExpSums& s, int o) { return shfl_xor_words(s, o); }
__device__ __forceinline__ void combine(ExpSums& a, const ExpSums& b) {
  a.sum += b.sum;
  a.sum_arg += b.sum_arg;
}

// Block-wide, every thread gets the same value, for blocks of 4 to 32 warps (a power of two: the
// large-K blocks).  Each warp reads all the warps' partials and merges them by a butterfly over
// groups of nwarps lanes: no serial loop over the warps, in the same order in every warp
// (deterministic, as block_allreduce).
template <typename R>
__device__ __forceinline__ R block_allreduce_tree(R v, R* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();  // the previous call's readers are done with scratch
  group_allreduce(v, 32);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  R r = scratch[lane & (nwarps - 1)];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    if (o < nwarps) combine(r, shfl_xor(r, o));
  return r;
}

// What the element code of a row reads: the exp at the row's max and the row's constants.
template <int kActive, int kPassive>
struct FixedRow {
  apl::ShiftedExp2 ex{0.0f};
  float kp = 0;        // p = e kp
  float log_k = 0;     // log p = ex.log_p(t, log_k)
  float live_e = 0;    // unclamped(p) <=> e >= live_e  (rce, ngce)
  float neg_e = 0;     // above_min_prob(p) <=> e >= neg_e  (nnce)
  float neg_k = 0;     // A + log p = ex.log_p(t, neg_k)  (nnce)
  // ngce: p^q = 2^u, u = q log2 p = q log2_of(t) + q_log2_kp; unclamped(p) <=> u >= u_min
  // (p <= 1 holds but for rounding); clamp(p)^q = 2^min(max(u, u_min), 0).
  float q = 0, q_log2_kp = 0, u_min = 0;
  // the gradient: g = c0 + e coef (+ the shape's terms)
  float c0 = 0, c_target = 0, coef_live = 0, coef_dead = 0, c_neg = 0, c_sq = 0, c_focal = 0, c_pow = 0;

  __device__ __forceinline__ void add_sums(float z, FixedSums& a) const {
    const float t = ex.arg(z), e = ex.exp_of(t);
    if constexpr (kActive == kShapeNFL) {
      const float p = e * kp, l = ex.log_p(t, log_k), w = focal_weight_half(p, l);
      a.a0 = fmaf(w, l, a.a0);
      a.a1 += w;
    }
    if constexpr (kActive == kShapeNGCE) {
      const float u = fmaf(q, ex.log2_of(t), q_log2_kp);
      const float pq = apl::ShiftedExp2::exp2(fminf(fmaxf(u, u_min), 0.0f));
      a.a0 += pq;
      a.a1 = fmaf(u >= u_min ? 1.0f : 0.0f, pq, a.a1);
    }
    if constexpr (kPassive == kShapeRCE) {  // 1 or 0 (FSET), then e times it: no select
      const float dead = e >= live_e ? 0.0f : 1.0f;
      a.a2 = fmaf(e, dead, a.a2);
      a.a3 += dead;
    }
    if constexpr (kPassive == kShapeAMSE) a.a0 = fmaf(e, e, a.a0);
    if constexpr (kPassive == kShapeNNCE) {
      const bool live = e >= neg_e;
      a.a0 += live ? ex.log_p(t, neg_k) : 0.0f;
      a.a1 += live ? 1.0f : 0.0f;
    }
  }

  // d loss / d z of a class that is not the label, or of the label (kLabel: its c_target, and
  // its p coefficient -g_sum, which no clamp zeroes: grad_element_from).
  template <bool kLabel = false>
  __device__ __forceinline__ float grad(float z) const {
    const float t = ex.arg(z), e = ex.exp_of(t);
    float c = kLabel ? c0 + c_target : c0, coef = kLabel ? coef_dead : coef_live;
    if constexpr (kPassive == kShapeRCE && !kLabel) coef = e >= live_e ? coef_live : coef_dead;
    if constexpr (kPassive == kShapeNNCE) c = e >= neg_e ? c + c_neg : c;
    if constexpr (kPassive == kShapeAMSE) coef = fmaf(c_sq, e, coef);
    if constexpr (kActive == kShapeNFL) c = fmaf(c_focal, focal_weight_half(e * kp, ex.log_p(t, log_k)), c);
    if constexpr (kActive == kShapeNGCE) {
      const float u = fmaf(q, ex.log2_of(t), q_log2_kp);
      c = fmaf(c_pow * (u >= u_min ? 1.0f : 0.0f), apl::ShiftedExp2::exp2(u), c);
    }
    return fmaf(e, coef, c);
  }
};

// f(j) for the full slots j = first, first + T, ... below `end` of one thread: the partial
// edge slots (0 and ns - 1) are left to edge_slot_of().
template <typename Full>
__device__ __forceinline__ void full_slots(int64_t first, int64_t end, int64_t T, int64_t ns, Full&& full) {
  int64_t j = first == 0 ? first + T : first;
  const int64_t full_end = end < ns - 1 ? end : ns - 1;
  for (; j < full_end; j += T) full(j);
}

// The streamed tail's full slots (past the shared-memory cache, read from L2 or HBM) as
// full_slots visits them, up to kTailBatch loads in flight before their uses: one by one, each
// iteration waited for its load (the H200's 2026-11-30 run put most of large_k_fixed's time
// in such waits; `#pragma unroll` alone keeps each load behind its bound check).  use(j, slot).
constexpr int kTailBatch = 4;
template <typename Load, typename Use>
__device__ __forceinline__ void streamed_slots(int64_t first, int64_t end, int64_t T, int64_t ns, Load&& load,
                                               Use&& use) {
  int64_t j = first == 0 ? first + T : first;
  const int64_t full_end = end < ns - 1 ? end : ns - 1;
  for (; j < full_end; j += kTailBatch * T) {  // the last batch predicated: one wait for 1..kTailBatch slots
    decltype(load(j)) buf[kTailBatch];
#pragma unroll
    for (int u = 0; u < kTailBatch; ++u)
      if (j + u * T < full_end) buf[u] = load(j + u * T);
#pragma unroll
    for (int u = 0; u < kTailBatch; ++u)
      if (j + u * T < full_end) use(j + u * T, buf[u]);
  }
}

// This thread's streamed-tail slots of a row, as streamed_slots visits them, held in registers
// from pass 1 to pass 3 when every thread has at most kTailBatch of them (bf16 / fp16 rows up to
// about 131k classes at 512 threads): one wait a row for the tail instead of one a pass.  Longer
// tails are streamed again in each pass.
template <typename S>
struct TailSlots {
  S b[kTailBatch];
  bool held = false;  // uniform over the block: ns and nc are the row's
  // Pass 1: load (and keep, when they fit) the slots of [first, end), then use(j, slot) each.
  template <typename Load, typename Use>
  __device__ __forceinline__ void load(int64_t first, int64_t end, int64_t T, int64_t ns, int64_t nc, Load&& load,
                                       Use&& use) {
    held = ns - nc <= kTailBatch * T;
    if (!held) return streamed_slots(first, end, T, ns, load, use);
    each(first, end, T, ns, [&](int u, int64_t j) { b[u] = load(j); });
    each(first, end, T, ns, [&](int u, int64_t j) { use(j, b[u]); });
  }
  // A later pass: the same slots, from registers when held.
  template <typename Load, typename Use>
  __device__ __forceinline__ void visit(int64_t first, int64_t end, int64_t T, int64_t ns, Load&& load,
                                        Use&& use) const {
    if (!held) return streamed_slots(first, end, T, ns, load, use);
    each(first, end, T, ns, [&](int u, int64_t j) { use(j, b[u]); });
  }
  // f(u, j) over this thread's full tail slots j, as streamed_slots' single batch takes them.
  template <typename F>
  __device__ __forceinline__ static void each(int64_t first, int64_t end, int64_t T, int64_t ns, F&& f) {
    const int64_t j = first == 0 ? first + T : first, full_end = end < ns - 1 ? end : ns - 1;
#pragma unroll
    for (int u = 0; u < kTailBatch; ++u)
      if (j + u * T < full_end) f(u, j + u * T);
  }
};

// The edge slot this thread takes in every pass (thread 0 slot 0, the last thread slot ns - 1),
// or -1: one call site per pass, read from global memory element by element each time.
__device__ __forceinline__ int64_t edge_slot_of(int64_t tid, int64_t T, int64_t ns) {
  return tid == 0 ? 0 : (tid == T - 1 && ns > 1 ? ns - 1 : -1);
}

// Interior (in-row, full) slot j of the row at z, whose first element lies `shift`
// elements past a 16-byte boundary: one 16-byte load.
template <typename scalar_t>
__device__ __forceinline__ Slot<scalar_t> interior_slot(const scalar_t* z, int64_t j, int shift) {
  Slot<scalar_t> b;
  *reinterpret_cast<uint4*>(&b) = __ldg(reinterpret_cast<const uint4*>(z + (j * Slot<scalar_t>::V - shift)));
  return b;
}

// The thread that writes slot j's gradient.
__device__ __forceinline__ int64_t slot_owner(int64_t j, int64_t T, int64_t nc, int64_t ns) {
  if (j == 0) return 0;
  if (j == ns - 1) return T - 1;
  return j < nc ? j % T : (j - nc) % T;
}

template <typename scalar_t, int kActive, int kPassive>
__global__ void __launch_bounds__(kLargeBlockMax) large_k_fixed(const Args<scalar_t> a, const int64_t cap) {
  static_assert(sizeof(scalar_t) <= 4, "float accumulation");
  constexpr int V = Slot<scalar_t>::V;
  constexpr bool kShifted = kActive == kShapeNCE;  // sum (z - max): the NCE normaliser only
  constexpr bool kPass2 = kActive == kShapeNFL || kActive == kShapeNGCE || kPassive != kShapeLabel;
  using S = Slot<scalar_t>;
  extern __shared__ uint4 smem_rows[];
  S* cache = reinterpret_cast<S*>(smem_rows);
  __shared__ alignas(16) unsigned char scratch[32 * sizeof(SoftmaxStats<float>) > 32 * sizeof(FixedSums)
                                                   ? 32 * sizeof(SoftmaxStats<float>)
                                                   : 32 * sizeof(FixedSums)];
  static_assert(32 * sizeof(double) <= sizeof(scratch), "reduce_loss's scratch");

  // The terms a shape pins down, as constants: finish_row's choices of them fold away.
  LossParams P = a.P;
  if constexpr (kActive == kShapeNCE) P.active = apl::kNCE;
  if constexpr (kActive == kShapeNFL) {
    P.active = apl::kNFL;
    P.gamma = 0.5;
    P.grad_mode = apl::kOfficial;
  }
  if constexpr (kActive == kShapeNGCE) P.active = apl::kNGCE;
  if constexpr (kPassive == kShapeAMSE) P.passive = apl::kAMSE;
  if constexpr (kPassive == kShapeNNCE) P.passive = apl::kNNCE;
  const int64_t K = a.K, T = blockDim.x, tid = threadIdx.x;
  const unsigned long long kept = kept_rows(a, reinterpret_cast<unsigned long long*>(scratch));
  const float weight = grad_weight(a, kept);
  double partial = 0;

  // Pass 1 of a row from slot `from` on: this thread's cached slots copied into shared memory
  // by cp.async (all in flight at once, no register, no wait per load), its streamed tail and
  // edge slot read for their max meanwhile; then, its copies landed, the max of its cached
  // slots from shared memory (each thread reads only the slots it copied: no barrier).  The
  // return value is this thread's max.
  TailSlots<S> tail;  // the row's streamed tail, from its pass 1 on
  auto pass1 = [&](const scalar_t* zr, int shift_r, int64_t ns_r, int64_t nc_r, int64_t from) {
    const int64_t full_end = nc_r < ns_r - 1 ? nc_r : ns_r - 1;
    int64_t j = tid == 0 ? T : tid;
    if (j < from) j += (from - j + T - 1) / T * T;
    for (; j < full_end; j += T) async_copy16(cache + j, zr + (j * V - shift_r));
    SlotMax<scalar_t> slot_max;
    auto slot_at = [&](int64_t j) { return interior_slot(zr, j, shift_r); };
    tail.load(nc_r + tid, ns_r, T, ns_r, nc_r, slot_at, [&](int64_t, const S& b) { slot_max.add(b); });
    float m = -INFINITY;
    const int64_t edge = edge_slot_of(tid, T, ns_r);
    if (edge >= 0) {
      S b;
      load_slot(zr, edge * V - shift_r, K, b);
      for_each_in_slot(b, edge * V - shift_r, K, [&](int, int64_t, float v) { m = fmaxf(m, v); });
    }
    async_copies_wait();
    full_slots(tid, nc_r, T, ns_r, [&](int64_t j) { slot_max.add(copy_slot(cache + j)); });
    return fmaxf(m, slot_max.value());
  };
  // Whether this row's pass 1 ran inside the previous row's pass 3 (then `carried_max` is its max).
  bool carried = false;
  float carried_max = -INFINITY;

  for (int64_t row = blockIdx.x; row < a.N; row += gridDim.x) {
    const int64_t y = a.target[row];
    const RowStatus st = row_status(a, y);
    scalar_t* g = a.grad != nullptr ? a.grad + row * K : nullptr;
    if (st != kRowOk) {  // uniform over the block (never a carried row: pass 3 fuses only kept rows)
      if (tid == 0) {
        const float l = row_loss_value(st, 0.0f);
        if (a.reduction == apl::kReduceNone) a.loss[row] = l;
        else partial += static_cast<double>(l);
      }
      if (g != nullptr) fill_row(g, K, static_cast<scalar_t>(st == kRowIgnored ? 0.0f : NAN), tid, T);
      continue;
    }

    const scalar_t* z = a.logits + row * a.row_stride;
    const int shift = slot_shift(z);
    const int64_t ns = slot_count<scalar_t>(K, shift), nc = ns < cap ? ns : cap;
    const float z_y = static_cast<float>(z[y]);
    auto full_slot = [&](int64_t j) { return interior_slot(z, j, shift); };
    auto edge_slot = [&](int64_t j) {
      S b;
      load_slot(z, j * V - shift, K, b);
      return b;
    };

    // Pass 1 (unless the previous row's pass 3 ran it): the cached slots into shared memory
    // and the row's max, the streamed tail read for its max; then the sum of exp at the row's
    // max (sums of plain adds: the block reductions merge no rescaled partials).
    const int64_t my_edge = edge_slot_of(tid, T, ns);
    float m = carried_max;
    if (!carried) m = pass1(z, shift, ns, nc, 0);
    carried = false;
    prefetch_next_row(a, row, tid, T);
    SoftmaxStats<float> s;
    s.max = block_allreduce_tree(RowMax{m}, reinterpret_cast<RowMax*>(scratch)).v;
    const apl::ShiftedExp2 ex(s.max == -INFINITY ? 0.0f : s.max);
    {
      ExpSums e;
      auto add = [&](int, int64_t, float v) {
        const float t = ex.arg(v);
        e.sum += ex.exp_of(t);
        if constexpr (kShifted) e.sum_arg += t;
      };
      full_slots(tid, nc, T, ns, [&](int64_t j) { for_each_in_full_slot(copy_slot(cache + j), 0, add); });
      tail.visit(nc + tid, ns, T, ns, full_slot, [&](int64_t, const S& b) { for_each_in_full_slot(b, 0, add); });
      if (my_edge >= 0) for_each_in_slot(edge_slot(my_edge), my_edge * V - shift, K, add);
      e = block_allreduce_tree(e, reinterpret_cast<ExpSums*>(scratch));
      s.sumexp = e.sum * ex.unscale;
      s.sum_shifted = ex.shifted_sum(e.sum_arg, float(K));
      s.count = float(K);
    }

    // The row's constants.
    FixedRow<kActive, kPassive> R;
    const float mx = s.max, log_sum = s.log_sum();
    R.ex = ex;
    R.kp = R.ex.unscale / s.sumexp;
    R.log_k = R.ex.log_offset(log_sum);
    const float e_scale = s.sumexp / R.ex.unscale;  // e = p e_scale
    R.live_e = float(apl::kPMin) * e_scale;
    R.neg_e = float(P.min_prob) * e_scale;
    R.neg_k = R.ex.log_offset(log_sum - float(P.neg_A));
    R.q = float(P.q);
    R.q_log2_kp = R.q * log2f(R.kp);
    R.u_min = R.q * log2f(float(apl::kPMin));

    // Pass 2: the normaliser sums, then the label's share of the sums over k != y out.
    NormalizerSums<float> n;
    if constexpr (kPass2) {
      FixedSums acc;
      auto add = [&](int, int64_t, float v) { R.add_sums(v, acc); };
      full_slots(tid, nc, T, ns, [&](int64_t j) { for_each_in_full_slot(copy_slot(cache + j), 0, add); });
      tail.visit(nc + tid, ns, T, ns, full_slot, [&](int64_t, const S& b) { for_each_in_full_slot(b, 0, add); });
      if (my_edge >= 0) for_each_in_slot(edge_slot(my_edge), my_edge * V - shift, K, add);
      acc = block_allreduce_tree(acc, reinterpret_cast<FixedSums*>(scratch));
      FixedSums label;  // the label's own terms, as the loop added them
      R.add_sums(z_y, label);
      if constexpr (kActive == kShapeNFL) {
        n.focal = -acc.a0;
        n.focal_deriv = -acc.a1;  // official: f' = -w
      }
      if constexpr (kActive == kShapeNGCE) {
        n.clamp_pow = acc.a0;
        n.live_pow = acc.a1;
      }
      if constexpr (kPassive == kShapeRCE) {
        // sum_{k != y} p_k = 1 - p_y: the live sum from the dead one, without cancellation.
        const float u_y = -apl::apl_expm1(apl::log_prob(z_y, mx, log_sum));
        n.dead_other = (acc.a2 - label.a2) * R.kp;
        n.live_other = u_y - n.dead_other;
        n.clamp_other = n.live_other + float(apl::kPMin) * (acc.a3 - label.a3);
      }
      if constexpr (kPassive == kShapeAMSE) n.sq_other = (acc.a0 - label.a0) * (R.kp * R.kp);
      if constexpr (kPassive == kShapeNNCE) {
        n.neg_other = acc.a0 - label.a0;
        n.neg_live = acc.a1 - label.a1;
      }
    }
    const apl::RowResult<float> r = apl::finish_row(s, n, z_y, K, P, weight);
    const GradCoefs<float>& c = r.grad;
    if (tid == 0) {
      if (a.reduction == apl::kReduceNone) a.loss[row] = r.loss;
      else partial += static_cast<double>(r.loss);
    }

    // Pass 3: the gradient, one write; the label's entry is computed once and stored over
    // its slot's by the thread that wrote the slot.
    if (g != nullptr) {
      R.c0 = c.c_const;
      R.c_target = c.c_target;
      R.coef_live = c.p_coef * R.kp;
      R.coef_dead = -c.g_sum * R.kp;
      R.c_neg = c.c_neg;
      R.c_sq = c.c_sq * R.kp * R.kp;
      R.c_focal = -c.c_focal;  // f' = -w
      R.c_pow = c.c_pow;
      auto grad_slot = [&](const S& in) {
        S o;
#pragma unroll
        for (int t = 0; t < V; ++t) o.v[t] = static_cast<scalar_t>(R.grad(static_cast<float>(in.v[t])));
        return o;
      };
      // The block's next row, when kept, is copied in (cp.async) as this one's slots are freed:
      // each thread refills the shared-memory slots it alone reads (the same j in both rows),
      // each after its gradient is stored, so HBM keeps reading while this pass writes, with
      // no barrier and no wait in the loop.
      const int64_t next = row + gridDim.x;
      const bool fuse = next < a.N && row_status(a, a.target[next]) == kRowOk;  // uniform
      const scalar_t* zn = a.logits + (fuse ? next : row) * a.row_stride;
      const int shift_n = slot_shift(zn);
      const int64_t ns_n = slot_count<scalar_t>(K, shift_n), nc_n = ns_n < cap ? ns_n : cap;
      const int64_t full_end = nc < ns - 1 ? nc : ns - 1, full_end_n = nc_n < ns_n - 1 ? nc_n : ns_n - 1;
      const int64_t fused_end = fuse ? (full_end < full_end_n ? full_end : full_end_n) : 0;
      int64_t next_from = 0;  // this thread's first slot of the next row left to pass 1
      auto pass3 = [&](auto vec) {
        auto store_full = [&](int64_t j, const S& o) {
          if constexpr (decltype(vec)::value) store_full_slot(g + (j * V - shift), o);
          else store_slot(g, j * V - shift, K, o, false);
        };
        int64_t j = tid == 0 ? T : tid;
        for (; j < fused_end; j += T) {
          store_full(j, grad_slot(copy_slot(cache + j)));
          async_copy16(cache + j, zn + (j * V - shift_n));  // the slot's old value is used (stored) by now
        }
        next_from = j;
        for (; j < full_end; j += T) store_full(j, grad_slot(copy_slot(cache + j)));
        tail.visit(nc + tid, ns, T, ns, full_slot, [&](int64_t j, const S& b) { store_full(j, grad_slot(b)); });
      };
      if (slot_shift(g) == shift) pass3(std::true_type());
      else pass3(std::false_type());
      if (my_edge >= 0) store_slot(g, my_edge * V - shift, K, grad_slot(edge_slot(my_edge)), false);
      if (slot_owner((y + shift) / V, T, nc, ns) == tid)
        g[y] = static_cast<scalar_t>(R.template grad<true>(z_y));
      if (fuse) {  // the rest of the next row's pass 1: slots past the fused loop, its tail, its edge, its max
        carried_max = pass1(zn, shift_n, ns_n, nc_n, next_from);
        carried = true;
      }
    }
  }
  reduce_loss(a, partial, reinterpret_cast<double*>(scratch), kept);
}

// Threads per block for a row of `slots` 16-byte slots.
int block_threads(int64_t slots) {
  return slots >= 2048 ? 512 : (slots >= 512 ? 256 : 128);
}
constexpr int kTwoPerSmThreads = 256;  // plan_large_k: rows that fit an SM twice

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
  int64_t smem_per_sm = 0;
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
  k.smem_per_sm = int64_t(prop->sharedMemPerMultiprocessor);
  return known.emplace(std::make_pair(device, kernel), std::move(k)).first->second;
}

}  // namespace

// The kernel variant a loss runs: large_k_fixed for the losses of its shapes (constant
// terms), the general one else; fp64 keeps only the general one (build time).
template <int kActive, typename scalar_t>
auto large_k_fixed_for(int passive) {
  switch (passive) {
    case kShapeRCE: return large_k_fixed<scalar_t, kActive, kShapeRCE>;
    case kShapeAMSE: return large_k_fixed<scalar_t, kActive, kShapeAMSE>;
    case kShapeNNCE: return large_k_fixed<scalar_t, kActive, kShapeNNCE>;
    default: return large_k_fixed<scalar_t, kActive, kShapeLabel>;
  }
}

template <typename scalar_t>
auto large_k_variant(const LossParams& P) {
  using Kernel = void (*)(const Args<scalar_t>, const int64_t);
  if constexpr (sizeof(scalar_t) == 8) {
    return Kernel(large_k_kernel<scalar_t, true>);
  } else {
    int act = 0, pas = 0;
    // The pairs instantiated (build time): ce and the active term alone, nce with every
    // passive shape, nfl and ngce with mae-like terms, nfl with rce-like terms.
    if (fixed_shapes(P, act, pas)) {
      if (act == kShapeLabel && pas == kShapeLabel) return Kernel(large_k_fixed<scalar_t, kShapeLabel, kShapeLabel>);
      if (act == kShapeNCE) return Kernel(large_k_fixed_for<kShapeNCE, scalar_t>(pas));
      if (act == kShapeNFL && pas == kShapeLabel) return Kernel(large_k_fixed<scalar_t, kShapeNFL, kShapeLabel>);
      if (act == kShapeNFL && pas == kShapeRCE) return Kernel(large_k_fixed<scalar_t, kShapeNFL, kShapeRCE>);
      if (act == kShapeNGCE && pas == kShapeLabel) return Kernel(large_k_fixed<scalar_t, kShapeNGCE, kShapeLabel>);
    }
    return Kernel(large_k_kernel<scalar_t, true>);  // the other losses: one general variant (build time)
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
  // Two cached rows or more fit in an SM's shared memory ([4096, 32000] bf16: 64 KB):
  // 256-thread blocks, so that 2-3 of them run on each SM (one of 512 threads at 64-110
  // registers) and one block's loads overlap another's reductions and barriers.
  if (p.threads > kTwoPerSmThreads && 2 * (int64_t(p.smem) + kStaticSmem + 1024) <= k.smem_per_sm)
    p.threads = kTwoPerSmThreads;
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
