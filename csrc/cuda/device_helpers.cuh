// Device helpers shared by the CUDA kernel files (gemv.cu, qlinear_prologue.cu,
// format_kernels.cu): float conversions, a warp sum, the grid size of a
// one-thread-per-item launch and the launchers' dtype dispatch. No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/compat.cuh"
#include "cuda/launchers.cuh"

namespace qalora {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_f32(T v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline unsigned grid_for(int64_t threads, int block) { return static_cast<unsigned>((threads + block - 1) / block); }

// Calls fn(T{}) with T the device type of `t` (the launchers' one run-time to
// compile-time dtype dispatch); cudaErrorInvalidValue for an unknown value.
template <typename Fn>
cudaError_t by_type(FloatType t, Fn&& fn) {
  switch (t) {
    case FloatType::kFloat32: return fn(float{});
    case FloatType::kFloat16: return fn(__half{});
    case FloatType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace qalora
