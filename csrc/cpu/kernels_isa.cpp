// The hot CPU kernels, written once and compiled once per instruction set.
//
// CMake builds this file several times with different flags and a different
// QALORA_ISA (scalar; avx2 with -mavx2 -mfma; avx512; neon) and each copy
// defines qalora::cpu::kernel_table_<ISA>(). The loops are written for the
// compiler's vectorizer: fixed-size chunk buffers, unit-stride inner loops,
// `omp simd` reductions (-fopenmp-simd; the scalar copy is built without it
// and with -fno-tree-vectorize so it really is the scalar fallback).
//
// Everything here lives in an ISA-named namespace and uses no std templates:
// a weak symbol shared between copies could let the linker run AVX-512 code
// on the scalar path.
#include "cpu/kernels.h"

#ifndef QALORA_ISA
#error "QALORA_ISA must name the instruction set of this copy"
#endif

#define QALORA_CAT2(a, b) a##b
#define QALORA_CAT(a, b) QALORA_CAT2(a, b)
#define QALORA_STR2(a) #a
#define QALORA_STR(a) QALORA_STR2(a)

#if defined(__GNUC__)
#define QALORA_SIMD_REDUCE(v) _Pragma(QALORA_STR(omp simd reduction(+ : v)))
#define QALORA_SIMD _Pragma("omp simd")
#else
#define QALORA_SIMD_REDUCE(v)
#define QALORA_SIMD
#endif

