// cuda_emu: runs CUDA C++ kernels on the CPU, for tests (python_tests/cuda_emu/test_emu_kernels.py).
//
// One OS thread per block (blocks run one after another), one fiber per CUDA
// thread.  Fibers switch only at __syncthreads* and at warp collectives, so a
// block's threads interleave exactly at the points where a GPU makes them meet;
// the order in which runnable threads go is the schedule (CUDA_EMU_SCHEDULE).
// __shared__ is thread_local (block-local: the block's fibers share one OS
// thread); dynamic shared memory is a poisoned allocation of the exact size.
// Faults (deadlock, divergent barriers, a shuffle outside its mask, a
// misaligned __ldg, SIGSEGV, a failed CUDA_KERNEL_ASSERT) stop the launch with an exception that names the
// block, the thread and the source line.
//
// Header-only: every translation unit includes it; state shared between them
// lives in inline variables.
#pragma once

#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The host side of the CUDA toolkit's headers: types, cudaDeviceProp, __half, __nv_bfloat16.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#else
#define CUDA_EMU_ASAN 0
#endif

// ---------------------------------------------------------------- qualifiers
#undef __host__
#undef __device__
#undef __global__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#define __host__
#define __device__
#define __global__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Block-local: all fibers of a block run on the block's OS thread.  (The
// source generator moves `alignas` in front and rewrites `extern __shared__`.)
#define __shared__ static thread_local

namespace cuda_emu {

struct Site {
  const char* file;
  int line;
};
#define CUDA_EMU_SITE (::cuda_emu::Site{__FILE__, __LINE__})

inline std::string where(const Site& s) {
  if (s.file == nullptr) return "<unknown>";
  return std::string(s.file) + ":" + std::to_string(s.line);
}

// ---------------------------------------------------------------- the device: an H200
constexpr int kNumSMs = 132;
constexpr size_t kSmemDefault = 48 * 1024;   // per block without opt-in
constexpr size_t kSmemOptin = 227 * 1024;    // sharedMemPerBlockOptin
constexpr size_t kSmemPerSM = 228 * 1024;    // sharedMemPerMultiprocessor
constexpr size_t kSmemReservedPerBlock = 1024;

inline cudaDeviceProp* device_props() {
  static cudaDeviceProp p = [] {
    cudaDeviceProp d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "NVIDIA H200 (cuda_emu)");
    d.totalGlobalMem = size_t(141) << 30;
    d.sharedMemPerBlock = kSmemDefault;
    d.sharedMemPerBlockOptin = kSmemOptin;
    d.sharedMemPerMultiprocessor = kSmemPerSM;
    d.reservedSharedMemPerBlock = kSmemReservedPerBlock;
    d.regsPerBlock = 65536;
    d.regsPerMultiprocessor = 65536;
    d.warpSize = 32;
    d.maxThreadsPerBlock = 1024;
    d.maxThreadsDim[0] = 1024;
    d.maxThreadsDim[1] = 1024;
    d.maxThreadsDim[2] = 64;
    d.maxGridSize[0] = 0x7fffffff;
    d.maxGridSize[1] = 65535;
    d.maxGridSize[2] = 65535;
    d.maxThreadsPerMultiProcessor = 2048;
    d.maxBlocksPerMultiProcessor = 32;
    d.multiProcessorCount = kNumSMs;
    d.major = 9;
    d.minor = 0;
    d.l2CacheSize = 60 << 20;
    d.totalConstMem = 65536;
    d.memoryBusWidth = 6144;
    return d;
  }();
  return &p;
}

// ---------------------------------------------------------------- runtime state
struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::mutex g_mutex;                    // one launch at a time
inline cudaError_t g_last_error = cudaSuccess;
inline std::map<const void*, size_t> g_max_dynamic_smem;  // cudaFuncSetAttribute

enum class Wait : uint8_t { Runnable, Barrier, Warp, Exited };

enum class CollKind : uint8_t { Shfl, ShflUp, ShflDown, ShflXor, Syncwarp, Ballot, Any, All };
inline const char* coll_name(CollKind k) {
  switch (k) {
    case CollKind::Shfl: return "__shfl_sync";
    case CollKind::ShflUp: return "__shfl_up_sync";
    case CollKind::ShflDown: return "__shfl_down_sync";
    case CollKind::ShflXor: return "__shfl_xor_sync";
    case CollKind::Syncwarp: return "__syncwarp";
    case CollKind::Ballot: return "__ballot_sync";
    case CollKind::Any: return "__any_sync";
    case CollKind::All: return "__all_sync";
  }
  return "?";
}

struct Block;

struct Fiber {
  void* sp = nullptr;            // saved stack pointer (assembly switch)
  ucontext_t* uc = nullptr;      // saved context (ucontext switch)
  char* stack = nullptr;
  size_t stack_size = 0;
  Block* block = nullptr;
  int tid = 0;  // linear thread index in the block
  uint3 idx{0, 0, 0};
  Wait wait = Wait::Runnable;
  Site site{nullptr, 0};  // where it waits, or the last barrier/collective it passed
  // warp collective in progress
  CollKind kind = CollKind::Syncwarp;
  unsigned mask = 0;
  int src = 0;
  uint64_t value = 0;
  uint64_t result = 0;
  int barrier_pred = 0;
  // cp.async copies issued and not yet waited for (async_copy16).
  struct AsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
    Site site;
  };
  std::vector<AsyncCopy> async_copies;
#if CUDA_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

struct PendingCollective {
  bool active = false;
  CollKind kind;
  unsigned mask = 0;
  unsigned arrived = 0;
  Site site;
};

enum class Order { Forward, Reverse, Random, RoundRobin };

struct Schedule {
  Order order = Order::Forward;
  uint64_t seed = 0;
  std::string text = "forward";
};

inline Schedule schedule_from_env() {
  Schedule s;
  const char* e = std::getenv("CUDA_EMU_SCHEDULE");
  if (e == nullptr || *e == 0) return s;
  std::string v(e);
  s.text = v;
  if (v == "forward") s.order = Order::Forward;
  else if (v == "reverse") s.order = Order::Reverse;
  else if (v == "roundrobin") s.order = Order::RoundRobin;
  else if (v.rfind("random:", 0) == 0 && v.size() > 7) {
    s.order = Order::Random;
    s.seed = std::strtoull(v.c_str() + 7, nullptr, 10);
  } else {
    throw std::runtime_error("cuda_emu: CUDA_EMU_SCHEDULE=" + v +
                                " is not one of forward, reverse, random:SEED, roundrobin");
  }
  return s;
}

