// The fused dequant-GEMV for decode-sized M and the second pass of a split-K
// launch (shared with gemm_mma.cu). The bit unpacking is format.h's
// __host__ __device__ code, the same the CPU tests exercise.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/device_helpers.cuh"
#include "cuda/launchers.cuh"
#include "qalora/epilogue.h"

namespace qalora {
namespace cuda {
namespace {

// q . x[0 .. 31] with x read 16 bytes at a time (few live registers).
template <typename T>
__device__ __forceinline__ float dot32(const float* q, const T* x) {
  constexpr int per = 16 / sizeof(T);
  const uint4* p = reinterpret_cast<const uint4*>(x);
  float d = 0.f;
#pragma unroll
  for (int i = 0; i < 32 / per; ++i) {
    const uint4 v = __ldg(p + i);
    const T* t = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < per; ++j) d = fmaf(q[i * per + j], to_f32<T>(t[j]), d);
  }
  return d;
}

// ---- fused dequant-GEMV ------------------------------------------------------

// A lane's unit of work: whole chunks in whole 16-byte loads.
// b = 4: 1 chunk (4 words); b = 2: 2 chunks (4 words); b = 3: 4 chunks (12 words).
template <int BITS>
struct Unit {
  static constexpr int chunks = BITS == 3 ? 4 : 4 / BITS;
  static constexpr int words = chunks * BITS;
  static constexpr int loads = words / 4;
};

constexpr int kGemvWarps = 4;  // rows per block: one warp per output row

template <int BITS, typename T>
__global__ void __launch_bounds__(kGemvWarps * kWarp)
    gemv_kernel(PackedView w, const T* __restrict__ x, int M, const float* __restrict__ chunk_sums,
                const float* __restrict__ bias, const float* __restrict__ u, const float* __restrict__ B,
                int64_t rank, T* __restrict__ y, float* __restrict__ partial, int64_t units_per_split) {
  using U = Unit<BITS>;
  const int lane = threadIdx.x % kWarp;
  const int64_t n = blockIdx.x * static_cast<int64_t>(kGemvWarps) + threadIdx.x / kWarp;
  if (n >= w.N) return;  // whole warps leave together
  const int64_t chunks = w.K / kChunk;
  const int64_t L = w.K / w.group_size;
  const int cpg = w.group_size / kChunk;
  const int64_t units = (chunks + U::chunks - 1) / U::chunks;
  const int64_t u0 = blockIdx.y * units_per_split;
  const int64_t u1 = min(units, u0 + units_per_split);
  const uint32_t* row = w.packed + n * w.stride_words;

  float acc[kGemvMaxM];
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = 0.f;

  for (int64_t unit = u0 + lane; unit < u1; unit += kWarp) {
    uint32_t words[U::words];
#pragma unroll
    for (int i = 0; i < U::loads; ++i) {
      const int64_t w0 = unit * U::words + 4 * i;
      // The row is padded to whole 16-byte loads; a load wholly past the
      // row's padded end belongs to a chunk that does not exist.
      const uint4 v = w0 < w.stride_words ? *reinterpret_cast<const uint4*>(row + w0) : make_uint4(0, 0, 0, 0);
      words[4 * i] = v.x;
      words[4 * i + 1] = v.y;
      words[4 * i + 2] = v.z;
      words[4 * i + 3] = v.w;
    }
#pragma unroll
    for (int c = 0; c < U::chunks; ++c) {
      const int64_t ci = unit * U::chunks + c;
      if (ci >= chunks) break;
      float q[kChunk];
      unpack_chunk<BITS, float>(words + c * BITS, q);
      const int64_t g = ci / cpg;
      const float s = load_store(w.scale, n * L + g, w.scale_type);
      const float z = load_store(w.zero, n * L + g, w.zero_type);
#pragma unroll
      for (int m = 0; m < kGemvMaxM; ++m) {
        if (m < M) acc[m] += s * dot32<T>(q, x + m * w.K + ci * kChunk) + z * chunk_sums[m * chunks + ci];
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kGemvMaxM; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[m]);
      if (partial) {
        if (lane == 0) partial[(static_cast<int64_t>(blockIdx.y) * M + m) * w.N + n] = v;
      } else if (lane == 0) {
        // The one epilogue (qalora/epilogue.h): bias, then the adapter; rounded once.
        y[m * w.N + n] = from_f32<T>(epilogue(v, bias, n, u ? u + m * rank : nullptr, B + n * rank, rank));
      }
    }
  }
}

// Second pass of split-K: one thread per (m, n), splits added in order.
template <typename T>
__global__ void split_reduce_kernel(const float* __restrict__ partial, int splits, int64_t M, int64_t N,
                                    const float* __restrict__ bias, const float* __restrict__ u,
                                    const float* __restrict__ B, int64_t rank, T* __restrict__ y) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i % N;
  float v = 0.f;
  for (int s = 0; s < splits; ++s) v += partial[s * M * N + i];
  y[i] = from_f32<T>(epilogue(v, bias, n, u ? u + m * rank : nullptr, B + n * rank, rank));
}

}  // namespace

int gemv_splits(const PackedView& w, int sms) {
  const int64_t chunks = w.K / kChunk;
  const int per_unit = w.bits == 3 ? 4 : 4 / w.bits;
  const int64_t units = (chunks + per_unit - 1) / per_unit;
  const int64_t blocks = (w.N + kGemvWarps - 1) / kGemvWarps;
  int splits = 1;
  // Fill the machine (two blocks per multiprocessor) while every lane keeps
  // at least two units of work.
  while (blocks * splits < 2 * sms && units / (2 * splits) >= 2 * kWarp) splits *= 2;
  return splits;
}

cudaError_t launch_gemv(const PackedView& w, const void* x, FloatType xt, int64_t M, const float* chunk_sums,
                        const float* bias, const float* u, const float* B, int64_t rank, void* y, int splits,
                        float* workspace, cudaStream_t s) {
  if (M < 1 || M > kGemvMaxM || splits < 1 || (splits > 1 && !workspace)) return cudaErrorInvalidValue;
  return by_bits(w.bits, [&](auto bits_tag) {
    constexpr int BITS = decltype(bits_tag)::value;
    return by_type(xt, [&](auto tag) -> cudaError_t {
      using T = decltype(tag);
      const int64_t chunks = w.K / kChunk;
      const int64_t units = (chunks + Unit<BITS>::chunks - 1) / Unit<BITS>::chunks;
      const int64_t per_split = (units + splits - 1) / splits;
      const dim3 grid(static_cast<unsigned>((w.N + kGemvWarps - 1) / kGemvWarps), static_cast<unsigned>(splits));
      QALORA_LAUNCH(grid, kGemvWarps * kWarp, 0, s, gemv_kernel<BITS, T>)(
          w, static_cast<const T*>(x), static_cast<int>(M), chunk_sums, bias, u, B, rank, static_cast<T*>(y),
          splits > 1 ? workspace : nullptr, per_split);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess || splits == 1) return err;
      return launch_split_reduce(workspace, splits, M, w.N, bias, u, B, rank, y, xt, s);
    });
  });
}

cudaError_t launch_split_reduce(const float* partial, int splits, int64_t M, int64_t N, const float* bias,
                                const float* u, const float* B, int64_t rank, void* y, FloatType yt, cudaStream_t s) {
  return by_type(yt, [&](auto tag) {
    using T = decltype(tag);
    QALORA_LAUNCH(grid_for(M * N, 256), 256, 0, s, split_reduce_kernel<T>)(partial, splits, M, N, bias, u, B, rank,
                                                                static_cast<T*>(y));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace qalora