namespace qalora {
namespace cpu {
namespace QALORA_ISA {
namespace {

constexpr int kMaxGroup = 128;

// Codes of group g of row n as floats (G values), chunk by chunk.
template <int BITS>
inline void unpack_group(const uint32_t* row, int64_t g, int G, float* out) {
  const uint32_t* words = row + g * (G / kChunk) * BITS;
  for (int c = 0; c < G / kChunk; ++c) unpack_chunk<BITS, float>(words + c * BITS, out + c * kChunk);
}

// An activation as float: x is float32 or bfloat16 bits (uint16_t), the latter
// widened in place (a shift), so the bf16 kernels never convert x as a whole.
inline float xval(const float* p, int64_t i) { return p[i]; }
inline float xval(const uint16_t* p, int64_t i) { return bits_float(static_cast<uint32_t>(p[i]) << 16); }

template <typename XT>
inline float dot(const float* a, const XT* b, int n) {
  float s = 0.f;
  QALORA_SIMD_REDUCE(s)
  for (int i = 0; i < n; ++i) s += a[i] * xval(b, i);
  return s;
}

// Rows handled together by the blocked forward kernel: one SIMD register of
// floats, each lane a different output row, so every code position is the
// same shift for all lanes (b = 3 straddles included) and the x value is a
// broadcast.
#if defined(QALORA_ROW_LANES)
constexpr int kLanes = QALORA_ROW_LANES;
#else
constexpr int kLanes = 8;
#endif

// Code i of a chunk for each of kLanes rows, from the chunk's words
// wv[word][lane]. `i` is a compile-time constant after unrolling.
template <int BITS>
inline void chunk_codes(const uint32_t (*wv)[kLanes], int i, float* q) {
  constexpr uint32_t mask = (1u << BITS) - 1u;
  const int bit = i * BITS, word = bit >> 5, shift = bit & 31;
  if (shift + BITS <= 32) {
    QALORA_SIMD
    for (int r = 0; r < kLanes; ++r) q[r] = static_cast<float>((wv[word][r] >> shift) & mask);
  } else {
    QALORA_SIMD
    for (int r = 0; r < kLanes; ++r)
      q[r] = static_cast<float>(((wv[word][r] >> shift) | (wv[word + 1][r] << (32 - shift))) & mask);
  }
}

// scale or zero of group g for kLanes consecutive rows (stride L apart), as
// floats. The dtype switch sits outside the lane loop so the conversion
// vectorizes (F16C's vcvtph2ps where this copy is built with it).
inline void load_lanes(const void* base, int64_t i0, int64_t stride, FloatType t, float* out) {
  switch (t) {
    case FloatType::kFloat16: {
#if defined(__F16C__) && defined(__FLT16_MAX__)
      const _Float16* p = static_cast<const _Float16*>(base) + i0;
      for (int r = 0; r < kLanes; ++r) out[r] = static_cast<float>(p[r * stride]);
#else
      const uint16_t* p = static_cast<const uint16_t*>(base) + i0;
      for (int r = 0; r < kLanes; ++r) out[r] = half_bits_to_float(p[r * stride]);
#endif
      break;
    }
    case FloatType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + i0;
      for (int r = 0; r < kLanes; ++r) out[r] = bits_float(static_cast<uint32_t>(p[r * stride]) << 16);
      break;
    }
    default: {
      const float* p = static_cast<const float*>(base) + i0;
      for (int r = 0; r < kLanes; ++r) out[r] = p[r * stride];
    }
  }
}

// y for rows [n0, n0 + kLanes) and activation rows [m0, m0 + MT): the
// small-M hot loop. MT is a compile-time count so the MT x kLanes group
// accumulators live in registers; larger M is done MT rows of x at a time
// (the row block's codes stay in L1/L2 between passes).
template <int BITS, int MT, typename XT>
void forward_row_block(const PackedView& w, const XT* x, const float* group_sums, float* out /* M x kLanes */,
                       int64_t n0, int64_t m0) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t K = w.K;
  float acc[MT][kLanes];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < kLanes; ++r) acc[m][r] = 0.f;
  const uint32_t* rows[kLanes];
  for (int r = 0; r < kLanes; ++r) rows[r] = w.packed + (n0 + r) * w.stride_words;
  const XT* xm = x + m0 * K;
  for (int64_t g = 0; g < L; ++g) {
    float gacc[MT][kLanes];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < kLanes; ++r) gacc[m][r] = 0.f;
    for (int c = 0; c < G / kChunk; ++c) {
      const int64_t word0 = (g * (G / kChunk) + c) * BITS;
      uint32_t wv[BITS][kLanes];
      for (int b = 0; b < BITS; ++b)
        for (int r = 0; r < kLanes; ++r) wv[b][r] = rows[r][word0 + b];
      const int64_t k0 = g * G + c * kChunk;
#pragma GCC unroll 32
      for (int i = 0; i < kChunk; ++i) {
        float q[kLanes];
        chunk_codes<BITS>(wv, i, q);
        for (int m = 0; m < MT; ++m) {
          const float xv = xval(xm, m * K + k0 + i);
          QALORA_SIMD
          for (int r = 0; r < kLanes; ++r) gacc[m][r] += q[r] * xv;
        }
      }
    }
    float s[kLanes], z[kLanes];
    load_lanes(w.scale, n0 * L + g, L, w.scale_type, s);
    load_lanes(w.zero, n0 * L + g, L, w.zero_type, z);
    for (int m = 0; m < MT; ++m) {
      const float xs = group_sums[(m0 + m) * L + g];
      QALORA_SIMD
      for (int r = 0; r < kLanes; ++r) acc[m][r] += s[r] * gacc[m][r] + z[r] * xs;
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < kLanes; ++r) out[(m0 + m) * kLanes + r] = acc[m][r];
}

template <int BITS, typename XT>
void forward_rows_block_allm(const PackedView& w, const XT* x, int64_t M, const float* group_sums, float* out,
                             int64_t n0) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) forward_row_block<BITS, 4, XT>(w, x, group_sums, out, n0, m0);
  switch (M - m0) {
    case 3: forward_row_block<BITS, 3, XT>(w, x, group_sums, out, n0, m0); break;
    case 2: forward_row_block<BITS, 2, XT>(w, x, group_sums, out, n0, m0); break;
    case 1: forward_row_block<BITS, 1, XT>(w, x, group_sums, out, n0, m0); break;
    default: break;
  }
}

