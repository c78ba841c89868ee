// Tensor-core dequant-GEMM for medium M (mma.sync m16n8k16: float16 or
// bfloat16 in, float32 accumulate; sm_80 and newer).
//
// What it computes is the GEMV's formula (SPEC: W~ = scale * q + zero):
//
//   y[m, n] = sum_g ( scale[n, g] * (q . x)_g[m, n] + zero[n, g] * group_sums[m, g] )
//             + bias[n] + sum_r u[m, r] B[n, r]
//
// The codes enter the MMA as exact small integers (0..15 are exact in both
// float16 and bfloat16), so a group's product q . x is accumulated unscaled in
// float32 and folded into the total once at the group's end with its scale
// and zero: one scale and one zero per group, no rounding of s * q + z to 16
// bits. group_sums[m, g] is the sum of the group's chunk sums (computed by
// the binding, which needs them for the adapter's input too).
//
// Tiling. A block owns 64 rows of x (M) by 64 output channels (N) and walks K
// in stages of 4 chunks (128 codes). Its 4 warps sit side by side along N,
// each with 16 channels (two n8 tiles) and all four m16 tiles; a warp skips
// m16 tiles past the last row of x, so M = 16 costs a quarter of M = 64.
// Each stage goes global -> shared memory with 16-byte cp.async copies into
// one of two buffers, the next stage's copies in flight during this stage's
// MMAs; stages start at multiples of 4 chunks (16-byte aligned code words):
//   x:      64 rows x 128 values, rows padded to 136 values (272 bytes) so the
//           A-fragment reads of a warp hit 32 different banks;
//   codes:  64 rows x (4 chunks x b words), rows padded to 12/20/20 words for
//           b = 2/3/4 (again conflict-free reads of the 8 rows a warp uses).
// Fragment layouts: see cuda/mma_sm80.cuh.
//
// Split-K splits whole groups (a split never cuts a group), partial sums go to
// a workspace that split_reduce adds in a fixed order: deterministic, no
// atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/launchers.cuh"
#include "cuda/mma_sm80.cuh"
#include "qalora/epilogue.h"

