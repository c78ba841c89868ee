// Tensor-core grad_input straight from the packed codes (mma.sync m16n8k16:
// float16 or bfloat16 in, float32 accumulate; sm_80 and newer):
//
//   grad_x[m, k] = sum_n grad_y[m, n] * W~[n, k]  (+ group_add[m, k / G])
//
// the transposed product of the forward. The contraction runs over the
// weight's rows n, and each row has its own scale, so the codes cannot enter
// the MMA as integers here: every weight is dequantized in registers,
// W~ = scale * q + zero in float32, rounded once to the activations' dtype
// (what the dequantize + cuBLAS path rounds too), straight into the B
// fragment. group_add is the adapter's term of SPEC's grad_x (one value per
// row and group, computed by the binding), added in the epilogue.
//
// Tiling. A block owns 64 rows of grad_y (M) by 64 input channels (K) and
// walks N in stages of 32 weight rows (two k16 steps). Its 4 warps sit side
// by side along K, 16 channels each (two n8 tiles), all four m16 tiles; a
// warp skips m16 tiles past the last row. Per stage, with cp.async into two
// shared buffers (one computed, one in flight):
//   grad_y: 64 rows x 32 values, rows padded to 40 values (80 bytes: the
//           A-fragment reads of a warp hit 32 different banks);
//   codes:  32 weight rows x the 2 chunks of this block's 64 channels
//           (2b words, rows padded to 2b + 1 words against bank conflicts),
//           copied 4 bytes at a time (for b = 3 a chunk pair does not start
//           on a 16-byte boundary);
//   scales and zeros of those 32 rows x 2 chunks, as float32.
// B fragment of lane (g, t) for n8 tile j: rows 2t, 2t+1 and 2t+8, 2t+9 of
// the k16 step, channel 8j + g: four codes from four rows.
//
// Needs grad_y rows on 16-byte boundaries (N % 8 == 0, aligned base); the
// binding takes the dequantize + cuBLAS path otherwise. No split, no atomics:
// deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/launchers.cuh"
#include "cuda/mma_sm80.cuh"

