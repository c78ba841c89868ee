// qlinear's prologue on CUDA: the chunk sums of x (the zeros' term of the
// GEMV and the tensor-core GEMM) and the adapter's input u from them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/device_helpers.cuh"
#include "cuda/launchers.cuh"

namespace qalora {
namespace cuda {
namespace {

// ---- prologue: chunk sums and the adapter's input ---------------------------

template <typename T>
__global__ void chunk_sums_kernel(const T* __restrict__ x, int64_t M, int64_t K, float* __restrict__ out) {
  const int64_t chunks = K / kChunk;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= M * chunks) return;
  const int64_t m = i / chunks, c = i % chunks;
  const T* p = x + m * K + c * kChunk;
  float s = 0.f;
#pragma unroll 8
  for (int j = 0; j < kChunk; ++j) s += to_f32<T>(p[j]);
  out[i] = s;
}

__global__ void adapter_input_kernel(const float* __restrict__ chunk_sums, const float* __restrict__ mask,
                                     const float* __restrict__ A, int64_t M, int64_t L, int64_t rank,
                                     int group_size, float factor, float* __restrict__ u) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= M * rank) return;
  const int64_t m = i / rank, r = i % rank;
  const int cpg = group_size / kChunk;
  const float* cs = chunk_sums + m * L * cpg;
  float acc = 0.f;
  for (int64_t g = 0; g < L; ++g) {
    float xs = 0.f;
    for (int c = 0; c < cpg; ++c) xs += cs[g * cpg + c];
    if (mask) xs *= mask[m * L + g];
    acc += xs * A[r * L + g];
  }
  u[i] = factor * acc;
}

}  // namespace

cudaError_t launch_chunk_sums(const void* x, FloatType xt, int64_t M, int64_t K, float* chunk_sums, cudaStream_t s) {
  return by_type(xt, [&](auto tag) {
    using T = decltype(tag);
    const int64_t n = M * (K / kChunk);
    QALORA_LAUNCH(grid_for(n, 256), 256, 0, s, chunk_sums_kernel<T>)(static_cast<const T*>(x), M, K, chunk_sums);
    return cudaGetLastError();
  });
}

cudaError_t launch_adapter_input(const float* chunk_sums, const float* mask, const float* A, int64_t M, int64_t L,
                                 int64_t rank, int group_size, float scaling, float* u, cudaStream_t s) {
  const float factor = scaling / static_cast<float>(group_size);
  QALORA_LAUNCH(grid_for(M * rank, 128), 128, 0, s, adapter_input_kernel)(chunk_sums, mask, A, M, L, rank, group_size, factor,
                                                                u);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace qalora
