// Device helpers shared by the tensor-core kernels (gemm_mma.cu,
// grad_mma.cu): mma.sync m16n8k16 for float16 / bfloat16 with float32
// accumulators, building 16-bit fragment pairs, and cp.async copies. sm_80
// and newer; no torch headers.
//
// Fragment layouts are PTX's for m16n8k16 (row.col), lane = 4 * g + t:
//   A (16 x 16, 4 regs of two values): (g, 2t), (g+8, 2t), (g, 2t+8), (g+8, 2t+8)
//   B (16 x 8, 2 regs):               (k = 2t, n = g), (k = 2t+8, n = g)
//   C (16 x 8, 4 floats):             (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
// Each register holds its two values low half first.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/compat.cuh"

namespace qalora {
namespace cuda {
namespace sm80 {

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  // d += a * b
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
#if defined(QALORA_CUDA_EMULATION)
    ::qalora_emu::mma_m16n8k16(d, a, b, ::qalora_emu::MmaType::kF16);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  // Two codes (< 16) as two exact float16 values: 0x6400 | c is 1024 + c;
  // subtracting 1024 leaves c.
  static __device__ __forceinline__ uint32_t codes(uint32_t lo, uint32_t hi) {
    const uint32_t biased = 0x64006400u | lo | (hi << 16);
    __half2 h = __hsub2(*reinterpret_cast<const __half2*>(&biased), __half2half2(__ushort_as_half(0x6400)));
    return *reinterpret_cast<uint32_t*>(&h);
  }
  // Two floats rounded to float16.
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __half out(float v) { return __float2half_rn(v); }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* d, const uint32_t* a, const uint32_t* b) {
#if defined(QALORA_CUDA_EMULATION)
    ::qalora_emu::mma_m16n8k16(d, a, b, ::qalora_emu::MmaType::kBF16);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
  // 0x4300 | c is 128 + c exactly in bfloat16 (7 mantissa bits); minus 128.
  static __device__ __forceinline__ uint32_t codes(uint32_t lo, uint32_t hi) {
    const uint32_t biased = 0x43004300u | lo | (hi << 16);
    __nv_bfloat162 h = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased),
                               __bfloat162bfloat162(__ushort_as_bfloat16(0x4300)));
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ __nv_bfloat16 out(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// 32 bits of shared memory (two 16-bit values).
__device__ __forceinline__ uint32_t ld_shared_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Global -> shared copies that bypass registers: 16 bytes (L2 only) or 4
// bytes. When `live` is false nothing is read and the bytes are zero-filled.
// (Emulated: the destination reads as poison until its group is waited for.)
#if defined(QALORA_CUDA_EMULATION)
inline void cp_async_16(void* smem, const void* gmem, bool live) { ::qalora_emu::cp_async(smem, gmem, 16, live); }
inline void cp_async_4(void* smem, const void* gmem, bool live) { ::qalora_emu::cp_async(smem, gmem, 4, live); }
inline void cp_async_commit() { ::qalora_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::qalora_emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool live) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(live ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool live) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem), "r"(live ? 4 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N groups of this thread's copies are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

}  // namespace sm80
}  // namespace cuda
}  // namespace qalora