namespace qalora {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kBM = 64;       // rows of grad_y per block
constexpr int kBK = 64;       // input channels per block (two chunks)
constexpr int kStageN = 32;   // weight rows per stage
constexpr int kThreads = 128;  // 4 warps along K
constexpr int kGStride = kStageN + 8;  // values per grad_y row in shared memory
constexpr int kGVecsPerRow = kStageN * 2 / 16;  // 16-byte vectors per grad_y row per stage (4)

template <int BITS>
constexpr int kCodeWords = 2 * BITS;  // words of the block's two chunks in one weight row
template <int BITS>
constexpr int kCodeStride = 2 * BITS + 1;  // their row stride in shared memory (odd: no bank conflicts)

using sm80::cp_async_16;
using sm80::cp_async_4;
using sm80::cp_async_commit;
using sm80::cp_async_wait;
using sm80::imin;
using sm80::ld_shared_u32;
using sm80::Mma;

template <int BITS, typename T>
__global__ void __launch_bounds__(kThreads)
    grad_mma_kernel(PackedView w, const T* __restrict__ gy, int64_t M, const float* __restrict__ group_add,
                    T* __restrict__ gx) {
#if QALORA_SM80
  constexpr int CW = kCodeWords<BITS>;
  constexpr int CS = kCodeStride<BITS>;
  QALORA_SHARED(16, T, sg, [2][kBM * kGStride]);
  QALORA_SHARED(16, uint32_t, sq, [2][kStageN * CS]);
  QALORA_SHARED(4, float, ss, [2][kStageN * 2]);
  QALORA_SHARED(4, float, sz, [2][kStageN * 2]);

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int gid = lane >> 2, tig = lane & 3;
  const int64_t N = w.N, K = w.K, L = K / w.group_size, chunks = K / kChunk;
  const int64_t k0 = blockIdx.x * static_cast<int64_t>(kBK);
  const int64_t m0 = blockIdx.y * static_cast<int64_t>(kBM);
  const int64_t c0 = k0 / kChunk;  // the block's first chunk (even)
  const int rows = static_cast<int>(imin(kBM, M - m0));
  const int mtiles = (rows + 15) / 16;
  const int grows = mtiles * 16;

  // Stage at weight rows n0 .. n0+31 into buffer `buf`.
  auto issue_stage = [&](int buf, int64_t n0) {
    // grad_y: grows x 32 values, 4 vectors per row, 2 per thread at most.
#pragma unroll
    for (int j = 0; j < kBM * kGVecsPerRow / kThreads; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const int row = i / kGVecsPerRow, v = i % kGVecsPerRow;
      if (row >= grows) continue;
      const bool live = row < rows && n0 + v * 8 < N;  // N % 8 == 0: a vector is all in or all out
      const T* src = live ? gy + (m0 + row) * N + n0 + v * 8 : gy;
      cp_async_16(sg[buf] + row * kGStride + v * 8, src, live);
    }
    // codes: 32 rows x 2b words.
    for (int i = threadIdx.x; i < kStageN * CW; i += kThreads) {
      const int row = i / CW, word = i % CW;
      const int64_t chunk = c0 + word / BITS;
      const bool live = n0 + row < N && chunk < chunks;
      const uint32_t* src = live ? w.packed + (n0 + row) * w.stride_words + c0 * BITS + word : w.packed;
      cp_async_4(sq[buf] + row * CS + word, src, live);
    }
    cp_async_commit();
    // scales and zeros (plain loads: they are converted from their storage dtype).
    if (threadIdx.x < kStageN * 2) {
      const int row = threadIdx.x / 2, j = threadIdx.x % 2;
      const int64_t n = n0 + row, chunk = c0 + j;
      const bool live = n < N && chunk < chunks;
      const int64_t g = chunk * kChunk / w.group_size;
      ss[buf][threadIdx.x] = live ? load_store(w.scale, n * L + g, w.scale_type) : 0.f;
      sz[buf][threadIdx.x] = live ? load_store(w.zero, n * L + g, w.zero_type) : 0.f;
    }
  };

  float acc[4][2][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  // This warp's 16 channels lie in one chunk: chunk j = warp / 2.
  const int jc = warp / 2;
  issue_stage(0, 0);
  int buf = 0;
  for (int64_t n0 = 0; n0 < N; n0 += kStageN, buf ^= 1) {
    if (n0 + kStageN < N) {
      issue_stage(buf ^ 1, n0 + kStageN);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* sgb = sg[buf];
    const uint32_t* sqb = sq[buf];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int r0 = kk * 16 + tig * 2;  // the four weight rows of this lane: r0, r0+1, r0+8, r0+9
      float s[4], z[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + (e & 1) + 8 * (e >> 1);
        s[e] = ss[buf][r * 2 + jc];
        z[e] = sz[buf][r * 2 + jc];
      }
      uint32_t bf[2][2];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int col = (warp % 2) * 16 + nt * 8 + gid;  // channel within chunk jc
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = r0 + (e & 1) + 8 * (e >> 1);
          const float q = static_cast<float>(get_code(sqb + r * CS + jc * BITS, col, BITS));
          v[e] = fmaf(s[e], q, z[e]);
        }
        bf[nt][0] = Mma<T>::pack(v[0], v[1]);
        bf[nt][1] = Mma<T>::pack(v[2], v[3]);
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        if (mt >= mtiles) break;
        const T* ga = sgb + (mt * 16 + gid) * kGStride + kk * 16 + tig * 2;
        const uint32_t af[4] = {ld_shared_u32(ga), ld_shared_u32(ga + 8 * kGStride), ld_shared_u32(ga + 8),
                                ld_shared_u32(ga + 8 * kGStride + 8)};
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) Mma<T>::run(acc[mt][nt], af, bf[nt]);
      }
    }
    __syncthreads();  // all reads of this buffer are done before it is refilled
  }

#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    if (mt >= mtiles) break;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + mt * 16 + gid + 8 * (i >> 1);
        const int64_t k = k0 + warp * 16 + nt * 8 + tig * 2 + (i & 1);
        if (m >= M || k >= K) continue;
        float v = acc[mt][nt][i];
        if (group_add) v += group_add[m * L + k / w.group_size];
        gx[m * K + k] = Mma<T>::out(v);
      }
  }
#else
  __trap();  // the binding only picks this kernel on sm_80 and newer
#endif
}

}  // namespace

cudaError_t launch_grad_mma(const PackedView& w, const void* grad_out, FloatType t, int64_t M,
                            const float* group_add, void* grad_x, cudaStream_t s) {
  if (M < 1 || w.N < 1 || t == FloatType::kFloat32 || w.N % 8 != 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((w.K + kBK - 1) / kBK), static_cast<unsigned>((M + kBM - 1) / kBM));
  auto go = [&](auto bits_tag) -> cudaError_t {
    constexpr int BITS = decltype(bits_tag)::value;
    if (t == FloatType::kFloat16)
      QALORA_LAUNCH(grid, kThreads, 0, s, grad_mma_kernel<BITS, __half>)(w, static_cast<const __half*>(grad_out), M, group_add,
                                                              static_cast<__half*>(grad_x));
    else
      QALORA_LAUNCH(grid, kThreads, 0, s, grad_mma_kernel<BITS, __nv_bfloat16>)(
          w, static_cast<const __nv_bfloat16*>(grad_out), M, group_add, static_cast<__nv_bfloat16*>(grad_x));
    return cudaGetLastError();
  };
  return by_bits(w.bits, go);
}

}  // namespace cuda
}  // namespace qalora
