// The bf16 GEMM operands (KernelTable::dequantize_bf16_kpairs / _npairs,
// layouts in kernels.h) written with AVX-512F/BW intrinsics for the avx512
// and avx512vnni tables: the portable loops of kernels_isa.cpp do not
// vectorize the bf16 rounding and ran at ~0.6 G weights/s, which made the
// dequantization cost as much as the bf16 GEMM itself.
//
// Rounding to bf16 is done on the float bits (nearest even; the weights are
// finite), so this needs no AVX512-BF16 instruction.
#include <immintrin.h>

#include "cpu/kernels.h"

namespace qalora {
namespace cpu {
namespace avx512_bf16 {
namespace {

constexpr int kMaxGroup = 128;

// The bf16 bits of 16 floats, rounded to nearest even, in the HIGH half of each 32-bit lane (low half garbage).
inline __m512i round_bf16_hi(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
}

// lo | hi << 16 per 32-bit lane, both rounded to bf16.
inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  return _mm512_or_si512(_mm512_srli_epi32(round_bf16_hi(lo), 16),
                         _mm512_and_si512(round_bf16_hi(hi), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

inline __m512 load16(const void* base, int64_t i0, int64_t stride, FloatType t) {
  alignas(64) float v[16];
  for (int r = 0; r < 16; ++r) v[r] = load_store(base, i0 + r * stride, t);
  return _mm512_load_ps(v);
}

// Code i of a chunk for 16 rows (one per lane); wv[b] holds word b of the chunk of each row.
template <int BITS, int I>
inline __m512 lane_codes(const __m512i* wv) {
  constexpr int bit = I * BITS, word = bit >> 5, shift = bit & 31;
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  __m512i v = _mm512_srli_epi32(wv[word], shift);
  if constexpr (shift + BITS > 32) v = _mm512_or_si512(v, _mm512_slli_epi32(wv[word + 1], 32 - shift));
  return _mm512_cvtepi32_ps(_mm512_and_si512(v, mask));
}

template <int BITS, int I>
inline void kpairs_step(const __m512i* wv, __m512 s, __m512 z, uint32_t* out, int64_t nb) {
  if constexpr (I < kChunk) {
    const __m512 f0 = _mm512_fmadd_ps(lane_codes<BITS, I>(wv), s, z);
    const __m512 f1 = _mm512_fmadd_ps(lane_codes<BITS, I + 1>(wv), s, z);
    _mm512_storeu_si512(out + (I / 2) * nb, bf16_pairs(f0, f1));
    kpairs_step<BITS, I + 2>(wv, s, z, out, nb);
  }
}

template <int BITS>
void kpairs_t(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t nb = n1 - n0;
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(w.stride_words)));
    const int* base = reinterpret_cast<const int*>(w.packed + n * w.stride_words);
    for (int64_t g = 0; g < L; ++g) {
      const __m512 s = load16(w.scale, n * L + g, L, w.scale_type);
      const __m512 z = load16(w.zero, n * L + g, L, w.zero_type);
      for (int c = 0; c < G / kChunk; ++c) {
        const int64_t word0 = (g * (G / kChunk) + c) * BITS;
        __m512i wv[BITS];
        for (int b = 0; b < BITS; ++b) wv[b] = _mm512_i32gather_epi32(rows, base + word0 + b, 4);
        const int64_t k0 = g * G + c * kChunk;
        kpairs_step<BITS, 0>(wv, s, z, out + (k0 / 2) * nb + (n - n0), nb);
      }
    }
  }
  alignas(64) float q[kMaxGroup];
  for (; n < n1; ++n) {  // tail rows, one at a time
    const uint32_t* row = w.packed + n * w.stride_words;
    for (int64_t g = 0; g < L; ++g) {
      for (int c = 0; c < G / kChunk; ++c) unpack_chunk<BITS, float>(row + (g * (G / kChunk) + c) * BITS, q + c * kChunk);
      const float s = load_store(w.scale, n * L + g, w.scale_type);
      const float z = load_store(w.zero, n * L + g, w.zero_type);
      uint32_t* dst = out + (g * G / 2) * nb + (n - n0);
      for (int i = 0; i < G; i += 2)
        dst[(i / 2) * nb] = static_cast<uint32_t>(float_to_bf16_bits(s * q[i] + z)) |
                            (static_cast<uint32_t>(float_to_bf16_bits(s * q[i + 1] + z)) << 16);
    }
  }
}

// Where code i of a chunk sits, for the 16 codes [16h, 16h + 16) of one row's
// chunk: the word holding its low bits (w0), the next word (w1, for a code
// that straddles two words), and the shifts. Built once per call.
struct RowIndex {
  __m512i w0[2], w1[2], sh[2], shl[2];
  explicit RowIndex(int bits) {
    alignas(64) int a[16], b[16], c[16], d[16];
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < 16; ++i) {
        const int bit = (16 * h + i) * bits;
        a[i] = bit >> 5;
        b[i] = (bit >> 5) + 1 < 16 ? (bit >> 5) + 1 : 15;
        c[i] = bit & 31;
        d[i] = 32 - (bit & 31);  // 32: the AVX-512 variable shift gives 0
      }
      w0[h] = _mm512_load_si512(a);
      w1[h] = _mm512_load_si512(b);
      sh[h] = _mm512_load_si512(c);
      shl[h] = _mm512_load_si512(d);
    }
  }
};

// 16 codes [16h, 16h + 16) of one row's chunk (words: the chunk's BITS words in lanes 0..BITS-1) as floats.
template <int BITS, int H>
inline __m512 row_codes(const RowIndex& ix, __m512i words) {
  const __m512i lo = _mm512_permutexvar_epi32(ix.w0[H], words);
  const __m512i hi = _mm512_permutexvar_epi32(ix.w1[H], words);
  // A code that does not straddle gets hi shifted left by >= BITS: masked away.
  const __m512i v = _mm512_or_si512(_mm512_srlv_epi32(lo, ix.sh[H]), _mm512_sllv_epi32(hi, ix.shl[H]));
  return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32((1 << BITS) - 1)));
}