// One row at a time: the tail of a range that is not a whole row block.
template <int BITS, typename XT>
void forward_rows_single(const PackedView& w, const XT* x, int64_t M, const float* group_sums,
                         float* out /* M x 1 */, int64_t n) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t K = w.K;
  alignas(64) float q[kMaxGroup];
  const uint32_t* row = w.packed + n * w.stride_words;
  for (int64_t m = 0; m < M; ++m) out[m] = 0.f;
  for (int64_t g = 0; g < L; ++g) {
    unpack_group<BITS>(row, g, G, q);
    const float s = load_store(w.scale, n * L + g, w.scale_type);
    const float z = load_store(w.zero, n * L + g, w.zero_type);
    for (int64_t m = 0; m < M; ++m) out[m] += s * dot(q, x + m * K + g * G, G) + z * group_sums[m * L + g];
  }
}

template <int BITS, typename XT>
void forward_rows_t(const PackedView& w, const XT* x, int64_t M, const float* group_sums, const float* bias,
                    const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1) {
  const int64_t N = w.N;
  float out[kMaxSmallM * kLanes];
  int64_t n = n0;
  while (n < n1) {
    const int rows = n + kLanes <= n1 ? kLanes : 1;
    if (rows == kLanes) {
      forward_rows_block_allm<BITS, XT>(w, x, M, group_sums, out, n);
    } else {
      forward_rows_single<BITS, XT>(w, x, M, group_sums, out, n);
    }
    // Epilogue: bias and the adapter's u @ B^T for these rows.
    for (int r = 0; r < rows; ++r)
      for (int64_t m = 0; m < M; ++m)
        y[m * N + n + r] =
            epilogue(out[m * rows + r], bias, n + r, u ? u + m * rank : nullptr, B + (n + r) * rank, rank);
    n += rows;
  }
}

template <int BITS>
void grad_input_groups_t(const PackedView& w, const float* gyT, int64_t M, const float* group_add, float* gx,
                         int64_t g0, int64_t g1) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t K = w.K, N = w.N;
  const int64_t k0 = g0 * G, k1 = g1 * G;
  for (int64_t m = 0; m < M; ++m) {
    float* out = gx + m * K;
    for (int64_t k = k0; k < k1; ++k) out[k] = group_add ? group_add[m * L + k / G] : 0.f;
  }
  alignas(64) float wv[kMaxGroup];
  for (int64_t n = 0; n < N; ++n) {
    const uint32_t* row = w.packed + n * w.stride_words;
    const float* gy = gyT + n * M;
    for (int64_t g = g0; g < g1; ++g) {
      unpack_group<BITS>(row, g, G, wv);
      const float s = load_store(w.scale, n * L + g, w.scale_type);
      const float z = load_store(w.zero, n * L + g, w.zero_type);
      QALORA_SIMD
      for (int i = 0; i < G; ++i) wv[i] = s * wv[i] + z;
      for (int64_t m = 0; m < M; ++m) {
        const float a = gy[m];
        float* out = gx + m * K + g * G;
        QALORA_SIMD
        for (int i = 0; i < G; ++i) out[i] += a * wv[i];
      }
    }
  }
}

template <int BITS>
void dequantize_rows_t(const PackedView& w, float* out, int64_t n0, int64_t n1) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = w.packed + n * w.stride_words;
    float* o = out + (n - n0) * w.K;
    for (int64_t g = 0; g < L; ++g) {
      unpack_group<BITS>(row, g, G, o + g * G);
      const float s = load_store(w.scale, n * L + g, w.scale_type);
      const float z = load_store(w.zero, n * L + g, w.zero_type);
      float* og = o + g * G;
      QALORA_SIMD
      for (int i = 0; i < G; ++i) og[i] = s * og[i] + z;
    }
  }
}

