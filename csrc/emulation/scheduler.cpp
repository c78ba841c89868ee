// The CUDA emulation's run time: blocks, fibers, barriers, warp collectives,
// shared memory, cp.async and mma.sync (see emulation/device.h for the rules).
//
// One OS thread runs a launch: its blocks one after another, each block's
// CUDA threads as ucontext fibers. A round runs every runnable fiber once, in
// the phase's order, until it reaches a barrier, a warp collective that is
// still missing lanes, or its end. When no fiber can run and every live one
// waits at __syncthreads(), the barrier opens and the next phase begins;
// otherwise the launch is deadlocked and fails.
//
// Sanitizers: fiber switches are announced to AddressSanitizer
// (start/finish_switch_fiber) and ThreadSanitizer (one TSan fiber per CUDA
// thread). The scheduler hands its state to a fiber with a synchronising
// switch, but a fiber returns to the scheduler without one, so the
// scheduler's clock never carries one CUDA thread's accesses to another:
// under TSan the only happens-before edges between CUDA threads are the
// barriers (a release by every arriving thread, an acquire by every leaving
// one, on an object of that phase), and a shared-memory access pair not
// ordered by a barrier is reported as the race it is on a GPU. The
// scheduler acquires each thread's accesses when the block has ended. Its
// bookkeeping inside fibers (warp slots, shared-array registry) runs with
// TSan's checks off.
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "emulation/device.h"

#if defined(__SANITIZE_ADDRESS__)
#define QALORA_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define QALORA_EMU_TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define QALORA_EMU_ASAN 1
#endif
#if __has_feature(thread_sanitizer)
#define QALORA_EMU_TSAN 1
#endif
#endif

#ifdef QALORA_EMU_ASAN
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
}
#endif
#ifdef QALORA_EMU_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
}
#endif