namespace qalora {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBM = 64;               // rows of x per block
constexpr int kBN = 64;               // output channels per block
constexpr int kWarpsN = 4;            // warps per block, side by side along N
constexpr int kThreads = kWarpsN * kWarp;
constexpr int kStageChunks = 4;       // chunks (of 32 codes) per stage
constexpr int kStageK = kStageChunks * kChunk;
constexpr int kXStride = kStageK + 8;  // values per x row in shared memory
constexpr int kXVecsPerRow = kStageK * 2 / 16;  // 16-byte vectors per x row per stage (16)
constexpr int kXVecsPerThread = kBM * kXVecsPerRow / kThreads;  // 8

// Words per code row per stage in shared memory, padded (see the top).
template <int BITS>
constexpr int kCodeStride = BITS == 3 ? 20 : 4 * BITS + 4;
// 16-byte code vectors per thread per stage.
template <int BITS>
constexpr int kCodeVecsPerThread = (kBN * BITS + kThreads - 1) / kThreads;

using sm80::cp_async_16;
using sm80::cp_async_commit;
using sm80::cp_async_wait;
using sm80::imin;
using sm80::ld_shared_u32;
using sm80::Mma;

template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads, 3)
    mma_gemm_kernel(PackedView w, const T* __restrict__ x, int64_t M, const float* __restrict__ chunk_sums,
                    const float* __restrict__ bias, const float* __restrict__ u, const float* __restrict__ B,
                    int64_t rank, T* __restrict__ y, float* __restrict__ partial, int64_t groups_per_split) {
#if QALORA_SM80
  constexpr int CS = kCodeStride<BITS>;
  constexpr int QV = kCodeVecsPerThread<BITS>;
  QALORA_SHARED(16, T, sx, [2][kBM * kXStride]);  // two stages: one computed, one in flight
  QALORA_SHARED(16, uint32_t, sq, [2][kBN * CS]);

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t N = w.N, K = w.K;
  const int64_t n0 = blockIdx.x * static_cast<int64_t>(kBN);
  const int64_t m0 = blockIdx.y * static_cast<int64_t>(kBM);
  const int64_t L = K / w.group_size, chunks = K / kChunk;
  const int cpg = w.group_size / kChunk;
  const int64_t g_begin = blockIdx.z * groups_per_split;
  const int64_t g_end = imin(L, g_begin + groups_per_split);
  const int64_t c_begin = g_begin * cpg, c_end = g_end * cpg;
  const int rows = static_cast<int>(imin(kBM, M - m0));  // live rows of x
  const int mtiles = (rows + 15) / 16;
  const int xrows = mtiles * 16;  // rows staged (rows past M are zeros)

  // One stage (chunks c0 .. c0+3, c0 a multiple of 4, so that b = 2 and 3
  // code words start on 16-byte boundaries) of x and codes: global -> shared
  // memory with cp.async (16 bytes each, zero-filled where the row ends).
  auto issue_stage = [&](int buf, int64_t c0) {
#pragma unroll
    for (int j = 0; j < kXVecsPerThread; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const int row = i / kXVecsPerRow, v = i % kXVecsPerRow;
      if (row >= xrows) continue;  // m16 tiles no warp computes
      const bool live = row < rows && c0 + v / (kChunk * 2 / 16) < chunks;
      const T* src = live ? x + (m0 + row) * K + c0 * kChunk + v * 8 : x;
      cp_async_16(sx[buf] + row * kXStride + v * 8, src, live);
    }
#pragma unroll
    for (int j = 0; j < QV; ++j) {
      const int i = threadIdx.x + j * kThreads;
      if (i >= kBN * BITS) break;
      const int row = i / BITS, part = i % BITS;
      const int64_t w0 = c0 * BITS + 4 * part;
      // Words of chunks outside this split but inside the padded row are
      // copied and never used; a vector past the row is zero-filled (rows
      // are whole 16-byte vectors, so no vector is cut by the row's end).
      const bool live = n0 + row < N && w0 < w.stride_words;
      const uint32_t* src = live ? w.packed + (n0 + row) * w.stride_words + w0 : w.packed;
      cp_async_16(sq[buf] + row * CS + 4 * part, src, live);
    }
    cp_async_commit();
  };

  float acc[4][2][4];  // this group's unscaled q . x
  float tot[4][2][4];  // the running sum over groups
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = tot[mt][nt][i] = 0.f;

  // Fold group g: tot += scale * acc + zero * group_sums; acc = 0.
  auto fold = [&](int64_t g) {
    float s[2][2], z[2][2];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t n = n0 + warp * 16 + nt * 8 + tig * 2 + j;
        s[nt][j] = n < N ? load_store(w.scale, n * L + g, w.scale_type) : 0.f;
        z[nt][j] = n < N ? load_store(w.zero, n * L + g, w.zero_type) : 0.f;
      }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      if (mt >= mtiles) break;
      float xs[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + mt * 16 + gid + 8 * h;
        float v = 0.f;
        if (m < M)
          for (int c = 0; c < cpg; ++c) v += chunk_sums[m * chunks + g * cpg + c];
        xs[h] = v;
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          tot[mt][nt][i] = fmaf(s[nt][i & 1], acc[mt][nt][i], fmaf(z[nt][i & 1], xs[i >> 1], tot[mt][nt][i]));
          acc[mt][nt][i] = 0.f;
        }
    }
  };

  // Stages start at multiples of 4 chunks; a split's first and last stage
  // compute only their chunks in [c_begin, c_end).
  const int64_t s_begin = c_begin / kStageChunks * kStageChunks;
  if (c_begin < c_end) issue_stage(0, s_begin);
  int buf = 0;
  for (int64_t c0 = s_begin; c0 < c_end; c0 += kStageChunks, buf ^= 1) {
    if (c0 + kStageChunks < c_end) {
      issue_stage(buf ^ 1, c0 + kStageChunks);  // in flight during this stage's MMAs
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this stage have landed
    const T* sxb = sx[buf];
    const uint32_t* sqb = sq[buf];
    const int c_lo = c_begin > c0 ? static_cast<int>(c_begin - c0) : 0;
    const int c_hi = static_cast<int>(imin(kStageChunks, c_end - c0));
#pragma unroll 1
    for (int c = c_lo; c < c_hi; ++c) {
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        const int i0 = kk * 16 + tig * 2;
        uint32_t bf[2][2];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const uint32_t* words = sqb + (warp * 16 + nt * 8 + gid) * CS + c * BITS;
          bf[nt][0] = Mma<T>::codes(get_code(words, i0, BITS), get_code(words, i0 + 1, BITS));
          bf[nt][1] = Mma<T>::codes(get_code(words, i0 + 8, BITS), get_code(words, i0 + 9, BITS));
        }
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          if (mt >= mtiles) break;
          const T* xa = sxb + (mt * 16 + gid) * kXStride + c * kChunk + i0;
          const uint32_t af[4] = {ld_shared_u32(xa), ld_shared_u32(xa + 8 * kXStride), ld_shared_u32(xa + 8),
                                  ld_shared_u32(xa + 8 * kXStride + 8)};
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) Mma<T>::run(acc[mt][nt], af, bf[nt]);
        }
      }
      const int64_t ci = c0 + c;
      if ((ci + 1) % cpg == 0) fold(ci / cpg);
    }
    __syncthreads();  // all reads of this buffer are done before it is refilled
  }

  // Epilogue: partial sums (split-K), or bias + adapter + store.
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    if (mt >= mtiles) break;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + mt * 16 + gid + 8 * (i >> 1);
        const int64_t n = n0 + warp * 16 + nt * 8 + tig * 2 + (i & 1);
        if (m >= M || n >= N) continue;
        const float v = tot[mt][nt][i];
        if (partial) {
          partial[(static_cast<int64_t>(blockIdx.z) * M + m) * N + n] = v;
        } else {
          y[m * N + n] = Mma<T>::out(epilogue(v, bias, n, u ? u + m * rank : nullptr, B + n * rank, rank));
        }
      }
  }