template <typename XT>
void group_sums_t(const XT* x, int64_t K, int64_t G, float* out, int64_t m0, int64_t m1) {
  const int64_t L = K / G;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < L; ++g) {
      const XT* p = x + m * K + g * G;
      float s = 0.f;
      QALORA_SIMD_REDUCE(s)
      for (int64_t i = 0; i < G; ++i) s += xval(p, i);
      out[m * L + g] = s;
    }
  }
}

void group_sums(const float* x, int64_t K, int64_t G, float* out, int64_t m0, int64_t m1) {
  group_sums_t<float>(x, K, G, out, m0, m1);
}
void group_sums_bf16(const uint16_t* x, int64_t K, int64_t G, float* out, int64_t m0, int64_t m1) {
  group_sums_t<uint16_t>(x, K, G, out, m0, m1);
}

// ---- bf16 operands of the large-M bf16 GEMM (layouts: kernels.h) ----

// bf16(lo) | bf16(hi) << 16, each rounded to nearest even (finite values; a
// NaN stays a NaN as in float_to_bf16_bits). Branch-free so the lane loops vectorize.
inline uint32_t bf16_pair(float lo, float hi) {
  return static_cast<uint32_t>(float_to_bf16_bits(lo)) | (static_cast<uint32_t>(float_to_bf16_bits(hi)) << 16);
}

// Forward: kLanes rows at a time, each lane one row (as forward_row_block),
// so a pair (k, k + 1) of kLanes rows is one contiguous run of kLanes words.
template <int BITS>
void dequantize_bf16_kpairs_t(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t nb = n1 - n0;
  int64_t n = n0;
  for (; n + kLanes <= n1; n += kLanes) {
    const uint32_t* rows[kLanes];
    for (int r = 0; r < kLanes; ++r) rows[r] = w.packed + (n + r) * w.stride_words;
    for (int64_t g = 0; g < L; ++g) {
      float s[kLanes], z[kLanes];
      load_lanes(w.scale, n * L + g, L, w.scale_type, s);
      load_lanes(w.zero, n * L + g, L, w.zero_type, z);
      for (int c = 0; c < G / kChunk; ++c) {
        const int64_t word0 = (g * (G / kChunk) + c) * BITS;
        uint32_t wv[BITS][kLanes];
        for (int b = 0; b < BITS; ++b)
          for (int r = 0; r < kLanes; ++r) wv[b][r] = rows[r][word0 + b];
        const int64_t k0 = g * G + c * kChunk;
#pragma GCC unroll 16
        for (int i = 0; i < kChunk; i += 2) {
          float q0[kLanes], q1[kLanes];
          chunk_codes<BITS>(wv, i, q0);
          chunk_codes<BITS>(wv, i + 1, q1);
          uint32_t* dst = out + ((k0 + i) / 2) * nb + (n - n0);
          QALORA_SIMD
          for (int r = 0; r < kLanes; ++r) dst[r] = bf16_pair(s[r] * q0[r] + z[r], s[r] * q1[r] + z[r]);
        }
      }
    }
  }
  alignas(64) float q[kMaxGroup];
  for (; n < n1; ++n) {  // the tail rows, one at a time
    const uint32_t* row = w.packed + n * w.stride_words;
    for (int64_t g = 0; g < L; ++g) {
      unpack_group<BITS>(row, g, G, q);
      const float s = load_store(w.scale, n * L + g, w.scale_type);
      const float z = load_store(w.zero, n * L + g, w.zero_type);
      uint32_t* dst = out + (g * G / 2) * nb + (n - n0);
      for (int i = 0; i < G; i += 2) dst[(i / 2) * nb] = bf16_pair(s * q[i] + z, s * q[i + 1] + z);
    }
  }
}

