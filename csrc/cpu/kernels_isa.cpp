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

inline float dot(const float* a, const float* b, int n) {
  float s = 0.f;
  QALORA_SIMD_REDUCE(s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <int BITS>
void forward_rows_t(const PackedView& w, const float* x, int64_t M, const float* xsum, const float* bias,
                    const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t K = w.K, N = w.N;
  alignas(64) float q[kMaxGroup];
  float acc[kMaxSmallM];
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = w.packed + n * w.stride_words;
    for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
    for (int64_t g = 0; g < L; ++g) {
      unpack_group<BITS>(row, g, G, q);
      const float s = load_store(w.scale, n * L + g, w.scale_type);
      const float z = load_store(w.zero, n * L + g, w.zero_type);
      for (int64_t m = 0; m < M; ++m) {
        acc[m] += s * dot(q, x + m * K + g * G, G) + z * xsum[m * L + g];
      }
    }
    const float b = bias ? bias[n] : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      float v = acc[m] + b;
      if (u) v += dot(u + m * rank, B + n * rank, static_cast<int>(rank));
      y[m * N + n] = v;
    }
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

void group_sums(const float* x, int64_t K, int64_t G, float* xsum, int64_t m0, int64_t m1) {
  const int64_t L = K / G;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < L; ++g) {
      const float* p = x + m * K + g * G;
      float s = 0.f;
      QALORA_SIMD_REDUCE(s)
      for (int64_t i = 0; i < G; ++i) s += p[i];
      xsum[m * L + g] = s;
    }
  }
}

void forward_rows(const PackedView& w, const float* x, int64_t M, const float* xsum, const float* bias,
                  const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: return forward_rows_t<2>(w, x, M, xsum, bias, u, B, rank, y, n0, n1);
    case 3: return forward_rows_t<3>(w, x, M, xsum, bias, u, B, rank, y, n0, n1);
    default: return forward_rows_t<4>(w, x, M, xsum, bias, u, B, rank, y, n0, n1);
  }
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
      QALORA_STR(QALORA_ISA),        QALORA_ISA::forward_rows, QALORA_ISA::grad_input_groups,
      QALORA_ISA::dequantize_rows, QALORA_ISA::group_sums,
  };
  return &table;
}

}  // namespace cpu
}  // namespace qalora