namespace qalora_emu {

thread_local const ThreadIds* tl_ids = nullptr;

namespace {

struct IgnoreTsan {  // the scheduler's bookkeeping is not the kernel's memory traffic
#ifdef QALORA_EMU_TSAN
  IgnoreTsan() { __tsan_ignore_thread_begin(); }
  ~IgnoreTsan() { __tsan_ignore_thread_end(); }
#else
  IgnoreTsan() {}
  ~IgnoreTsan() {}
#endif
};

constexpr size_t kStackBytes = 256 << 10;
constexpr size_t kMaxStaticShared = 48 << 10;  // what a kernel may declare statically

struct Copy {
  void* dst;
  unsigned char bytes[16];
  int n;
};

enum State : int { kRunnable, kAtBarrier, kAtWarp, kDone };

struct Fiber {
  ThreadIds ids;
  ucontext_t ctx;
  char* stack = nullptr;
  std::atomic<int> state{kRunnable};
  int warp = 0, lane = 0;
  size_t shared_cursor = 0;
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
  void* tsan_fiber = nullptr;
  char done_sync = 0;  // TSan: released by the thread at each switch back to the scheduler
};

struct Warp {
  uint32_t arrived = 0, mask = 0;
  int kind = 0;
  uint32_t in[32][10];
  uint32_t out[32][4];
};

struct Options {
  std::string order = "adversarial";
  uint64_t seed = 1;
  std::string skip_barrier;
};

std::mutex g_options_mutex;
Options& options() {
  static Options o = [] {
    Options v;
    if (const char* e = std::getenv("QALORA_EMU_ORDER")) v.order = e;
    if (const char* e = std::getenv("QALORA_EMU_SEED")) v.seed = std::strtoull(e, nullptr, 10);
    if (const char* e = std::getenv("QALORA_EMU_SKIP_BARRIER")) v.skip_barrier = e;
    return v;
  }();
  return o;
}
std::atomic<int64_t> g_launches{0};

struct Launch {
  dim3 grid, block;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<std::pair<void*, size_t>> shared;  // this block's arrays, exact size
  size_t shared_bytes = 0;
  ucontext_t main_ctx;
  void* main_tsan = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  Fiber* current = nullptr;
  bool failed = false;
  std::string failure;
  int64_t phase = 0;
  std::vector<char> phase_sync;  // TSan sync objects, one byte per phase
  Options opts;
  std::string skip_file;
  int skip_line = -1;
};

thread_local Launch* tl_launch = nullptr;
thread_local cudaError_t tl_last_error = cudaSuccess;
thread_local std::string tl_last_message;
struct StackPool {  // fiber stacks, reused launch to launch, freed with the OS thread
  std::vector<char*> stacks;
  ~StackPool() {
    for (char* p : stacks) std::free(p);
  }
};
thread_local StackPool tl_stacks;

void switch_to_fiber(Launch& L, Fiber& f) {
  L.current = &f;
  tl_ids = &f.ids;
#ifdef QALORA_EMU_TSAN
  __tsan_switch_to_fiber(f.tsan_fiber, 0 /* synchronising: the scheduler's state */);
#endif
#ifdef QALORA_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  swapcontext(&L.main_ctx, &f.ctx);
#ifdef QALORA_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  L.current = nullptr;
  tl_ids = nullptr;
}

// From a fiber back to the scheduler; returns when the scheduler resumes it.
void yield_to_scheduler(Launch& L, bool finished = false) {
  Fiber* f;
  void* main_tsan;
  const void* main_bottom;
  size_t main_size;
  {
    IgnoreTsan ig;  // reads of the scheduler's state
    f = L.current;
    main_tsan = L.main_tsan;
    main_bottom = L.main_stack_bottom;
    main_size = L.main_stack_size;
  }
  (void)main_tsan;
  (void)main_bottom;
  (void)main_size;
#ifdef QALORA_EMU_TSAN
  __tsan_release(&f->done_sync);  // acquired by the scheduler only, when the block has ended
  __tsan_switch_to_fiber(main_tsan, 1 /* no synchronisation: see the top */);
#endif
#ifdef QALORA_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, main_bottom, main_size);
#endif
  swapcontext(&f->ctx, &L.main_ctx);
#ifdef QALORA_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  (void)finished;
}

[[noreturn]] void fail(const std::string& why) {
  Launch& L = *tl_launch;
  {
    IgnoreTsan ig;
    if (!L.failed) {
      L.failed = true;
      const Fiber& f = *L.current;
      L.failure = "emulated kernel failed in block (" + std::to_string(f.ids.block.x) + "," +
                  std::to_string(f.ids.block.y) + "," + std::to_string(f.ids.block.z) + ") thread " +
                  std::to_string(f.ids.thread.x) + ": " + why;
    }
  }
  L.current->state.store(kDone, std::memory_order_relaxed);
  yield_to_scheduler(L, true);
  std::abort();  // never resumed
}

void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) std::memcpy(c.dst, c.bytes, static_cast<size_t>(c.n));
}

void fiber_main() {
  Launch& L = *tl_launch;
#ifdef QALORA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &L.main_stack_bottom, &L.main_stack_size);
#endif
  Fiber* fp;
  {
    IgnoreTsan ig;
    fp = L.current;
  }
  Fiber& f = *fp;
  (*L.body)();
  // A thread's outstanding copies land when it ends.
  for (const auto& g : f.groups) land(g);
  land(f.open);
  f.groups.clear();
  f.open.clear();
  f.state.store(kDone, std::memory_order_relaxed);
  yield_to_scheduler(L, true);
  std::abort();
}

uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t x = a * 0x9E3779B97F4A7C15ull ^ (b + 0x632BE59BD9B4E019ull + (a << 6) + (a >> 2));
  x ^= x >> 31;
  x *= 0xBF58476D1CE4E5B9ull;
  return x ^ (x >> 29);
}