#else
  __trap();  // the binding only picks this kernel on sm_80 and newer
#endif
}

}  // namespace

int mma_splits(const PackedView& w, int64_t M, int sms) {
  const int64_t L = w.K / w.group_size, chunks = w.K / kChunk;
  const int64_t blocks = ((w.N + kBN - 1) / kBN) * ((M + kBM - 1) / kBM);
  int64_t splits = 1;
  // Two blocks per multiprocessor, while each split keeps at least 4 stages.
  while (blocks * splits < 2 * sms && chunks / (2 * splits) >= 4 * kStageChunks && 2 * splits <= L) splits *= 2;
  const int64_t per = (L + splits - 1) / splits;  // whole groups per split
  return static_cast<int>((L + per - 1) / per);
}

cudaError_t launch_mma_gemm(const PackedView& w, const void* x, FloatType xt, int64_t M, const float* chunk_sums,
                            const float* bias, const float* u, const float* B, int64_t rank, void* y, int splits,
                            float* workspace, cudaStream_t s) {
  if (M < 1 || splits < 1 || (splits > 1 && !workspace) || xt == FloatType::kFloat32) return cudaErrorInvalidValue;
  const int64_t L = w.K / w.group_size;
  const int64_t per = (L + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>((w.N + kBN - 1) / kBN), static_cast<unsigned>((M + kBM - 1) / kBM),
                  static_cast<unsigned>(splits));
  cudaError_t err = by_bits(w.bits, [&](auto bits_tag) -> cudaError_t {
    constexpr int BITS = decltype(bits_tag)::value;
    if (xt == FloatType::kFloat16)
      QALORA_LAUNCH(grid, kThreads, 0, s, mma_gemm_kernel<BITS, __half>)(
          w, static_cast<const __half*>(x), M, chunk_sums, bias, u, B, rank, static_cast<__half*>(y),
          splits > 1 ? workspace : nullptr, per);
    else
      QALORA_LAUNCH(grid, kThreads, 0, s, mma_gemm_kernel<BITS, __nv_bfloat16>)(
          w, static_cast<const __nv_bfloat16*>(x), M, chunk_sums, bias, u, B, rank,
          static_cast<__nv_bfloat16*>(y), splits > 1 ? workspace : nullptr, per);
    return cudaGetLastError();
  });
  if (err != cudaSuccess || splits == 1) return err;
  return launch_split_reduce(workspace, splits, M, w.N, bias, u, B, rank, y, xt, s);
}

}  // namespace cuda
}  // namespace qalora
