// The CUDA runtime API as the emulation build sees it (QALORA_CUDA_EMULATION):
// the few types and calls that csrc/cuda/ uses on the host side (error codes,
// streams, dim3, uint4), plus the float16 / bfloat16 device types. No torch,
// no CUDA toolkit. The shim headers (shim/cuda_runtime.h, cuda_fp16.h,
// cuda_bf16.h) include this file, so the kernel sources keep their includes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "qalora/format.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

const char* cudaGetErrorString(cudaError_t err);
// The last launch error of this thread, cleared by the call (as CUDA's).
cudaError_t cudaGetLastError();

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- float16 / bfloat16: raw bits, converted with format.h's round-to-nearest-even ----
struct __half {
  uint16_t x;
};
struct __half2 {
  __half x, y;  // x in the low 16 bits, as on the GPU
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "16-bit pairs must pack into 32 bits");

inline float __half2float(__half h) { return qalora::half_bits_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{qalora::float_to_half_bits(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return qalora::bf16_bits_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{qalora::float_to_bf16_bits(f)}; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline __half2 __half2half2(__half h) { return __half2{h, h}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 h) { return __nv_bfloat162{h, h}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
// Lane-wise a - b rounded once. The difference of two float16 values is
// exact in double (their exponents span < 53 bits), and double -> float ->
// half rounds once more only when the float is not exact, which for two
// float16 operands never happens above half's subnormal range; the kernels
// use it on exact small integers only.
inline __half2 __hsub2(__half2 a, __half2 b) {
  return __floats2half2_rn(__half2float(a.x) - __half2float(b.x), __half2float(a.y) - __half2float(b.y));
}
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __floats2bfloat162_rn(__bfloat162float(a.x) - __bfloat162float(b.x),
                               __bfloat162float(a.y) - __bfloat162float(b.y));
}

// ---- controls of the emulated device (host side) ----
namespace qalora_emu {
// Options (also settable by environment: QALORA_EMU_ORDER, QALORA_EMU_SEED,
// QALORA_EMU_SKIP_BARRIER):
//   order         adversarial (default: reversed and shuffled phases
//                 alternate) | reverse | shuffle | forward
//   seed          the shuffle's seed (default 1)
//   skip_barrier  "file:line" of a __syncthreads() to turn into a no-op
//                 (tests prove that removing it fails them); "" for none
void set_option(const std::string& name, const std::string& value);
std::string get_option(const std::string& name);
// Launches and blocks emulated since the process started.
int64_t launch_count();
}  // namespace qalora_emu