// The order of this round's runnable fibers.
void order_round(Launch& L, std::vector<int>& ids, int64_t block_linear, int64_t round) {
  const std::string& o = L.opts.order;
  bool reverse = o == "reverse", shuffle = o == "shuffle";
  if (o == "adversarial") {
    reverse = (round + block_linear) % 2 == 0;
    shuffle = !reverse;
  }
  if (reverse) std::reverse(ids.begin(), ids.end());
  if (shuffle) {
    std::mt19937_64 rng(mix(mix(L.opts.seed, static_cast<uint64_t>(block_linear)), static_cast<uint64_t>(round)));
    std::shuffle(ids.begin(), ids.end(), rng);
  }
}

void run_block(Launch& L, dim3 bid) {
  const int nthreads = static_cast<int>(L.block.x * L.block.y * L.block.z);
  const int64_t block_linear = bid.x + static_cast<int64_t>(L.grid.x) * (bid.y + static_cast<int64_t>(L.grid.y) * bid.z);
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = L.fibers[t];
    f.ids.thread = dim3(t % L.block.x, (t / L.block.x) % L.block.y, t / (L.block.x * L.block.y));
    f.ids.block = bid;
    f.ids.block_dim = L.block;
    f.ids.grid_dim = L.grid;
    f.state.store(kRunnable, std::memory_order_relaxed);
    f.warp = t / 32;
    f.lane = t % 32;
    f.shared_cursor = 0;
    f.open.clear();
    f.groups.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
#ifdef QALORA_EMU_TSAN
    f.tsan_fiber = __tsan_create_fiber(0);
#endif
  }
  for (Warp& w : L.warps) w.arrived = 0;

  int64_t round = 0;
  std::vector<int> ids;
  while (!L.failed) {
    ids.clear();
    for (int t = 0; t < nthreads; ++t)
      if (L.fibers[t].state.load(std::memory_order_relaxed) == kRunnable) ids.push_back(t);
    if (ids.empty()) {
      int at_barrier = 0, at_warp = 0;
      for (int t = 0; t < nthreads; ++t) {
        const int s = L.fibers[t].state.load(std::memory_order_relaxed);
        at_barrier += s == kAtBarrier;
        at_warp += s == kAtWarp;
      }
      if (at_warp) {
        L.failed = true;
        L.failure = "deadlock: " + std::to_string(at_warp) +
                    " threads wait in a warp collective for lanes that exited or wait at __syncthreads()";
        break;
      }
      if (!at_barrier) break;  // every thread ended
      ++L.phase;
      for (int t = 0; t < nthreads; ++t)
        if (L.fibers[t].state.load(std::memory_order_relaxed) == kAtBarrier)
          L.fibers[t].state.store(kRunnable, std::memory_order_relaxed);
      continue;
    }
    order_round(L, ids, block_linear, round++);
    // Warp-major: the warps in the order of their first thread in `ids`; each
    // warp runs (its lanes in `ids` order, again after every collective that
    // completes) until all its lanes wait at the barrier or ended, before the
    // next warp starts. So one warp runs a whole phase ahead of the others:
    // a barrier that is missing lets it overwrite or read what the others
    // have not read or written yet.
    std::vector<int> warp_order;
    std::vector<char> seen(L.warps.size(), 0);
    for (int t : ids)
      if (!seen[t / 32]) {
        seen[t / 32] = 1;
        warp_order.push_back(t / 32);
      }
    for (int wi : warp_order) {
      bool ran = true;
      while (ran && !L.failed) {
        ran = false;
        for (int t : ids) {
          if (L.failed) break;
          if (t / 32 != wi || L.fibers[t].state.load(std::memory_order_relaxed) != kRunnable) continue;
          switch_to_fiber(L, L.fibers[t]);
          ran = true;
        }
      }
    }
  }
#ifdef QALORA_EMU_TSAN
  for (int t = 0; t < nthreads; ++t) {
    __tsan_acquire(&L.fibers[t].done_sync);
    __tsan_destroy_fiber(L.fibers[t].tsan_fiber);
  }
