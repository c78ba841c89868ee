// The launchers of qalora_ext's CUDA kernels: raw pointers and a stream in, no
// torch headers. Defined in qlinear_prologue.cu (chunk sums, adapter input),
// gemv.cu (GEMV, split-K reduce), gemm_mma.cu, grad_mma.cu and
// format_kernels.cu (dequantize, pack, unpack, RTN).
//
// Every launcher returns the launch's cudaError_t; the binding
// (cuda/ops_cuda.cpp) checks inputs, picks the path by M, guards the device
// and passes the current stream. Templates are instantiated over bits (2, 3,
// 4) and activation dtype (FloatType) only; group size, rank and shapes are
// run-time values.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "qalora/format.h"

namespace qalora {
namespace cuda {

// Calls fn(std::integral_constant<int, BITS>{}) for bits 2, 3, 4 (the
// launchers' one compile-time dispatch); cudaErrorInvalidValue otherwise.
template <typename Fn>
cudaError_t by_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: return cudaErrorInvalidValue;
  }
}

// The largest M the fused GEMV serves (it keeps M accumulators per thread).
constexpr int kGemvMaxM = 8;

// chunk_sums[m, c] = sum of x[m, 32c : 32c + 32] (float32), (M, K/32): the
// group sums of x at the chunk's granularity (a group's sum is the sum of its
// G/32 chunk sums), what the kernels below take for the zeros' term.
cudaError_t launch_chunk_sums(const void* x, FloatType xt, int64_t M, int64_t K, float* chunk_sums, cudaStream_t s);

// The adapter's input: u[m, r] = scaling / G * sum_g mask[m, g] * group_sums[m, g] * A[r, g],
// group_sums from chunk_sums. mask (M, L) float32 or null; A (rank, L) float32.
cudaError_t launch_adapter_input(const float* chunk_sums, const float* mask, const float* A, int64_t M, int64_t L,
                                 int64_t rank, int group_size, float scaling, float* u, cudaStream_t s);

// Fused dequant-GEMV for M <= kGemvMaxM:
//   y[m, n] = sum_g scale * (q . x)_g + zero * group_sums_g + bias[n] + sum_r u[m, r] B[n, r]
// x (M, K) and y (M, N) in x's dtype; bias (N) float32 or null; u (M, r) and
// B (N, r) float32 or null. `splits` > 1 splits K over blocks: partial sums go
// to `workspace` (splits * M * N floats) and a second kernel adds them in a
// fixed order (deterministic, no atomics).
cudaError_t launch_gemv(const PackedView& w, const void* x, FloatType xt, int64_t M, const float* chunk_sums,
                        const float* bias, const float* u, const float* B, int64_t rank, void* y, int splits,
                        float* workspace, cudaStream_t s);
// The split count launch_gemv should use on a device with `sms` multiprocessors.
int gemv_splits(const PackedView& w, int sms);

// Second pass of a split-K launch: y[m, n] = sum of the `splits` partial sums
// (added in order) + the adapter's u . B[n] + bias[n], in y's dtype `yt`.
cudaError_t launch_split_reduce(const float* partial, int splits, int64_t M, int64_t N, const float* bias,
                                const float* u, const float* B, int64_t rank, void* y, FloatType yt, cudaStream_t s);

// Tensor-core dequant-GEMM (mma.sync m16n8k16) for medium M, float16 or
// bfloat16 x only, sm_80 and newer. Same epilogue and split-K contract as
// launch_gemv; splits cut K at group boundaries.
cudaError_t launch_mma_gemm(const PackedView& w, const void* x, FloatType xt, int64_t M, const float* chunk_sums,
                            const float* bias, const float* u, const float* B, int64_t rank, void* y, int splits,
                            float* workspace, cudaStream_t s);
// The split count launch_mma_gemm should use for M rows on `sms` multiprocessors.
int mma_splits(const PackedView& w, int64_t M, int sms);

// Tensor-core grad_input from the packed codes (grad_mma.cu): grad_x (M, K)
// = grad_out (M, N) W~ + group_add[m, k / G] (group_add (M, L) float32 or
// null), float16 or bfloat16, sm_80 and newer; needs N % 8 == 0 and grad_out
// rows on 16-byte boundaries.
cudaError_t launch_grad_mma(const PackedView& w, const void* grad_out, FloatType t, int64_t M,
                            const float* group_add, void* grad_x, cudaStream_t s);

// out (N, K) in `out_type` = W~ (rows n0..N-1 all).
cudaError_t launch_dequantize(const PackedView& w, void* out, FloatType out_type, cudaStream_t s);

// codes (N, K) uint8 <-> packed (N, stride_words). pack writes code words
// only: the caller zeroes the padding.
cudaError_t launch_unpack(const uint32_t* packed, int64_t stride_words, int64_t N, int64_t K, int bits,
                         uint8_t* codes, cudaStream_t s);
cudaError_t launch_pack(const uint8_t* codes, int64_t N, int64_t K, int bits, uint32_t* packed,
                        int64_t stride_words, cudaStream_t s);

// RTN quantization (SPEC) of w (N, K) float32: one thread per group, the same
// float32 arithmetic as the CPU kernel, so results are bit-identical.
cudaError_t launch_quantize_rtn(const float* w, int64_t N, int64_t K, int bits, int group_size, void* scale,
                                FloatType scale_type, void* zero, FloatType zero_type, uint32_t* packed,
                                int64_t stride_words, cudaStream_t s);

}  // namespace cuda
}  // namespace qalora
