// CPU kernels of qalora_ext: raw pointers in, no torch headers.
//
// The hot kernels (forward, grad_input, dequantize) are compiled once per
// instruction set from cpu/kernels_impl.h and reached through a KernelTable
// chosen at run time (cpu/isa.cpp); the build never uses -march=native, so
// one binary runs on any x86-64 / aarch64 CPU. Threading is the caller's:
// every kernel works on a range ([n0, n1) rows or [g0, g1) groups) so the
// binding can hand ranges to torch's intra-op thread pool.
#pragma once

#include <cstdint>

#include "qalora/format.h"

namespace qalora {
namespace cpu {

// A packed weight in layout 1 (see qalora/format.h), described by pointers.
struct PackedView {
  const uint32_t* packed;  // (N, stride_words)
  int64_t stride_words;
  const void* scale;  // (N, L) in scale_type
  StoreType scale_type;
  const void* zero;  // (N, L) in zero_type
  StoreType zero_type;
  int64_t N, K;
  int bits;
  int group_size;
  int64_t groups() const { return K / group_size; }
};

// The largest M the small-M kernels take (they keep M accumulators per row).
constexpr int64_t kMaxSmallM = 64;

struct KernelTable {
  const char* name;
  // y[m, n] for rows n in [n0, n1), m in [0, M) (M <= kMaxSmallM):
  //   sum_g scale[n,g] * (q[n, g] . x[m, g]) + zero[n,g] * xsum[m,g]
  //   + bias[n] + sum_r u[m, r] * B[n, r]
  // x: (M, K); xsum: (M, L) group sums of x; bias (N) or null;
  // u: (M, rank) and B: (N, rank) or null; y: (M, N).
  void (*forward_rows)(const PackedView& w, const float* x, int64_t M, const float* xsum, const float* bias,
                       const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1);
  // gx[m, k] for the columns of groups [g0, g1), m in [0, M):
  //   sum_n gyT[n, m] * W~[n, k] + group_add[m, k / G]
  // gyT: (N, M) (the upstream gradient, transposed); group_add (M, L) or null; gx: (M, K).
  void (*grad_input_groups)(const PackedView& w, const float* gyT, int64_t M, const float* group_add, float* gx,
                            int64_t g0, int64_t g1);
  // out[(n - n0), k] = W~[n, k] for rows [n0, n1); out has row stride K.
  void (*dequantize_rows)(const PackedView& w, float* out, int64_t n0, int64_t n1);
  // xsum[m, g] = sum of x[m, g*G : (g+1)*G] for m in [m0, m1).
  void (*group_sums)(const float* x, int64_t K, int64_t group_size, float* xsum, int64_t m0, int64_t m1);
};

// Per-ISA tables (cpu/kernels_isa.cpp compiled with different flags).
const KernelTable* kernel_table_scalar();
#if defined(QALORA_HAVE_AVX2)
const KernelTable* kernel_table_avx2();
#endif
#if defined(QALORA_HAVE_AVX512)
const KernelTable* kernel_table_avx512();
#endif
#if defined(QALORA_HAVE_NEON)
const KernelTable* kernel_table_neon();
#endif

// The table in use: the best this CPU supports, or the one forced by
// set_isa() / the QALORA_CPU_ISA environment variable ("scalar", "avx2",
// "avx512", "neon", "auto"). set_isa returns false for an ISA this build or
// this CPU does not have.
const KernelTable& active_kernels();
bool set_isa(const char* name);
const char* active_isa();
const char* best_isa();
const char* compiled_isas();  // comma-separated

// ---- Non-hot kernels (one build, no ISA variants) ------------------------

// RTN quantization (SPEC) of rows [n0, n1) of w (N, K) float32.
void quantize_rtn_rows(const float* w, int64_t K, int bits, int group_size, void* scale, StoreType scale_type,
                       void* zero, StoreType zero_type, uint32_t* packed, int64_t stride_words, int64_t n0,
                       int64_t n1);
// codes (N, K) uint8 -> packed, rows [n0, n1). Codes must be < 2^bits.
void pack_rows(const uint8_t* codes, int64_t K, int bits, uint32_t* packed, int64_t stride_words, int64_t n0,
               int64_t n1);
// packed -> codes (N, K) uint8, rows [n0, n1).
void unpack_rows(const uint32_t* packed, int64_t stride_words, int64_t K, int bits, uint8_t* codes, int64_t n0,
                 int64_t n1);

}  // namespace cpu
}  // namespace qalora