#endif
  for (auto& [p, n] : L.shared) ::operator delete(p, std::align_val_t{16});
  L.shared.clear();
  L.shared_bytes = 0;
#ifdef QALORA_EMU_ASAN
  if (L.failed)
    for (int t = 0; t < nthreads; ++t) __asan_unpoison_memory_region(L.fibers[t].stack, kStackBytes);
#endif
}

}  // namespace

const char* cuda_error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  g_launches.fetch_add(1);
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535 || dynamic_smem > 0) {
    tl_last_error = cudaErrorInvalidConfiguration;
    tl_last_message = "emulated launch: invalid configuration (grid " + std::to_string(grid.x) + "x" +
                      std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " + std::to_string(block.x) +
                      "x" + std::to_string(block.y) + "x" + std::to_string(block.z) + ")";
    return tl_last_error;
  }
  IgnoreTsan scheduler_is_not_a_cuda_thread;  // see below
  Launch L;
  L.grid = grid;
  L.block = block;
  L.body = &body;
  {
    std::lock_guard<std::mutex> lock(g_options_mutex);
    L.opts = options();
  }
  if (!L.opts.skip_barrier.empty()) {
    const auto colon = L.opts.skip_barrier.rfind(':');
    if (colon != std::string::npos) {
      L.skip_file = L.opts.skip_barrier.substr(0, colon);
      L.skip_line = std::atoi(L.opts.skip_barrier.c_str() + colon + 1);
    }
  }
  L.fibers = std::vector<Fiber>(nthreads);
  L.warps.resize((nthreads + 31) / 32);
  while (tl_stacks.stacks.size() < nthreads) tl_stacks.stacks.push_back(static_cast<char*>(std::malloc(kStackBytes)));
  for (uint64_t t = 0; t < nthreads; ++t) L.fibers[t].stack = tl_stacks.stacks[t];
  L.phase_sync.assign(1 << 12, 0);
#ifdef QALORA_EMU_TSAN
  L.main_tsan = __tsan_get_current_fiber();
#endif
  Launch* outer = tl_launch;
  tl_launch = &L;
  // The scheduler's own accesses (fiber set-up, L.current, phases, freeing
  // shared arrays) are not the kernel's: TSan ignores them on this thread
  // (scheduler_is_not_a_cuda_thread, above).
  for (unsigned z = 0; z < grid.z && !L.failed; ++z)
    for (unsigned y = 0; y < grid.y && !L.failed; ++y)
      for (unsigned x = 0; x < grid.x && !L.failed; ++x) run_block(L, dim3(x, y, z));
  tl_launch = outer;
  if (L.failed) {
    tl_last_error = cudaErrorLaunchFailure;
    tl_last_message = L.failure;
    std::fprintf(stderr, "[qalora cuda emulation] %s\n", L.failure.c_str());
    return tl_last_error;
  }
  return cudaSuccess;
}

void syncthreads(const char* file, int line) {
  Launch& L = *tl_launch;
  if (L.skip_line == line) {
    const std::string f(file);
    if (f.size() >= L.skip_file.size() && f.compare(f.size() - L.skip_file.size(), L.skip_file.size(), L.skip_file) == 0)
      return;  // this barrier removed (tests of the tests)
  }
  char* sync = &L.phase_sync[static_cast<size_t>(L.phase) % L.phase_sync.size()];
#ifdef QALORA_EMU_TSAN
  __tsan_release(sync);
#endif
  L.current->state.store(kAtBarrier, std::memory_order_relaxed);
  yield_to_scheduler(L);
  sync = &L.phase_sync[static_cast<size_t>(L.phase - 1) % L.phase_sync.size()];
#ifdef QALORA_EMU_TSAN
  __tsan_acquire(sync);
#endif
  (void)sync;
}

