// CPU kernels of qalora_ext: raw pointers in, no torch headers.
//
// The hot kernels (forward, grad_input, dequantize) are compiled once per
// instruction set from cpu/kernels_isa.cpp and reached through a KernelTable
// chosen at run time (cpu/isa.cpp); the build never uses -march=native, so
// one binary runs on any x86-64 / aarch64 CPU. Threading is the caller's:
// every kernel works on a range ([n0, n1) rows or [g0, g1) groups) so the
// binding can hand ranges to torch's intra-op thread pool.
#pragma once

#include <cstdint>

#include "qalora/epilogue.h"
#include "qalora/format.h"

namespace qalora {
namespace cpu {

// The largest M the small-M kernels take (they keep M accumulators per row).
constexpr int64_t kMaxSmallM = 64;

struct KernelTable {
  const char* name;
  // y[m, n] for rows n in [n0, n1), m in [0, M) (M <= kMaxSmallM):
  //   sum_g scale[n,g] * (q[n, g] . x[m, g]) + zero[n,g] * group_sums[m,g]
  //   + bias[n] + sum_r u[m, r] * B[n, r]
  // x: (M, K); group_sums: (M, L) group sums of x; bias (N) or null;
  // u: (M, rank) and B: (N, rank) or null; y: (M, N).
  void (*forward_rows)(const PackedView& w, const float* x, int64_t M, const float* group_sums, const float* bias,
                       const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1);
  // gx[m, k] for the columns of groups [g0, g1), m in [0, M):
  //   sum_n gyT[n, m] * W~[n, k] + group_add[m, k / G]
  // gyT: (N, M) (the upstream gradient, transposed); group_add (M, L) or null; gx: (M, K).
  void (*grad_input_groups)(const PackedView& w, const float* gyT, int64_t M, const float* group_add, float* gx,
                            int64_t g0, int64_t g1);
  // out[(n - n0), k] = W~[n, k] for rows [n0, n1); out has row stride K.
  void (*dequantize_rows)(const PackedView& w, float* out, int64_t n0, int64_t n1);
  // out[m, g] = sum of x[m, g*G : (g+1)*G] for m in [m0, m1): the group sums
  // the kernels above take (the adapter's pooled input is group_sums / G).
  void (*group_sums)(const float* x, int64_t K, int64_t group_size, float* out, int64_t m0, int64_t m1);

  // ---- decode-sized M (M <= kGemvMaxM), float activations ----
  // Optional (null: forward_rows serves these M too). The kernel reads x in
  // its own order: prepare_f32 writes one row of x (K) into
  // prepared_len_f32(K, bits) floats; gemv_rows then works like forward_rows
  // with x given as M prepared rows.
  int64_t (*prepared_len_f32)(int64_t K, int bits);
  void (*prepare_f32)(const float* x, int64_t K, int bits, float* out);
  void (*gemv_rows)(const PackedView& w, const float* x_prepared, int64_t M, const float* group_sums, const float* bias,
                    const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1);

  // ---- int8 activations (opt-in, any M this path is used for) ----
  // x is quantized per weight group by quantize_act_i8 (xq = round(x / dx),
  // dx = max|x_g| / 127), each row of xq re-ordered by prepare_i8 into
  // prepared_len_i8(K, bits) bytes. forward_rows_i8: y rows [n0, n1) =
  //   sum_g scale * dx[m, g] * (q . xq)_g + zero * group_sums + bias + u B^T,
  // the code x xq sums in exact int32. dx: (M, L) followed by 16 zeros.
  int64_t (*prepared_len_i8)(int64_t K, int bits);
  void (*prepare_i8)(const int8_t* xq, int64_t K, int bits, int8_t* out);
  void (*forward_rows_i8)(const PackedView& w, const int8_t* xq_prepared, const float* dx, int64_t M,
                          const float* group_sums, const float* bias, const float* u, const float* B, int64_t rank,
                          float* y, int64_t n0, int64_t n1);