// grad_input: two rows at a time, interleaved along k.
template <int BITS>
void dequantize_bf16_npairs_t(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1, int64_t g0, int64_t g1) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t kb = (g1 - g0) * G;
  alignas(64) float a[kMaxGroup], b[kMaxGroup];
  for (int64_t n = n0; n < n1; n += 2) {
    const bool second = n + 1 < n1;
    const uint32_t* ra = w.packed + n * w.stride_words;
    const uint32_t* rb = w.packed + (n + 1) * w.stride_words;
    uint32_t* dst_row = out + ((n - n0) / 2) * kb;
    for (int64_t g = g0; g < g1; ++g) {
      unpack_group<BITS>(ra, g, G, a);
      const float sa = load_store(w.scale, n * L + g, w.scale_type);
      const float za = load_store(w.zero, n * L + g, w.zero_type);
      float sb = 0.f, zb = 0.f;
      if (second) {
        unpack_group<BITS>(rb, g, G, b);
        sb = load_store(w.scale, (n + 1) * L + g, w.scale_type);
        zb = load_store(w.zero, (n + 1) * L + g, w.zero_type);
      } else {
        for (int i = 0; i < G; ++i) b[i] = 0.f;
      }
      uint32_t* dst = dst_row + (g - g0) * G;
      QALORA_SIMD
      for (int i = 0; i < G; ++i) dst[i] = bf16_pair(sa * a[i] + za, sb * b[i] + zb);
    }
  }
}

void dequantize_bf16_kpairs(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: return dequantize_bf16_kpairs_t<2>(w, out, n0, n1);
    case 3: return dequantize_bf16_kpairs_t<3>(w, out, n0, n1);
    default: return dequantize_bf16_kpairs_t<4>(w, out, n0, n1);
  }
}

void dequantize_bf16_npairs(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1, int64_t g0, int64_t g1) {
  switch (w.bits) {
    case 2: return dequantize_bf16_npairs_t<2>(w, out, n0, n1, g0, g1);
    case 3: return dequantize_bf16_npairs_t<3>(w, out, n0, n1, g0, g1);
    default: return dequantize_bf16_npairs_t<4>(w, out, n0, n1, g0, g1);
  }
}

// int8 activations, the portable version: xq in natural order.
template <int BITS>
void forward_rows_i8_t(const PackedView& w, const int8_t* xq, const float* dx, int64_t M, const float* group_sums,
                       const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t n0,
                       int64_t n1) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t K = w.K;
  int32_t q[kMaxGroup];
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = w.packed + n * w.stride_words;
    for (int64_t m = 0; m < M; ++m) y[m * w.N + n] = 0.f;
    for (int64_t g = 0; g < L; ++g) {
      const uint32_t* words = row + g * (G / kChunk) * BITS;
      for (int c = 0; c < G / kChunk; ++c) unpack_chunk<BITS, int32_t>(words + c * BITS, q + c * kChunk);
      const float s = load_store(w.scale, n * L + g, w.scale_type);
      const float z = load_store(w.zero, n * L + g, w.zero_type);
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xg = xq + m * K + g * G;
        int32_t acc = 0;
        QALORA_SIMD_REDUCE(acc)
        for (int i = 0; i < G; ++i) acc += q[i] * static_cast<int32_t>(xg[i]);
        y[m * w.N + n] += s * dx[m * L + g] * static_cast<float>(acc) + z * group_sums[m * L + g];
      }
    }
    for (int64_t m = 0; m < M; ++m)
      y[m * w.N + n] = epilogue(y[m * w.N + n], bias, n, u ? u + m * rank : nullptr, B + n * rank, rank);
  }
}

int64_t prepared_len_i8(int64_t K, int) { return K; }
void prepare_i8(const int8_t* xq, int64_t K, int, int8_t* out) {
  for (int64_t k = 0; k < K; ++k) out[k] = xq[k];
}