template <int BITS>
void npairs_t(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1, int64_t g0, int64_t g1) {
  const int G = w.group_size;
  const int64_t L = w.groups();
  const int64_t kb = (g1 - g0) * G;
  const __mmask16 wmask = static_cast<__mmask16>((1u << BITS) - 1u);
  const RowIndex ix(BITS);
  for (int64_t n = n0; n < n1; n += 2) {
    const bool second = n + 1 < n1;
    const uint32_t* ra = w.packed + n * w.stride_words;
    const uint32_t* rb = w.packed + (second ? n + 1 : n) * w.stride_words;
    uint32_t* dst_row = out + ((n - n0) / 2) * kb;
    for (int64_t g = g0; g < g1; ++g) {
      const __m512 sa = _mm512_set1_ps(load_store(w.scale, n * L + g, w.scale_type));
      const __m512 za = _mm512_set1_ps(load_store(w.zero, n * L + g, w.zero_type));
      const __m512 sb = second ? _mm512_set1_ps(load_store(w.scale, (n + 1) * L + g, w.scale_type)) : _mm512_setzero_ps();
      const __m512 zb = second ? _mm512_set1_ps(load_store(w.zero, (n + 1) * L + g, w.zero_type)) : _mm512_setzero_ps();
      for (int c = 0; c < G / kChunk; ++c) {
        const int64_t word0 = (g * (G / kChunk) + c) * BITS;
        const __m512i wa = _mm512_maskz_loadu_epi32(wmask, ra + word0);
        const __m512i wb = _mm512_maskz_loadu_epi32(wmask, rb + word0);
        uint32_t* dst = dst_row + (g - g0) * G + c * kChunk;
        _mm512_storeu_si512(dst, bf16_pairs(_mm512_fmadd_ps(row_codes<BITS, 0>(ix, wa), sa, za),
                                            _mm512_fmadd_ps(row_codes<BITS, 0>(ix, wb), sb, zb)));
        _mm512_storeu_si512(dst + 16, bf16_pairs(_mm512_fmadd_ps(row_codes<BITS, 1>(ix, wa), sa, za),
                                                 _mm512_fmadd_ps(row_codes<BITS, 1>(ix, wb), sb, zb)));
      }
    }
  }
}

}  // namespace

void dequantize_bf16_kpairs(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: return kpairs_t<2>(w, out, n0, n1);
    case 3: return kpairs_t<3>(w, out, n0, n1);
    default: return kpairs_t<4>(w, out, n0, n1);
  }
}

void dequantize_bf16_npairs(const PackedView& w, uint32_t* out, int64_t n0, int64_t n1, int64_t g0, int64_t g1) {
  switch (w.bits) {
    case 2: return npairs_t<2>(w, out, n0, n1, g0, g1);
    case 3: return npairs_t<3>(w, out, n0, n1, g0, g1);
    default: return npairs_t<4>(w, out, n0, n1, g0, g1);
  }
}

}  // namespace avx512_bf16
}  // namespace cpu
}  // namespace qalora