inline bool use_ucontext() {
#if defined(__x86_64__)
  const char* e = std::getenv("CUDA_EMU_FIBERS");
  if (e == nullptr || *e == 0 || std::string(e) == "asm") return false;
  if (std::string(e) == "ucontext") return true;
  throw std::runtime_error(std::string("cuda_emu: CUDA_EMU_FIBERS=") + e + " is not asm or ucontext");
#else
  return true;
#endif
}

// ---------------------------------------------------------------- context switch
#if defined(__x86_64__)
// switch_stack(save, load): push the callee-saved registers and the FP control
// words, store rsp in *save, load rsp = load, pop the same from there, return.
__attribute__((naked, noinline)) static void asm_switch(void** /*save*/, void* /*load*/) {
  __asm__ volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "subq $8, %rsp\n\tstmxcsr (%rsp)\n\tfnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\tfldcw 4(%rsp)\n\taddq $8, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
// First entry of a fiber: r12 holds the argument, r13 the function.
__attribute__((naked, noinline)) static void asm_trampoline() {
  __asm__ volatile("movq %r12, %rdi\n\tcallq *%r13\n\tud2\n\t");
}
#endif

// ---------------------------------------------------------------- fiber stacks
#if CUDA_EMU_ASAN
constexpr size_t kStackSize = 512 * 1024;
#else
constexpr size_t kStackSize = 128 * 1024;
#endif
constexpr size_t kGuard = 4096;

inline std::vector<char*>& stack_pool() {
  static std::vector<char*> pool;
  return pool;
}
inline char* take_stack() {
  auto& pool = stack_pool();
  if (!pool.empty()) {
    char* s = pool.back();
    pool.pop_back();
    return s;
  }
  void* p = mmap(nullptr, kStackSize + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: mmap of a fiber stack failed");
  mprotect(p, kGuard, PROT_NONE);  // overflow -> SIGSEGV, reported as such
  return static_cast<char*>(p) + kGuard;
}
inline void give_stack(char* s) { stack_pool().push_back(s); }

// ---------------------------------------------------------------- the block
struct Block {
  uint3 idx;
  dim3 grid, dim;
  int nthreads = 0;
  std::vector<Fiber> fibers;
  std::vector<uint64_t> runnable;  // bitset over tids
  std::vector<unsigned> stuck;     // per warp: lanes at the block barrier or exited
  std::vector<ucontext_t> contexts;  // ucontext fibers only
  int last_run = -1;
  Schedule schedule;
  std::mt19937_64 rng;
  bool ucontext = false;
  void (*thunk)(void*) = nullptr;
  void* thunk_arg = nullptr;
  Site launch_site;
  unsigned char* dyn_smem = nullptr;
  size_t dyn_smem_size = 0;
  // scheduler
  void* main_sp = nullptr;
  ucontext_t main_uc;
  Fiber* current = nullptr;
  int exited = 0;
  int at_barrier = 0;
  std::vector<PendingCollective> pending;  // per warp, 4 slots each
  std::string fault;                        // first fault; the block stops
  sigjmp_buf segv_jmp;
  volatile sig_atomic_t in_fibers = 0;
#if CUDA_EMU_ASAN
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif

  static constexpr int kPendingPerWarp = 4;

  int nwarps() const { return (nthreads + 31) / 32; }
  unsigned existing_lanes(int warp) const {
    const int n = std::min(32, nthreads - warp * 32);
    return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
  }
  void set_runnable(int t) {
    runnable[t >> 6] |= uint64_t(1) << (t & 63);
    fibers[t].wait = Wait::Runnable;
    stuck[t >> 5] &= ~(1u << (t & 31));
  }
  void set_stuck(int t, Wait w) {
    fibers[t].wait = w;
    stuck[t >> 5] |= 1u << (t & 31);
  }
  void clear_runnable(int t) { runnable[t >> 6] &= ~(uint64_t(1) << (t & 63)); }
  bool is_runnable(int t) const { return (runnable[t >> 6] >> (t & 63)) & 1; }

  std::string thread_name(int t) const {
    const uint3 i = fibers[t].idx;
    char b[96];
    snprintf(b, sizeof b, "block (%u,%u,%u) thread (%u,%u,%u)", idx.x, idx.y, idx.z, i.x, i.y, i.z);
    return b;
  }

  int pick() {
    const int nw = int(runnable.size());
    switch (schedule.order) {
      case Order::Forward:
        for (int w = 0; w < nw; ++w)
          if (runnable[w]) return w * 64 + __builtin_ctzll(runnable[w]);
        return -1;
      case Order::Reverse:
        for (int w = nw - 1; w >= 0; --w)
          if (runnable[w]) return w * 64 + 63 - __builtin_clzll(runnable[w]);
        return -1;
      case Order::RoundRobin: {
        for (int k = 1; k <= nthreads; ++k) {
          const int t = (last_run + k) % nthreads;
          if (is_runnable(t)) return t;
        }
        return -1;
      }
      case Order::Random: {
        int count = 0;
        for (int w = 0; w < nw; ++w) count += __builtin_popcountll(runnable[w]);
        if (count == 0) return -1;
        int k = int(rng() % uint64_t(count));
        for (int w = 0; w < nw; ++w) {
          const int c = __builtin_popcountll(runnable[w]);
          if (k < c) {
            uint64_t bits = runnable[w];
            for (int i = 0; i < k; ++i) bits &= bits - 1;
            return w * 64 + __builtin_ctzll(bits);
          }
          k -= c;
        }
        return -1;
      }
    }
    return -1;
  }
};

inline thread_local Block* tl_block = nullptr;

// Test hook of test_emu_faults.py, which plants bugs as `CUDA_EMU_PLANTED(k) ? bug : original`:
// true while CUDA_EMU_PLANT=k (read at each launch; on the host, at each call).
inline int g_plant = 0;
inline int plant_from_env() {
  const char* e = std::getenv("CUDA_EMU_PLANT");
  return e ? std::atoi(e) : 0;
}
inline bool planted(int k) { return (tl_block != nullptr ? g_plant : plant_from_env()) == k; }
#define CUDA_EMU_PLANTED(k) (::cuda_emu::planted(k))

// The block of the running thread (fails clearly outside a kernel).
inline Block& block() {
  if (tl_block == nullptr || tl_block->current == nullptr)
    throw std::logic_error("cuda_emu: a device intrinsic was called outside a kernel");
  return *tl_block;
}

// ---------------------------------------------------------------- switching
inline void switch_to(Block& b, Fiber* from, Fiber* to, bool from_exits) {
  // from == nullptr: the scheduler; to == nullptr: back to the scheduler.
  b.current = to;
#if CUDA_EMU_ASAN
  void** fake_save = from_exits ? nullptr : (from ? &from->fake_stack : nullptr);
  void* scheduler_fake = nullptr;
  if (from == nullptr) fake_save = &scheduler_fake;
  if (to) __sanitizer_start_switch_fiber(fake_save, to->stack, to->stack_size);
  else __sanitizer_start_switch_fiber(fake_save, b.main_stack_bottom, b.main_stack_size);
#else
  (void)from_exits;
#endif
  __asm__ volatile("" ::: "memory");  // shared memory may change while away
  if (b.ucontext) {
    swapcontext(from ? from->uc : &b.main_uc, to ? to->uc : &b.main_uc);
  } else {
#if defined(__x86_64__)
    asm_switch(from ? &from->sp : &b.main_sp, to ? to->sp : b.main_sp);
#endif
  }
  __asm__ volatile("" ::: "memory");
#if CUDA_EMU_ASAN
  if (from) __sanitizer_finish_switch_fiber(from->fake_stack, nullptr, nullptr);
  else __sanitizer_finish_switch_fiber(scheduler_fake, nullptr, nullptr);
#endif
}

// Stop the block: record the fault (the first one wins) and leave the fibers for good.
[[noreturn]] inline void fault(Block& b, const std::string& msg) {
  if (b.fault.empty()) b.fault = msg;
  Fiber* self = b.current;
  switch_to(b, self, nullptr, true);
  __builtin_unreachable();
}

// The running fiber blocks (or has just released others): run the next one.
inline void yield(Block& b) {
  Fiber* self = b.current;
  const int next = b.pick();
  if (next < 0) {  // nobody can run: a deadlock unless everyone exited
    switch_to(b, self, nullptr, self->wait == Wait::Exited);
    return;
  }
  b.last_run = next;
  b.clear_runnable(next);
  Fiber* to = &b.fibers[next];
  if (to == self) return;
  switch_to(b, self, to, self->wait == Wait::Exited);
}

// ---------------------------------------------------------------- descriptions
inline std::string hex(unsigned m) {
  char t[16];
  snprintf(t, sizeof t, "0x%08x", m);
  return t;
}

inline std::string lanes_text(unsigned m) {
  std::string s;
  for (int i = 0; i < 32;) {
    if (!((m >> i) & 1)) { ++i; continue; }
    int j = i;
    while (j + 1 < 32 && ((m >> (j + 1)) & 1)) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(i);
    if (j > i) s += "-" + std::to_string(j);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

inline std::string wait_text(const Block& b, const Fiber& f) {
  switch (f.wait) {
    case Wait::Runnable: return "is runnable";
    case Wait::Exited: return "has exited";
    case Wait::Barrier: return "waits at __syncthreads at " + where(f.site);
    case Wait::Warp: {
      char m[16];
      snprintf(m, sizeof m, "0x%08x", f.mask);
      return std::string("waits at ") + coll_name(f.kind) + "(mask " + m + ") at " + where(f.site);
    }
  }
  (void)b;
  return "?";
}

// Every thread's state, consecutive threads in the same state on one line.
inline std::string state_listing(const Block& b) {
  std::string out;
  int i = 0, lines = 0;
  while (i < b.nthreads) {
    const std::string w = wait_text(b, b.fibers[i]);
    int j = i;
    while (j + 1 < b.nthreads && wait_text(b, b.fibers[j + 1]) == w) ++j;
    if (++lines > 64) return out + "\n    ... (threads " + std::to_string(i) + "-" + std::to_string(b.nthreads - 1) + ")";
    out += j > i ? "\n    threads " + std::to_string(i) + "-" + std::to_string(j) : "\n    thread " + std::to_string(i);
    out += " " + w;
    i = j + 1;
  }
  return out;
}

inline std::string header(const Block& b, const char* kind, int tid) {
  std::string s = std::string("cuda_emu: ") + kind + ": ";
  if (tid >= 0) s += b.thread_name(tid);
  else {
    char t[64];
    snprintf(t, sizeof t, "block (%u,%u,%u)", b.idx.x, b.idx.y, b.idx.z);
    s += t;
  }
  return s;
}

inline std::string launch_text(const Block& b) {
  return "\n  (kernel launched at " + where(b.launch_site) + ", schedule " + b.schedule.text + ")";
}

// ---------------------------------------------------------------- device-side asserts
// emu_build.py rewrites CUDA_KERNEL_ASSERT(cond) to CUDA_EMU_KERNEL_ASSERT(cond): a
// failed assert stops the launch, as on the GPU, with a report that names the
// block, the thread and the line.  CUDA_EMU_KERNEL_ASSERT=0 (read at each launch)
// compiles them out, as on platforms without device asserts.
inline bool g_kernel_asserts = true;
inline bool kernel_asserts_from_env() {
  const char* e = std::getenv("CUDA_EMU_KERNEL_ASSERT");
  return !(e && e[0] == '0');
}
inline void kernel_assert_failed(const char* cond, Site site) {
  if (!g_kernel_asserts) return;
  Block& b = block();
  fault(b, header(b, "device-side assert", b.current->tid) + ": `" + cond + "` failed at " + where(site) +
               launch_text(b));
}
#define CUDA_EMU_KERNEL_ASSERT(cond) \
  do {                               \
    if (!(cond)) ::cuda_emu::kernel_assert_failed(#cond, CUDA_EMU_SITE); \
  } while (0)

// ---------------------------------------------------------------- warp collectives
// A lane that stops anywhere but at a pending collective of its warp that names
// it can never complete that collective: the warp's other lanes wait for ever.
inline void check_not_expected_by_collective(Block& b, Fiber& self, const char* doing, Site at) {
  const int warp = self.tid >> 5, lane = self.tid & 31;
  for (int k = 0; k < Block::kPendingPerWarp; ++k) {
    const PendingCollective& p = b.pending[warp * Block::kPendingPerWarp + k];
    if (!p.active || !((p.mask >> lane) & 1) || ((p.arrived >> lane) & 1)) continue;
    char m[16];
    snprintf(m, sizeof m, "0x%08x", p.mask);
    fault(b, header(b, "divergent warp collective", self.tid) + " " + doing + " " + where(at) + ", but lanes " +
                 lanes_text(p.arrived) + " of its warp wait for it at " + coll_name(p.kind) + "(mask " + m +
                 ") at " + where(p.site) + launch_text(b));
  }
}

inline uint64_t collective(CollKind kind, Site site, unsigned mask, uint64_t value, int src) {
  Block& b = block();
  Fiber& self = *b.current;
  const int warp = self.tid >> 5, lane = self.tid & 31;
  const unsigned exist = b.existing_lanes(warp);
    if (!((mask >> lane) & 1))
    fault(b, header(b, "bad warp collective mask", self.tid) + ": " + coll_name(kind) + " at " + where(site) +
                 " with mask " + hex(mask) + " that does not name the calling lane" + launch_text(b));
  // Lanes of the mask that can no longer come (at the block barrier, or exited).
  if (const unsigned gone = mask & exist & b.stuck[warp]) {
    const int l = __builtin_ctz(gone);
    const Fiber& o = b.fibers[warp * 32 + l];
    fault(b, header(b, "divergent warp collective", self.tid) + ": " + coll_name(kind) + "(mask " + hex(mask) +
                 ") at " + where(site) + " waits for lane " + std::to_string(l) + ", which " + wait_text(b, o) +
                 launch_text(b));
  }
  // Join the pending collective of this kind and mask, or open one.
  PendingCollective* p = nullptr;
  PendingCollective* free_slot = nullptr;
  for (int k = 0; k < Block::kPendingPerWarp; ++k) {
    PendingCollective& c = b.pending[warp * Block::kPendingPerWarp + k];
    if (c.active && c.kind == kind && c.mask == mask && !((c.arrived >> lane) & 1)) { p = &c; break; }
    if (!c.active && free_slot == nullptr) free_slot = &c;
  }
  if (p == nullptr) {
    if (free_slot == nullptr)
      fault(b, header(b, "divergent warp collective", self.tid) + ": more than " +
                   std::to_string(Block::kPendingPerWarp) + " different collectives pending in one warp at " +
                   where(site) + launch_text(b));
    p = free_slot;
    p->active = true;
    p->kind = kind;
    p->mask = mask;
    p->arrived = 0;
    p->site = site;
  }
  p->arrived |= 1u << lane;
  self.kind = kind;
  self.mask = mask;
  self.site = site;
  self.value = value;
  self.src = src;
  self.wait = Wait::Warp;
  if (p->arrived == (mask & exist)) {
    // Complete: every lane of the mask gets its result, then all may run.
    const unsigned need = mask & exist;
    uint64_t ballot = 0;
    for (unsigned m = need; m; m &= m - 1) {
      const int l = __builtin_ctz(m);
      if (b.fibers[warp * 32 + l].value != 0) ballot |= uint64_t(1) << l;
    }
    for (unsigned m = need; m; m &= m - 1) {
      const int l = __builtin_ctz(m);
      Fiber& f = b.fibers[warp * 32 + l];
      switch (kind) {
        case CollKind::Shfl:
        case CollKind::ShflUp:
        case CollKind::ShflDown:
        case CollKind::ShflXor:
          if (!((need >> f.src) & 1)) {
            fault(b, header(b, "shuffle outside its mask", warp * 32 + l) + ": " + coll_name(kind) + "(mask " +
                         hex(mask) + ") at " + where(site) + " reads lane " + std::to_string(f.src) +
                         ", which is not in the mask" + launch_text(b));
          }
          f.result = b.fibers[warp * 32 + f.src].value;
          break;
        case CollKind::Syncwarp: f.result = 0; break;
        case CollKind::Ballot: f.result = ballot; break;
        case CollKind::Any: f.result = ballot != 0; break;
        case CollKind::All: f.result = ballot == uint64_t(need); break;
      }
      b.set_runnable(warp * 32 + l);
    }
    p->active = false;  // the schedule now picks among all runnable threads, this one included
  }
  yield(b);
  self.site = site;
  return self.result;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "cuda_emu: shuffle of a type over 8 bytes");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

inline int segment_base(int lane, int width) { return lane & ~(width - 1); }

inline void check_width(Site site, int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fault(block(), header(block(), "bad shuffle width", block().current->tid) + ": width " + std::to_string(width) +
                       " at " + where(site) + " is not a power of two <= 32" + launch_text(block()));
}

template <typename T>
inline T shfl(Site site, unsigned mask, T v, int src_lane, int width = 32) {
  check_width(site, width);
  const int lane = block().current->tid & 31;
  const int src = segment_base(lane, width) + (src_lane & (width - 1));
  return from_bits<T>(collective(CollKind::Shfl, site, mask, to_bits(v), src));
}
template <typename T>
inline T shfl_up(Site site, unsigned mask, T v, unsigned delta, int width = 32) {
  check_width(site, width);
  const int lane = block().current->tid & 31;
  const int s = lane - int(delta);
  const int src = s < segment_base(lane, width) ? lane : s;
  return from_bits<T>(collective(CollKind::ShflUp, site, mask, to_bits(v), src));
}
template <typename T>
inline T shfl_down(Site site, unsigned mask, T v, unsigned delta, int width = 32) {
  check_width(site, width);
  const int lane = block().current->tid & 31;
  const int s = lane + int(delta);
  const int src = s >= segment_base(lane, width) + width ? lane : s;
  return from_bits<T>(collective(CollKind::ShflDown, site, mask, to_bits(v), src));
}
template <typename T>
inline T shfl_xor(Site site, unsigned mask, T v, int lane_mask, int width = 32) {
  check_width(site, width);
  const int lane = block().current->tid & 31;
  const int s = lane ^ lane_mask;
  const int src = s >= segment_base(lane, width) + width ? lane : s;
  return from_bits<T>(collective(CollKind::ShflXor, site, mask, to_bits(v), src & 31));
}
inline void syncwarp(Site site, unsigned mask = 0xffffffffu) { collective(CollKind::Syncwarp, site, mask, 0, 0); }
inline unsigned ballot(Site site, unsigned mask, int pred) {
  return unsigned(collective(CollKind::Ballot, site, mask, pred != 0, 0));
}
inline int any(Site site, unsigned mask, int pred) { return int(collective(CollKind::Any, site, mask, pred != 0, 0)); }
inline int all(Site site, unsigned mask, int pred) { return int(collective(CollKind::All, site, mask, pred != 0, 0)); }
// Lanes of the warp that have not exited (the emulator does not model divergence).
inline unsigned activemask() {
  Block& b = block();
  const int warp = b.current->tid >> 5;
  unsigned m = 0;
  for (unsigned e = b.existing_lanes(warp); e; e &= e - 1) {
    const int l = __builtin_ctz(e);
    if (b.fibers[warp * 32 + l].wait != Wait::Exited) m |= 1u << l;
  }
  return m;
}

// ---------------------------------------------------------------- block barrier
enum class BarrierOp { Sync, Count, And, Or };

inline int syncthreads(Site site, BarrierOp op = BarrierOp::Sync, int pred = 0) {
  Block& b = block();
  Fiber& self = *b.current;
  check_not_expected_by_collective(b, self, "reached __syncthreads at", site);
  if (b.exited > 0) {
    int gone = 0;
    while (b.fibers[gone].wait != Wait::Exited) ++gone;
    fault(b, header(b, "barrier after exit", self.tid) + ": waits at __syncthreads at " + where(site) + ", but " +
                 b.thread_name(gone) + " and " + std::to_string(b.exited - 1) +
                 " other threads have exited: they never arrive" + launch_text(b));
  }
  b.set_stuck(self.tid, Wait::Barrier);
  self.site = site;
  self.barrier_pred = pred != 0;
  if (++b.at_barrier == b.nthreads) {
    // Everyone is here: all at one call site, or the block is divergent.
    for (int t = 0; t < b.nthreads; ++t) {
      const Site& s = b.fibers[t].site;
      if (s.line != site.line || strcmp(s.file, site.file) != 0)
        fault(b, header(b, "divergent __syncthreads", t) + " waits at __syncthreads at " + where(s) + " while " +
                     b.thread_name(self.tid) + " waits at " + where(site) + ":" + state_listing(b) + launch_text(b));
    }
    int count = 0;
    for (int t = 0; t < b.nthreads; ++t) count += b.fibers[t].barrier_pred;
    for (int t = 0; t < b.nthreads; ++t) {
      b.fibers[t].result = uint64_t(count);
      b.set_runnable(t);
    }
    b.at_barrier = 0;
  }
  yield(b);
  const int count = int(self.result);
  switch (op) {
    case BarrierOp::Sync: return 0;
    case BarrierOp::Count: return count;
    case BarrierOp::And: return count == b.nthreads;
    case BarrierOp::Or: return count > 0;
  }
  return 0;
}

// ---------------------------------------------------------------- memory
template <typename T>
inline void check_aligned(Site site, const T* p, const char* what) {
  constexpr size_t s = sizeof(T);
  constexpr size_t need = (s & (s - 1)) == 0 && s <= 16 ? std::max(s, alignof(T)) : alignof(T);
  if (reinterpret_cast<uintptr_t>(p) % need != 0) {
    Block& b = block();
    char t[160];
    snprintf(t, sizeof t, ": %s of %zu bytes at address %p, which is not %zu-byte aligned, at ", what, s,
             static_cast<const void*>(p), need);
    fault(b, header(b, "misaligned load", b.current->tid) + t + where(site) + launch_text(b));
  }
}
template <typename T>
inline T load_checked(Site site, const T* p, const char* what) {
  check_aligned(site, p, what);
  return *p;
}
template <typename T>
inline void store_checked(Site site, T* p, T v, const char* what) {
  check_aligned(site, p, what);
  *p = v;
}

inline void* dynamic_shared() { return block().dyn_smem; }

// cp.async of 16 bytes, global to dynamic shared memory, the source read now (it is read-only here).
// The hardware may write the destination at any moment up to the thread's wait; the schedules take
// the two ends: reverse writes it at once (a copy issued before a read of its destination is done
// shows), the others at async_wait_all (a read before the wait sees the old bytes; an exit with
// copies not waited for is a fault).
inline void async_copy16(Site site, void* dst, const void* src) {
  Block& b = block();
  check_aligned(site, static_cast<const uint4*>(src), "cp.async source");
  check_aligned(site, static_cast<const uint4*>(dst), "cp.async destination");
  unsigned char* d = static_cast<unsigned char*>(dst);
  if (d < b.dyn_smem || d + 16 > b.dyn_smem + b.dyn_smem_size)
    fault(b, header(b, "cp.async outside dynamic shared memory", b.current->tid) + " at " + where(site) +
                 launch_text(b));
  if (b.schedule.order == Order::Reverse) {
    memcpy(d, src, 16);
    return;
  }
  Fiber::AsyncCopy c{d, {}, site};
  memcpy(c.bytes, src, 16);
  b.current->async_copies.push_back(c);
}
inline void async_wait_all() {
  Fiber& f = *block().current;
  for (const Fiber::AsyncCopy& c : f.async_copies) memcpy(c.dst, c.bytes, 16);
  f.async_copies.clear();
}

// ---------------------------------------------------------------- atomics
template <typename T>
inline T atomic_add(T* p, T v) {
  if constexpr (std::is_floating_point<T>::value) {
    T old = __atomic_load_n(p, __ATOMIC_RELAXED), desired;
    do {
      desired = old + v;
    } while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
  } else {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
  }
}
template <typename T>
inline T atomic_cas(T* p, T expected, T desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
template <typename T, typename F>
inline T atomic_update(T* p, F f) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  T next;
  do {
    next = f(old);
  } while (!__atomic_compare_exchange_n(p, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}

// ---------------------------------------------------------------- launches
inline std::string addr2line(const void* pc) {
  Dl_info info;
  if (pc == nullptr || !dladdr(pc, &info) || info.dli_fname == nullptr) return "";
  const uintptr_t off = reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase);
  char cmd[1200];
  snprintf(cmd, sizeof cmd, "addr2line -e '%s' 0x%lx 2>/dev/null", info.dli_fname, static_cast<unsigned long>(off));
  FILE* f = popen(cmd, "r");
  if (!f) return "";
  char line[1024] = {0};
  const bool got = fgets(line, sizeof line, f) != nullptr;
  pclose(f);
  if (!got) return "";
  std::string s(line);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  if (s.rfind("??", 0) == 0) return std::string(info.dli_fname) + "+" + std::to_string(off);
  return s;
}

struct SegvRecord {
  void* addr = nullptr;
  void* pc = nullptr;
};
inline thread_local SegvRecord tl_segv;
inline struct sigaction g_old_segv, g_old_bus;

inline void segv_handler(int sig, siginfo_t* info, void* ctx) {
  Block* b = tl_block;
  if (b == nullptr || !b->in_fibers) {  // not ours: the previous handler
    struct sigaction& old = sig == SIGBUS ? g_old_bus : g_old_segv;
    sigaction(sig, &old, nullptr);
    raise(sig);
    return;
  }
  tl_segv.addr = info->si_addr;
#if defined(__x86_64__)
  tl_segv.pc = reinterpret_cast<void*>(static_cast<ucontext_t*>(ctx)->uc_mcontext.gregs[REG_RIP]);
#else
  (void)ctx;
#endif
  siglongjmp(b->segv_jmp, 1);
}

inline void fiber_entry(Fiber* f) {
  Block& b = *f->block;
#if CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  b.thunk(b.thunk_arg);
  // The thread exits.
  check_not_expected_by_collective(b, *f, "exited after", f->site);
  if (!f->async_copies.empty())
    fault(b, header(b, "exit with cp.async copies not waited for", f->tid) + ": " +
                 std::to_string(f->async_copies.size()) + " issued, the last at " +
                 where(f->async_copies.back().site) + " (no cp.async wait after them)" + launch_text(b));
  if (b.at_barrier > 0) {
    int waiting = 0;
    while (b.fibers[waiting].wait != Wait::Barrier) ++waiting;
    fault(b, header(b, "exit while others wait at a barrier", f->tid) + " exited" +
                 (f->site.file ? " (after " + where(f->site) + ")" : std::string()) + " while " +
                 std::to_string(b.at_barrier) + " threads, " + b.thread_name(waiting) +
                 " first, wait at __syncthreads at " + where(b.fibers[waiting].site) + launch_text(b));
  }
  b.set_stuck(f->tid, Wait::Exited);
  ++b.exited;
  yield(b);
  __builtin_unreachable();
}

inline void fiber_entry_uc(unsigned hi, unsigned lo) {
  fiber_entry(reinterpret_cast<Fiber*>((uint64_t(hi) << 32) | lo));
}

// Runs one block on the calling (fresh) OS thread; returns the fault text or "".
inline std::string run_block(Block& b) {
  tl_block = &b;
  const int n = b.nthreads;
#if CUDA_EMU_ASAN
  {
    pthread_attr_t attr;
    pthread_getattr_np(pthread_self(), &attr);
    void* lo = nullptr;
    size_t size = 0;
    pthread_attr_getstack(&attr, &lo, &size);
    pthread_attr_destroy(&attr);
    b.main_stack_bottom = lo;
    b.main_stack_size = size;
  }
#endif
  b.fibers.assign(n, Fiber());
  b.runnable.assign((n + 63) / 64, 0);
  b.stuck.assign(size_t(b.nwarps()), 0);
  if (b.ucontext) b.contexts.resize(n);
  b.pending.assign(size_t(b.nwarps()) * Block::kPendingPerWarp, PendingCollective());
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.block = &b;
    f.tid = t;
    f.idx = uint3{unsigned(t % b.dim.x), unsigned((t / b.dim.x) % b.dim.y), unsigned(t / (b.dim.x * b.dim.y))};
    f.stack = take_stack();
    f.stack_size = kStackSize;
    if (b.ucontext) {
      f.uc = &b.contexts[t];
      getcontext(f.uc);
      f.uc->uc_stack.ss_sp = f.stack;
      f.uc->uc_stack.ss_size = kStackSize;
      f.uc->uc_link = nullptr;
      const uint64_t p = reinterpret_cast<uint64_t>(&f);
      makecontext(f.uc, reinterpret_cast<void (*)()>(&fiber_entry_uc), 2, unsigned(p >> 32), unsigned(p));
    } else {
#if defined(__x86_64__)
      uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackSize) & ~uintptr_t(15);
      uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);  // 16-byte aligned
      uint32_t csr[2];
      __asm__ volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
      sp[0] = uint64_t(csr[0]) | (uint64_t(csr[1] & 0xffff) << 32);
      sp[1] = 0;                                                 // r15
      sp[2] = 0;                                                 // r14
      sp[3] = reinterpret_cast<uint64_t>(&fiber_entry);    // r13: the function
      sp[4] = reinterpret_cast<uint64_t>(&f);                    // r12: its argument
      sp[5] = 0;                                                 // rbx
      sp[6] = 0;                                                 // rbp
      sp[7] = reinterpret_cast<uint64_t>(&asm_trampoline);       // return address
      f.sp = sp;
#endif
    }
    b.set_runnable(t);
  }
  // Signals: a SIGSEGV in a fiber comes back here.
  stack_t alt;
  std::vector<char> altmem(1 << 16);
  alt.ss_sp = altmem.data();
  alt.ss_size = altmem.size();
  alt.ss_flags = 0;
  sigaltstack(&alt, nullptr);
  std::string result;
  if (sigsetjmp(b.segv_jmp, 1) == 0) {
    b.in_fibers = 1;
    b.current = nullptr;
    const int first = b.pick();
    b.last_run = first;
    b.clear_runnable(first);
    switch_to(b, nullptr, &b.fibers[first], false);
    b.in_fibers = 0;
    if (!b.fault.empty()) result = b.fault;
    else if (b.exited != n)
      result = header(b, "deadlock", -1) + ": no thread can run; the threads:" + state_listing(b) + launch_text(b);
  } else {
    b.in_fibers = 0;
    const Fiber* f = b.current;
    char t[64];
    snprintf(t, sizeof t, ": invalid access at address %p", tl_segv.addr);
    const std::string line = addr2line(tl_segv.pc);
    result = header(b, "SIGSEGV in a kernel", f ? f->tid : -1) + t + " at " + (line.empty() ? "<unknown>" : line) +
             (f && f->site.file ? " (after " + where(f->site) + ")" : std::string()) + launch_text(b);
  }
  stack_t off;
  off.ss_flags = SS_DISABLE;
  off.ss_sp = nullptr;
  off.ss_size = 0;
  sigaltstack(&off, nullptr);
  for (Fiber& f : b.fibers) give_stack(f.stack);
  tl_block = nullptr;
  return result;
}

#if CUDA_EMU_ASAN
// ASan's report names the OS thread; this names the block and the CUDA thread.
inline void asan_death() {
  const Block* b = tl_block;
  if (b == nullptr || b->current == nullptr) return;
  fprintf(stderr, "cuda_emu: the AddressSanitizer report above is from %s (after %s)%s\n",
          b->thread_name(b->current->tid).c_str(), where(b->current->site).c_str(), launch_text(*b).c_str());
}
#endif

inline void set_error(cudaError_t e) {
  if (g_last_error == cudaSuccess) g_last_error = e;
}

inline size_t max_dynamic_smem(const void* kernel) {
  auto it = g_max_dynamic_smem.find(kernel);
  return it == g_max_dynamic_smem.end() ? kSmemDefault : it->second;
}

// Checks the launch as a GPU would; runs the blocks one after another.
// CUDA_EMU_LAUNCH_LOG=<file>: one line appended per kernel launch (its grid and
// threads per block) and per memset,
// so that a test can count what the op queues.
inline void log_launch(const std::string& line) {
  const char* path = std::getenv("CUDA_EMU_LAUNCH_LOG");
  if (path == nullptr || path[0] == 0) return;
  if (FILE* f = fopen(path, "a")) {
    fprintf(f, "%s\n", line.c_str());
    fclose(f);
  }
}

inline void launch(Site site, const void* kernel, dim3 grid, dim3 dim, size_t smem, void (*thunk)(void*),
                   void* arg) {
  std::lock_guard<std::mutex> lock(g_mutex);
  log_launch("kernel " + where(site) + " grid " + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
             std::to_string(grid.z) + " block " + std::to_string(dim.x * dim.y * dim.z));
  const cudaDeviceProp& p = *device_props();
  const uint64_t threads = uint64_t(dim.x) * dim.y * dim.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || dim.x == 0 || dim.y == 0 || dim.z == 0 ||
      grid.x > unsigned(p.maxGridSize[0]) || grid.y > unsigned(p.maxGridSize[1]) ||
      grid.z > unsigned(p.maxGridSize[2]) || dim.x > unsigned(p.maxThreadsDim[0]) ||
      dim.y > unsigned(p.maxThreadsDim[1]) || dim.z > unsigned(p.maxThreadsDim[2]) ||
      threads > uint64_t(p.maxThreadsPerBlock)) {
    set_error(cudaErrorInvalidConfiguration);
    return;
  }
  if (smem > max_dynamic_smem(kernel)) {
    set_error(cudaErrorInvalidValue);
    return;
  }
  const Schedule sched = schedule_from_env();
  const bool uc = use_ucontext();
  g_plant = plant_from_env();
  g_kernel_asserts = kernel_asserts_from_env();
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  if (sched.order == Order::Reverse) std::reverse(order.begin(), order.end());
  if (sched.order == Order::Random) std::shuffle(order.begin(), order.end(), std::mt19937_64(sched.seed));

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = &segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
#if CUDA_EMU_ASAN
  __sanitizer_set_death_callback(&asan_death);
#endif
  if (!CUDA_EMU_ASAN) {  // under ASan its own handler reports
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  }
  std::string fault_text;
  for (uint64_t bi : order) {
    Block b;
    b.idx = uint3{unsigned(bi % grid.x), unsigned((bi / grid.x) % grid.y), unsigned(bi / (uint64_t(grid.x) * grid.y))};
    b.grid = grid;
    b.dim = dim;
    b.nthreads = int(threads);
    b.schedule = sched;
    b.rng.seed(sched.seed * 0x9E3779B97F4A7C15ull + bi);
    b.ucontext = uc;
    b.thunk = thunk;
    b.thunk_arg = arg;
    b.launch_site = site;
    if (smem > 0) {
      void* q = nullptr;  // the exact size, so that ASan sees a read past its end
      if (posix_memalign(&q, 16, smem) != 0) throw std::bad_alloc();
      b.dyn_smem = static_cast<unsigned char*>(q);
      memset(b.dyn_smem, 0xff, smem);  // poison: NaN in every float type
      b.dyn_smem_size = smem;
    }
    std::thread worker([&] { fault_text = run_block(b); });
    worker.join();
    free(b.dyn_smem);
    if (!fault_text.empty()) break;
  }
  if (!CUDA_EMU_ASAN) {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
  }
  if (!fault_text.empty()) throw Fault(fault_text);
}

// `kernel<<<grid, block, smem, stream>>>(args)` becomes
// `kernel % ::cuda_emu::LaunchConfig(site, grid, block, smem, stream)(args)`.
template <typename... A>
struct BoundLaunch {
  Site site;
  dim3 grid, dim;
  size_t smem;
  std::tuple<A...> args;
};

struct LaunchConfig {
  Site site;
  dim3 grid, dim;
  size_t smem;
  LaunchConfig(Site s, dim3 g, dim3 b, size_t shared = 0, cudaStream_t = nullptr)
      : site(s), grid(g), dim(b), smem(shared) {}
  template <typename... A>
  BoundLaunch<std::decay_t<A>...> operator()(A&&... a) const {
    return {site, grid, dim, smem, std::tuple<std::decay_t<A>...>(std::forward<A>(a)...)};
  }
};

template <typename... P>
struct KernelCall {
  void (*kernel)(P...);
  std::tuple<std::decay_t<P>...> params;
  static void run(void* self) {
    auto* c = static_cast<KernelCall*>(self);
    std::apply(c->kernel, c->params);
  }
};

template <typename... P, typename... A>
void operator%(void (*kernel)(P...), BoundLaunch<A...>&& b) {
  static_assert(sizeof...(P) == sizeof...(A), "cuda_emu: wrong number of kernel arguments");
  KernelCall<P...> call{kernel, std::apply([](auto&... a) { return std::tuple<std::decay_t<P>...>(a...); }, b.args)};
  launch(b.site, reinterpret_cast<const void*>(kernel), b.grid, b.dim, b.smem, &KernelCall<P...>::run, &call);
}

// ---------------------------------------------------------------- index variables
inline const uint3& thread_idx() { return block().current->idx; }
inline const uint3& block_idx() { return block().idx; }
inline const dim3& block_dim() { return block().dim; }
inline const dim3& grid_dim() { return block().grid; }

// ---------------------------------------------------------------- occupancy
inline int occupancy(const void* kernel, int threads, size_t smem) {
  if (threads <= 0 || threads > 1024 || smem > max_dynamic_smem(kernel)) return 0;
  const int warps = (threads + 31) / 32;
  int n = std::min(32, 64 / warps);
  const size_t per_block = smem + kSmemReservedPerBlock;
  n = std::min<int>(n, int(kSmemPerSM / per_block));
  return n;
}

}  // namespace cuda_emu

// ---------------------------------------------------------------- CUDA names
#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())
constexpr int warpSize = 32;

#define __syncthreads() ::cuda_emu::syncthreads(CUDA_EMU_SITE)
#define __syncthreads_count(p) ::cuda_emu::syncthreads(CUDA_EMU_SITE, ::cuda_emu::BarrierOp::Count, (p))
#define __syncthreads_and(p) ::cuda_emu::syncthreads(CUDA_EMU_SITE, ::cuda_emu::BarrierOp::And, (p))
#define __syncthreads_or(p) ::cuda_emu::syncthreads(CUDA_EMU_SITE, ::cuda_emu::BarrierOp::Or, (p))
#define __syncwarp(...) ::cuda_emu::syncwarp(CUDA_EMU_SITE, ##__VA_ARGS__)
#define __shfl_sync(...) ::cuda_emu::shfl(CUDA_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_emu::shfl_up(CUDA_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_emu::shfl_down(CUDA_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emu::shfl_xor(CUDA_EMU_SITE, __VA_ARGS__)
#define __ballot_sync(m, p) ::cuda_emu::ballot(CUDA_EMU_SITE, (m), (p))
#define __any_sync(m, p) ::cuda_emu::any(CUDA_EMU_SITE, (m), (p))
#define __all_sync(m, p) ::cuda_emu::all(CUDA_EMU_SITE, (m), (p))
#define __activemask() ::cuda_emu::activemask()

// Cache-hinted loads and stores: plain accesses that check their alignment.
#define __ldg(p) ::cuda_emu::load_checked(CUDA_EMU_SITE, (p), "__ldg")
// cp.async (csrc/cuda/apl_cuda_common.cuh uses these where the GPU runs the PTX)
#define CUDA_EMU_ASYNC_COPY16(dst, src) ::cuda_emu::async_copy16(CUDA_EMU_SITE, (dst), (src))
#define CUDA_EMU_ASYNC_WAIT_ALL() ::cuda_emu::async_wait_all()
#define __ldcg(p) ::cuda_emu::load_checked(CUDA_EMU_SITE, (p), "__ldcg")
#define __ldca(p) ::cuda_emu::load_checked(CUDA_EMU_SITE, (p), "__ldca")
#define __ldcs(p) ::cuda_emu::load_checked(CUDA_EMU_SITE, (p), "__ldcs")
#define __ldlu(p) ::cuda_emu::load_checked(CUDA_EMU_SITE, (p), "__ldlu")
#define __ldcv(p) ::cuda_emu::load_checked(CUDA_EMU_SITE, (p), "__ldcv")
#define __stcg(p, v) ::cuda_emu::store_checked(CUDA_EMU_SITE, (p), (v), "__stcg")
#define __stcs(p, v) ::cuda_emu::store_checked(CUDA_EMU_SITE, (p), (v), "__stcs")
#define __stwb(p, v) ::cuda_emu::store_checked(CUDA_EMU_SITE, (p), (v), "__stwb")
#define __stwt(p, v) ::cuda_emu::store_checked(CUDA_EMU_SITE, (p), (v), "__stwt")

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
inline long long clock64() { return 0; }

template <typename T>
inline T atomicAdd(T* p, T v) { return ::cuda_emu::atomic_add(p, v); }
template <typename T>
inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicCAS(T* p, T expected, T desired) { return ::cuda_emu::atomic_cas(p, expected, desired); }
template <typename T>
inline T atomicMin(T* p, T v) { return ::cuda_emu::atomic_update(p, [v](T o) { return v < o ? v : o; }); }
template <typename T>
inline T atomicMax(T* p, T v) { return ::cuda_emu::atomic_update(p, [v](T o) { return v > o ? v : o; }); }
template <typename T>
inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <typename T>
inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }

