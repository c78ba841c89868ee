// The packed format's kernels on CUDA: dequantize, unpack, pack and RTN
// quantization (SPEC "Dequantization", format.h layout 1).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/device_helpers.cuh"
#include "cuda/launchers.cuh"
#include "qalora/rtn.h"

namespace qalora {
namespace cuda {
namespace {

// ---- dequantize, pack, unpack, quantize -------------------------------------

template <int BITS, typename T>
__global__ void dequantize_kernel(PackedView w, T* __restrict__ out) {
  const int64_t chunks = w.K / kChunk;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= w.N * chunks) return;
  const int64_t n = i / chunks, c = i % chunks;
  const int64_t L = w.K / w.group_size, g = c * kChunk / w.group_size;
  float q[kChunk];
  unpack_chunk<BITS, float>(w.packed + n * w.stride_words + c * BITS, q);
  const float s = load_store(w.scale, n * L + g, w.scale_type);
  const float z = load_store(w.zero, n * L + g, w.zero_type);
  T* o = out + n * w.K + c * kChunk;
#pragma unroll
  for (int j = 0; j < kChunk; ++j) o[j] = from_f32<T>(fmaf(s, q[j], z));
}

template <int BITS>
__global__ void unpack_kernel(const uint32_t* __restrict__ packed, int64_t stride_words, int64_t N, int64_t K,
                              uint8_t* __restrict__ codes) {
  const int64_t chunks = K / kChunk;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N * chunks) return;
  const int64_t n = i / chunks, c = i % chunks;
  unpack_chunk<BITS, uint8_t>(packed + n * stride_words + c * BITS, codes + n * K + c * kChunk);
}

__global__ void pack_kernel(const uint8_t* __restrict__ codes, int64_t N, int64_t K, int bits,
                            uint32_t* __restrict__ packed, int64_t stride_words) {
  const int64_t chunks = K / kChunk;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N * chunks) return;
  const int64_t n = i / chunks, c = i % chunks;
  pack_chunk(codes + n * K + c * kChunk, bits, packed + n * stride_words + c * bits);
}

// RTN (qalora/rtn.h, the CPU kernel's code), one thread per (row, group).
__global__ void quantize_rtn_kernel(const float* __restrict__ w, int64_t N, int64_t K, int bits, int group_size,
                                    void* scale, FloatType scale_type, void* zero, FloatType zero_type,
                                    uint32_t* __restrict__ packed, int64_t stride_words) {
  const int64_t L = K / group_size;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N * L) return;
  const int64_t n = i / L, g = i % L;
  float s, z;
  rtn_group(w + n * K + g * group_size, group_size, bits, scale_type, zero_type, &s, &z,
            packed + n * stride_words + g * (group_size / kChunk) * bits);
  write_store(scale, n * L + g, scale_type, s);
  write_store(zero, n * L + g, zero_type, z);
}

}  // namespace

cudaError_t launch_dequantize(const PackedView& w, void* out, FloatType out_type, cudaStream_t s) {
  return by_bits(w.bits, [&](auto bits_tag) {
    constexpr int BITS = decltype(bits_tag)::value;
    return by_type(out_type, [&](auto tag) {
      using T = decltype(tag);
      QALORA_LAUNCH(grid_for(w.N * (w.K / kChunk), 256), 256, 0, s, dequantize_kernel<BITS, T>)(w, static_cast<T*>(out));
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_unpack(const uint32_t* packed, int64_t stride_words, int64_t N, int64_t K, int bits,
                         uint8_t* codes, cudaStream_t s) {
  return by_bits(bits, [&](auto bits_tag) {
    constexpr int BITS = decltype(bits_tag)::value;
    QALORA_LAUNCH(grid_for(N * (K / kChunk), 256), 256, 0, s, unpack_kernel<BITS>)(packed, stride_words, N, K, codes);
    return cudaGetLastError();
  });
}

cudaError_t launch_pack(const uint8_t* codes, int64_t N, int64_t K, int bits, uint32_t* packed,
                        int64_t stride_words, cudaStream_t s) {
  QALORA_LAUNCH(grid_for(N * (K / kChunk), 256), 256, 0, s, pack_kernel)(codes, N, K, bits, packed, stride_words);
  return cudaGetLastError();
}

cudaError_t launch_quantize_rtn(const float* w, int64_t N, int64_t K, int bits, int group_size, void* scale,
                                FloatType scale_type, void* zero, FloatType zero_type, uint32_t* packed,
                                int64_t stride_words, cudaStream_t s) {
  QALORA_LAUNCH(grid_for(N * (K / group_size), 128), 128, 0, s, quantize_rtn_kernel)(w, N, K, bits, group_size, scale,
                                                                          scale_type, zero, zero_type, packed,
                                                                          stride_words);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace qalora