void forward_rows_i8(const PackedView& w, const int8_t* xq, const float* dx, int64_t M, const float* group_sums,
                     const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t n0,
                     int64_t n1) {
  switch (w.bits) {
    case 2: return forward_rows_i8_t<2>(w, xq, dx, M, group_sums, bias, u, B, rank, y, n0, n1);
    case 3: return forward_rows_i8_t<3>(w, xq, dx, M, group_sums, bias, u, B, rank, y, n0, n1);
    default: return forward_rows_i8_t<4>(w, xq, dx, M, group_sums, bias, u, B, rank, y, n0, n1);
  }
}

void forward_rows(const PackedView& w, const float* x, int64_t M, const float* group_sums, const float* bias,
                  const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: return forward_rows_t<2, float>(w, x, M, group_sums, bias, u, B, rank, y, n0, n1);
    case 3: return forward_rows_t<3, float>(w, x, M, group_sums, bias, u, B, rank, y, n0, n1);
    default: return forward_rows_t<4, float>(w, x, M, group_sums, bias, u, B, rank, y, n0, n1);
  }
}

// bf16 x: this call's task widens x (M < kMaxSmallM rows: at most a few
// hundred KB) once into its own float buffer and runs the float kernel. (The
// same kernel reading bf16 element by element in its inner loop ran 2x slower
// than float x: the widening sat on the critical path of every broadcast.)
void forward_rows_bf16(const PackedView& w, const uint16_t* x, int64_t M, const float* group_sums,
                       const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t n0,
                       int64_t n1) {
  const int64_t K = w.K;
  float* xf = new float[M * K];
  for (int64_t i = 0; i < M * K; ++i) xf[i] = xval(x, i);
  forward_rows(w, xf, M, group_sums, bias, u, B, rank, y, n0, n1);
  delete[] xf;
}

void grad_input_groups(const PackedView& w, const float* gyT, int64_t M, const float* group_add, float* gx,
                       int64_t g0, int64_t g1) {
  switch (w.bits) {
    case 2: return grad_input_groups_t<2>(w, gyT, M, group_add, gx, g0, g1);
    case 3: return grad_input_groups_t<3>(w, gyT, M, group_add, gx, g0, g1);
    default: return grad_input_groups_t<4>(w, gyT, M, group_add, gx, g0, g1);
  }
}

void dequantize_rows(const PackedView& w, float* out, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: return dequantize_rows_t<2>(w, out, n0, n1);
    case 3: return dequantize_rows_t<3>(w, out, n0, n1);
    default: return dequantize_rows_t<4>(w, out, n0, n1);
  }
}

}  // namespace
}  // namespace QALORA_ISA

const KernelTable* QALORA_CAT(kernel_table_, QALORA_ISA)() {
  static const KernelTable table = {
      QALORA_STR(QALORA_ISA),
      QALORA_ISA::forward_rows,
      QALORA_ISA::grad_input_groups,
      QALORA_ISA::dequantize_rows,
      QALORA_ISA::group_sums,
#if defined(QALORA_AVX2_DECODE)
      avx2_decode::prepared_len_f32,
      avx2_decode::prepare_f32,
      avx2_decode::gemv_rows,
#else
      nullptr,  // no decode-sized kernel: forward_rows serves M <= kGemvMaxM
      nullptr,
      nullptr,
#endif
      QALORA_ISA::prepared_len_i8,
      QALORA_ISA::prepare_i8,
      QALORA_ISA::forward_rows_i8,
#if defined(QALORA_AVX512_BF16_OPERANDS)
      avx512_bf16::dequantize_bf16_kpairs,
      avx512_bf16::dequantize_bf16_npairs,
#else
      QALORA_ISA::dequantize_bf16_kpairs,
      QALORA_ISA::dequantize_bf16_npairs,
#endif
      QALORA_ISA::forward_rows_bf16,
      QALORA_ISA::group_sums_bf16,
  };
  return &table;
}

}  // namespace cpu
}  // namespace qalora