// Fast intrinsics: their libm forms (the GPU's approximations differ in the last bits).
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; memcpy(&x, &i, 4); return x; }
inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long i) { double x; memcpy(&x, &i, 8); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
inline int __mul24(int a, int b) { return a * b; }

// ---------------------------------------------------------------- host API
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::cuda_emu::g_last_error;
  ::cuda_emu::g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::cuda_emu::g_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "cuda_emu error";
  }
}
inline const char* cudaGetErrorName(cudaError_t e) { return cudaGetErrorString(e); }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  *p = *::cuda_emu::device_props();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  if (d != 0) return cudaErrorInvalidDevice;
  const cudaDeviceProp& p = *::cuda_emu::device_props();
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = p.multiProcessorCount; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = int(p.sharedMemPerBlockOptin); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = int(p.sharedMemPerBlock); return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *v = p.maxThreadsPerBlock; return cudaSuccess;
    case cudaDevAttrWarpSize: *v = 32; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *v = p.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *v = p.minor; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  ::cuda_emu::log_launch("memset " + std::to_string(n));
  memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) { return cudaMemsetAsync(p, v, n, nullptr); }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

template <typename... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) > ::cuda_emu::kSmemOptin) return cudaErrorInvalidValue;
    std::lock_guard<std::mutex> lock(::cuda_emu::g_mutex);
    ::cuda_emu::g_max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = size_t(value);
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return cudaErrorInvalidValue;
}
template <typename... P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, void (*kernel)(P...), int threads,
                                                                 size_t smem) {
  *n = ::cuda_emu::occupancy(reinterpret_cast<const void*>(kernel), threads, smem);
  return cudaSuccess;
}