  // ---- bfloat16 activations (bf16 values as uint16_t bit patterns) ----
  // The operands of the large-M bf16 GEMM (cpu/bf16_gemm.h): W~ = scale * q + zero computed in float32, rounded
  // once to bf16 (nearest even), written in pairs of 32-bit words (low half the first of the pair), the layout
  // the bf16 dot-product units read (AMX / AVX512-BF16 "VNNI-2").
  // Forward, B = W~^T for rows [n0, n1), pairs along k: nb = n1 - n0,
  //   out[(k / 2) * nb + (n - n0)] = bf16(W~[n, k & ~1]) | bf16(W~[n, k | 1]) << 16.
  void (*dequantize_bf16_kpairs)(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1);
  // grad_input, B = W~ for rows [n0, n1) and the columns of groups [g0, g1), pairs along n: kb = (g1 - g0) * G,
  //   out[((n - n0) / 2) * kb + (k - g0 * G)] = bf16(W~[n & ~1, k]) | bf16(W~[n | 1, k]) << 16 (relative to n0),
  // an odd last row paired with zeros.
  void (*dequantize_bf16_npairs)(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1, int64_t g0,
                                 int64_t g1);
  // Small M, bf16 x read in place (converted element by element inside the kernel): forward_rows and
  // group_sums with x (M, K) in bfloat16.
  void (*forward_rows_bf16)(const PackedView& w, const uint16_t* x, int64_t M, const float* group_sums,
                            const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t n0,
                            int64_t n1);
  void (*group_sums_bf16)(const uint16_t* x, int64_t K, int64_t group_size, float* out, int64_t m0, int64_t m1);
};

// The largest M the gemv_rows kernels are used for.
constexpr int64_t kGemvMaxM = 4;

// Quantize rows [m0, m1) of x (M, K) per group of G (cpu/int8_activations.cpp): dx[m, g] = max|x| / 127,
// xq = round-half-even(x * (127 / max|x|)) in [-127, 127] (0 where the group
// is all 0). Non-finite x must be refused by the caller.
void quantize_act_i8_rows(const float* x, int64_t K, int64_t group_size, int8_t* xq, float* dx, int64_t m0,
                          int64_t m1);

// Per-ISA tables (cpu/kernels_isa.cpp compiled with different flags).
const KernelTable* kernel_table_scalar();
#if defined(QALORA_HAVE_AVX2)
const KernelTable* kernel_table_avx2();
#endif
#if defined(QALORA_HAVE_AVX512)
const KernelTable* kernel_table_avx512();
#endif
#if defined(QALORA_HAVE_AVX512VNNI)
const KernelTable* kernel_table_avx512vnni();  // avx512 + hand-written decode kernels
#endif
#if defined(QALORA_HAVE_AVX2)
// The avx2 table's decode-sized entries (cpu/kernels_avx2_decode.cpp).
namespace avx2_decode {
int64_t prepared_len_f32(int64_t K, int bits);
void prepare_f32(const float* x, int64_t K, int bits, float* out);
void gemv_rows(const PackedView& w, const float* x_prepared, int64_t M, const float* group_sums, const float* bias,
               const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1);
}  // namespace avx2_decode
#endif
#if defined(QALORA_HAVE_AVX512)
// The avx512 tables' bf16 GEMM operands (cpu/kernels_avx512_bf16.cpp, AVX-512F/BW).
namespace avx512_bf16 {
void dequantize_bf16_kpairs(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1);
void dequantize_bf16_npairs(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1, int64_t g0, int64_t g1);
}  // namespace avx512_bf16
#endif
#if defined(QALORA_HAVE_NEON)
const KernelTable* kernel_table_neon();
#endif

// The table in use: the best this CPU supports, or the one forced by
// set_isa() / the QALORA_CPU_ISA environment variable ("scalar", "avx2",
// "avx512", "avx512vnni", "neon", "auto"). set_isa returns false for an ISA this build or
// this CPU does not have.
const KernelTable& active_kernels();
bool set_isa(const char* name);
const char* active_isa();
const char* best_isa();
const char* compiled_isas();  // comma-separated

// ---- Non-hot kernels (one build, no ISA variants) ------------------------

// The adapter's input at small M (cpu/adapter_input.cpp): u[m, r] = factor * sum_g mask[m, g] *
// group_sums[m, g] * A[r, g] (mask null: all ones); factor = scaling / G.
void adapter_input(const float* group_sums, const float* mask, const float* A, int64_t M, int64_t L, int64_t rank,
                          double factor, float* u);

// The packed format's kernels (cpu/format_kernels.cpp).
// RTN quantization (SPEC) of rows [n0, n1) of w (N, K) float32.
void quantize_rtn_rows(const float* w, int64_t K, int bits, int group_size, void* scale, FloatType scale_type,
                       void* zero, FloatType zero_type, uint32_t* packed, int64_t stride_words, int64_t n0,
                       int64_t n1);
// codes (N, K) uint8 -> packed, rows [n0, n1). Codes must be < 2^bits.
void pack_rows(const uint8_t* codes, int64_t K, int bits, uint32_t* packed, int64_t stride_words, int64_t n0,
               int64_t n1);
// packed -> codes (N, K) uint8, rows [n0, n1).
void unpack_rows(const uint32_t* packed, int64_t stride_words, int64_t K, int bits, uint8_t* codes, int64_t n0,
                 int64_t n1);

}  // namespace cpu
}  // namespace qalora