namespace {

// Waits for every lane of `mask`; the last one to arrive runs `op` on the warp's slots.
template <class Op>
void warp_collective(unsigned mask, int kind, const char* what, Op&& op) {
  Launch& L = *tl_launch;
  Fiber& me = *L.current;
  Warp& w = L.warps[me.warp];
  bool last = false;
  {
    IgnoreTsan ig;
    if (!((mask >> me.lane) & 1u))
      fail(std::string(what) + ": lane " + std::to_string(me.lane) + " is not in its own mask");
    if (w.arrived == 0) {
      w.mask = mask;
      w.kind = kind;
    } else if (w.mask != mask || w.kind != kind) {
      fail(std::string(what) + ": lanes of warp " + std::to_string(me.warp) +
           " meet in different collectives or with different masks (divergence)");
    }
    w.arrived |= 1u << me.lane;
    if (w.arrived == w.mask) {
      last = true;
      op(w);
      w.arrived = 0;
      for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1u) && l != me.lane)
          L.fibers[me.warp * 32 + l].state.store(kRunnable, std::memory_order_relaxed);
    }
  }
  if (!last) {
    me.state.store(kAtWarp, std::memory_order_relaxed);
    yield_to_scheduler(L);
  }
}

}  // namespace

uint32_t shfl_xor(unsigned mask, uint32_t v, int lane_mask) {
  Launch& L = *tl_launch;
  const int lane = L.current->lane;
  {
    IgnoreTsan ig;
    L.warps[L.current->warp].in[lane][0] = v;
  }
  warp_collective(mask, 1, "__shfl_xor_sync", [mask, lane_mask](Warp& w) {
    for (int l = 0; l < 32; ++l) {
      if (!((mask >> l) & 1u)) continue;
      const int src = l ^ lane_mask;
      // A source lane outside the mask gives an undefined value: poison.
      w.out[l][0] = (src < 32 && ((mask >> src) & 1u)) ? w.in[src][0] : 0xFFFFFFFFu;
    }
  });
  IgnoreTsan ig;
  return L.warps[L.current->warp].out[lane][0];
}

void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, MmaType t) {
  Launch& L = *tl_launch;
  const int lane = L.current->lane;
  {
    IgnoreTsan ig;
    uint32_t* in = L.warps[L.current->warp].in[lane];
    for (int i = 0; i < 4; ++i) in[i] = a[i];
    for (int i = 0; i < 2; ++i) in[4 + i] = b[i];
    for (int i = 0; i < 4; ++i) std::memcpy(&in[6 + i], &d[i], 4);
  }
  warp_collective(0xffffffffu, t == MmaType::kF16 ? 2 : 3, "mma.sync.m16n8k16", [t](Warp& w) {
    auto val = [t](uint32_t reg, int half) {
      const uint16_t h = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
      return t == MmaType::kF16 ? qalora::half_bits_to_float(h) : qalora::bf16_bits_to_float(h);
    };
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, tq = lane & 3;
      const uint32_t* in = w.in[lane];
      for (int i = 0; i < 8; ++i) {  // a0..a7: register i / 2, half i % 2
        const int row = g + 8 * ((i >> 1) & 1);
        const int col = 2 * tq + (i & 1) + 8 * (i >> 2);
        A[row][col] = val(in[i >> 1], i & 1);
      }
      for (int i = 0; i < 4; ++i) {  // b0..b3
        const int k = 2 * tq + (i & 1) + 8 * (i >> 1);
        B[k][g] = val(in[4 + (i >> 1)], i & 1);
      }
      for (int i = 0; i < 4; ++i) {  // c0..c3
        float c;
        std::memcpy(&c, &in[6 + i], 4);
        C[g + 8 * (i >> 1)][2 * tq + (i & 1)] = c;
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane >> 2, tq = lane & 3;
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * tq + (i & 1);
        float s = 0.f;  // float32 products of 16-bit values are exact; summed in float32, k in order
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        const float r = C[row][col] + s;
        std::memcpy(&w.out[lane][i], &r, 4);
      }
    }
  });
  IgnoreTsan ig;
  for (int i = 0; i < 4; ++i) std::memcpy(&d[i], &L.warps[L.current->warp].out[lane][i], 4);
}

