// The device side of the CUDA emulation (QALORA_CUDA_EMULATION): what a
// kernel body in csrc/cuda/ may use, run on the host by emulation/scheduler.cpp.
//
//  * threadIdx / blockIdx / blockDim / gridDim of the running emulated thread;
//  * __syncthreads(): a real barrier. Every CUDA thread of a block is a fiber;
//    between two barriers the threads run one after another, in an
//    adversarial order (reversed or shuffled by a recorded seed, per phase),
//    so a missing barrier reads data no thread has written yet
//    (deterministically, not by luck of the OS scheduler);
//  * warp collectives (__shfl_xor_sync, mma.sync m16n8k16) wait for every lane
//    of their mask, honour the mask, and fail the launch on divergence;
//  * per-block shared memory as exact-size allocations filled with 0xFF bytes
//    (NaN as float32, float16 and bfloat16) at each block's start;
//  * cp.async with group semantics: the destination reads as poison from the
//    copy's issue until cp.async.wait_group releases its group (or the thread
//    ends), so a missing or wrong wait reads garbage.
// A failure (trap, divergent collective, deadlock, misaligned cp.async, too
// much shared memory) ends the launch with cudaErrorLaunchFailure and a
// message (cudaGetErrorString).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emulation/runtime.h"

namespace qalora_emu {

struct ThreadIds {
  dim3 thread, block, block_dim, grid_dim;
};
extern thread_local const ThreadIds* tl_ids;
inline const ThreadIds& ids() { return *tl_ids; }

void syncthreads(const char* file, int line);
uint32_t shfl_xor(unsigned mask, uint32_t v, int lane_mask);
void* shared_alloc(size_t bytes, size_t align);
void cp_async(void* smem, const void* gmem, int bytes, bool live);
void cp_async_commit();
void cp_async_wait(int n);
enum class MmaType { kF16, kBF16 };
// d[0..3] += A * B for one warp (each lane passes its fragments, PTX layout).
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, MmaType t);
[[noreturn]] void trap(const char* file, int line);

// Runs body once per thread of every block (blocks one after another).
// Returns cudaSuccess or the launch's error (also left for cudaGetLastError).
cudaError_t run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);


template <class... P>
struct KernelCall {
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);
  template <class... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> bound(std::forward<A>(args)...);
    auto k = kernel;
    run_grid(grid, block, smem, [&bound, k] { std::apply(k, bound); });
  }
};
template <class... P>
KernelCall<P...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return KernelCall<P...>{grid, block, smem, kernel};
}

}  // namespace qalora_emu

#define threadIdx (::qalora_emu::ids().thread)
#define blockIdx (::qalora_emu::ids().block)
#define blockDim (::qalora_emu::ids().block_dim)
#define gridDim (::qalora_emu::ids().grid_dim)
#define __syncthreads() ::qalora_emu::syncthreads(__FILE__, __LINE__)
#define __trap() ::qalora_emu::trap(__FILE__, __LINE__)

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) == 4, "the emulated shuffle moves 32-bit values");
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = ::qalora_emu::shfl_xor(mask, u, lane_mask);
  std::memcpy(&v, &u, 4);
  return v;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsub_rn(float a, float b) { return a - b; }