void* shared_alloc(size_t bytes, size_t align) {
  Launch& L = *tl_launch;
  Fiber& me = *L.current;
  IgnoreTsan ig;
  const size_t i = me.shared_cursor++;
  if (i < L.shared.size()) {
    if (L.shared[i].second != bytes) fail("threads of a block declare different __shared__ arrays");
    return L.shared[i].first;
  }
  if (align > 16) fail("__shared__ alignment above 16 bytes is not emulated");
  L.shared_bytes += bytes;
  if (L.shared_bytes > kMaxStaticShared)
    fail("static __shared__ memory of " + std::to_string(L.shared_bytes) + " bytes exceeds 48 KB");
  void* p = ::operator new(bytes, std::align_val_t{16});
  std::memset(p, 0xFF, bytes);  // poison: NaN in every float format
  L.shared.emplace_back(p, bytes);
  return p;
}

void cp_async(void* smem, const void* gmem, int bytes, bool live) {
  Launch& L = *tl_launch;
  Fiber& me = *L.current;
  const auto s = reinterpret_cast<uintptr_t>(smem), g = reinterpret_cast<uintptr_t>(gmem);
  if (s % bytes != 0 || (live && g % bytes != 0))
    fail("cp.async of " + std::to_string(bytes) + " bytes from a misaligned address");
  bool in_shared = false;
  {
    IgnoreTsan ig;
    for (const auto& [p, n] : L.shared)
      if (s >= reinterpret_cast<uintptr_t>(p) && s + bytes <= reinterpret_cast<uintptr_t>(p) + n) in_shared = true;
  }
  if (!in_shared) fail("cp.async destination is not inside a __shared__ array");
  Copy c;
  c.dst = smem;
  c.n = bytes;
  if (live)
    std::memcpy(c.bytes, gmem, static_cast<size_t>(bytes));
  else
    std::memset(c.bytes, 0, sizeof(c.bytes));
  std::memset(smem, 0xFF, static_cast<size_t>(bytes));  // undefined until its group is waited for
  me.open.push_back(c);
}

void cp_async_commit() {
  Fiber& me = *tl_launch->current;
  me.groups.push_back(std::move(me.open));
  me.open.clear();
}

void cp_async_wait(int n) {
  Fiber& me = *tl_launch->current;
  while (static_cast<int>(me.groups.size()) > n) {
    land(me.groups.front());
    me.groups.pop_front();
  }
}

void trap(const char* file, int line) { fail(std::string("__trap() at ") + file + ":" + std::to_string(line)); }

void set_option(const std::string& name, const std::string& value) {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  Options& o = options();
  if (name == "order") {
    if (value != "adversarial" && value != "reverse" && value != "shuffle" && value != "forward")
      throw std::invalid_argument("order must be adversarial, reverse, shuffle or forward; got '" + value + "'");
    o.order = value;
  } else if (name == "seed") {
    o.seed = std::stoull(value);
  } else if (name == "skip_barrier") {
    o.skip_barrier = value;
  } else {
    throw std::invalid_argument("unknown emulation option '" + name + "' (order, seed, skip_barrier)");
  }
}

std::string get_option(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_options_mutex);
  const Options& o = options();
  if (name == "order") return o.order;
  if (name == "seed") return std::to_string(o.seed);
  if (name == "skip_barrier") return o.skip_barrier;
  throw std::invalid_argument("unknown emulation option '" + name + "' (order, seed, skip_barrier)");
}

int64_t launch_count() { return g_launches.load(); }

}  // namespace qalora_emu

const char* cudaGetErrorString(cudaError_t err) {
  if (err == cudaErrorLaunchFailure && !qalora_emu::tl_last_message.empty()) return qalora_emu::tl_last_message.c_str();
  return qalora_emu::cuda_error_name(err);
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = qalora_emu::tl_last_error;
  qalora_emu::tl_last_error = cudaSuccess;
  return e;
}
