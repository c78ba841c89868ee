// Hand-written AVX2 + FMA kernel for decode-sized M (M <= kGemvMaxM), float
// activations: the layout of kernels_avx512vnni.cpp on 8-lane vectors, for
// the many CPUs without AVX-512 (most laptops).
//
// A lane holds one packed word (b = 2, 4: 32/b codes) or one 32-code chunk
// (b = 3: its 3 words gathered from 24 consecutive words), so code t of all 8
// lanes sits at one bit position: a shift and a mask (b = 4) or a shift and
// a vpermps against {i & (2^b - 1)} (b = 2, 3; its index uses 3 bits) make 8
// floats. x is re-ordered once per call to match.
#include <immintrin.h>

#include <cstring>

#include "cpu/kernels.h"

namespace qalora {
namespace cpu {
namespace avx2_decode {
namespace {

constexpr int kLanes = 8;

constexpr int lane_codes(int bits) { return bits == 3 ? 32 : 32 / bits; }
constexpr int span_codes(int bits) { return kLanes * lane_codes(bits); }
constexpr int span_words(int bits) { return span_codes(bits) * bits / 32; }

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Scale or zero row [off, off + L) as float32, zero-filled to round_up(L, 8) + 8.
void row_to_f32(const void* base, FloatType t, int64_t off, int64_t L, float* out) {
  int64_t i = 0;
  switch (t) {
    case FloatType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (; i + 8 <= L; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
      for (; i < L; ++i) out[i] = half_bits_to_float(p[i]);
      break;
    }
    case FloatType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (; i + 8 <= L; i += 8) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
      }
      for (; i < L; ++i) out[i] = bf16_bits_to_float(p[i]);
      break;
    }
    default:
      std::memcpy(out, static_cast<const float*>(base) + off, sizeof(float) * L);
      i = L;
  }
  const int64_t end = round_up(L, 8) + 8;
  for (; i < end; ++i) out[i] = 0.f;
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline __m256i lane_mask(int64_t n) {  // lanes [0, n) on, n in [0, 8]
  alignas(32) int32_t m[kLanes];
  for (int i = 0; i < kLanes; ++i) m[i] = i < n ? -1 : 0;
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(m));
}

inline __m256i load_words(const uint32_t* p, int64_t n) {  // n words, the rest 0
  if (n >= kLanes) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if (n <= 0) return _mm256_setzero_si256();
  return _mm256_maskload_epi32(reinterpret_cast<const int*>(p), lane_mask(n));
}

// b = 3: word j of chunk i is word 3i + j of the span's 24 words (a, b, c):
// one in-register permute of each source, then two blends by source.
struct ChunkGather {
  __m256i idx[3], from_b[3], from_c[3];
  ChunkGather() {
    for (int j = 0; j < 3; ++j) {
      alignas(32) int32_t ix[kLanes], mb[kLanes], mc[kLanes];
      for (int i = 0; i < kLanes; ++i) {
        const int w = 3 * i + j;
        ix[i] = w % 8;
        mb[i] = w >= 8 && w < 16 ? -1 : 0;
        mc[i] = w >= 16 ? -1 : 0;
      }
      idx[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(ix));
      from_b[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(mb));
      from_c[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(mc));
    }
  }
};

template <int BITS>
struct SpanWords {
  __m256i w[BITS == 3 ? 3 : 1];
};

template <int BITS>
inline SpanWords<BITS> load_span(const uint32_t* row, int64_t s, int64_t row_words, const ChunkGather& gather) {
  SpanWords<BITS> out;
  const int64_t w0 = s * span_words(BITS);
  const int64_t left = row_words - w0;
  if (BITS != 3) {
    out.w[0] = load_words(row + w0, left);
  } else {
    const __m256i a = load_words(row + w0, left), b = load_words(row + w0 + 8, left - 8),
                  c = load_words(row + w0 + 16, left - 16);
    for (int j = 0; j < 3; ++j) {
      const __m256i pa = _mm256_permutevar8x32_epi32(a, gather.idx[j]);
      const __m256i pb = _mm256_permutevar8x32_epi32(b, gather.idx[j]);
      const __m256i pc = _mm256_permutevar8x32_epi32(c, gather.idx[j]);
      out.w[j] = _mm256_blendv_epi8(_mm256_blendv_epi8(pa, pb, gather.from_b[j]), pc, gather.from_c[j]);
    }
  }
  return out;
}

// Code t of every lane as a float.
template <int BITS>
inline __m256 plane_f32(const SpanWords<BITS>& sw, int t, __m256 table, __m256i mask4) {
  __m256i v;
  if (BITS != 3) {
    v = t == 0 ? sw.w[0] : _mm256_srli_epi32(sw.w[0], t * BITS);
  } else {
    const int bit = 3 * t, j = bit >> 5, sh = bit & 31;
    if (sh + 3 <= 32) {
      v = sh == 0 ? sw.w[j] : _mm256_srli_epi32(sw.w[j], sh);
    } else {
      v = _mm256_or_si256(_mm256_srli_epi32(sw.w[j], sh), _mm256_slli_epi32(sw.w[j + 1], 32 - sh));
    }
  }
  if (BITS == 4) return _mm256_cvtepi32_ps(_mm256_and_si256(v, mask4));
  return _mm256_permutevar8x32_ps(table, v);  // index = low 3 bits
}

int64_t prepared_len(int64_t K, int bits) { return round_up(K, span_codes(bits)); }

// xp[s*S + t*8 + i] = x[s*S + i*C + t], zero past K.
void prepare_f32_impl(const float* x, int64_t K, int bits, float* xp) {
  const int C = lane_codes(bits), S = span_codes(bits);
  const int64_t Kp = prepared_len(K, bits);
  for (int64_t s0 = 0; s0 < Kp; s0 += S)
    for (int t = 0; t < C; ++t)
      for (int i = 0; i < kLanes; ++i) {
        const int64_t k = s0 + i * C + t;
        xp[s0 + t * kLanes + i] = k < K ? x[k] : 0.f;
      }
}

template <int BITS, int MT>
void gemv_rows_t(const PackedView& w, const float* xp, int64_t Kp, const float* group_sums, const float* bias,
                 const float* u, const float* B, int64_t rank, float* y, int64_t ldy, int64_t n0, int64_t n1,
                 float* sbuf, float* zbuf) {
  constexpr int C = lane_codes(BITS), S = span_codes(BITS);
  const int64_t L = w.groups();
  const int lanes_per_group = w.group_size / C;
  const int groups_per_span = lanes_per_group >= kLanes ? 0 : kLanes / lanes_per_group;
  alignas(32) int32_t gi[kLanes];
  for (int i = 0; i < kLanes; ++i) gi[i] = lanes_per_group >= kLanes ? 0 : i / lanes_per_group;
  const __m256i gidx = _mm256_load_si256(reinterpret_cast<const __m256i*>(gi));
  alignas(32) float tb[kLanes];
  for (int i = 0; i < kLanes; ++i) tb[i] = static_cast<float>(i & ((1 << BITS) - 1));
  const __m256 table = _mm256_load_ps(tb);
  const __m256i mask4 = _mm256_set1_epi32(0xF);
  const ChunkGather gather;  // used for b = 3 only
  const int64_t spans = Kp / S;
  const int64_t row_words = w.K / kChunk * BITS;
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = w.packed + n * w.stride_words;
    if (u && n + 1 < n1)
      for (int64_t i = 0; i < rank; i += 16)
        _mm_prefetch(reinterpret_cast<const char*>(B + (n + 1) * rank + i), _MM_HINT_T0);
    row_to_f32(w.scale, w.scale_type, n * L, L, sbuf);
    row_to_f32(w.zero, w.zero_type, n * L, L, zbuf);
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t s = 0; s < spans; ++s) {
      const SpanWords<BITS> sw = load_span<BITS>(row, s, row_words, gather);
      __m256 ps[MT];
      for (int m = 0; m < MT; ++m) ps[m] = _mm256_setzero_ps();
      const float* xs = xp + s * S;
#pragma GCC unroll 32
      for (int t = 0; t < C; ++t) {
        const __m256 q = plane_f32<BITS>(sw, t, table, mask4);
        for (int m = 0; m < MT; ++m) ps[m] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xs + m * Kp + t * kLanes), ps[m]);
      }
      const int64_t g0 = groups_per_span ? s * groups_per_span : s * S / w.group_size;
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sbuf + g0), gidx);
      for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(ps[m], sv, acc[m]);
    }
    for (int m = 0; m < MT; ++m) {
      const float v = hsum(acc[m]) + dot_f32(zbuf, group_sums + m * L, L);
      y[m * ldy + n] = epilogue(v, bias, n, u ? u + m * rank : nullptr, B + n * rank, rank);
    }
  }
}

template <int BITS>
void gemv_rows_bits(const PackedView& w, const float* xp, int64_t M, const float* group_sums, const float* bias,
                    const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1) {
  const int64_t L = w.groups(), Kp = prepared_len(w.K, BITS);
  const int64_t nbuf = (L + 7) / 8 * 8 + 8;
  float* sbuf = static_cast<float*>(_mm_malloc(sizeof(float) * nbuf * 2, 32));
  float* zbuf = sbuf + nbuf;
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mt = M - m0 < 4 ? M - m0 : 4;
    const float* x = xp + m0 * Kp;
    const float* xs = group_sums + m0 * L;
    const float* um = u ? u + m0 * rank : nullptr;
    float* ym = y + m0 * w.N;
    switch (mt) {
      case 1: gemv_rows_t<BITS, 1>(w, x, Kp, xs, bias, um, B, rank, ym, w.N, n0, n1, sbuf, zbuf); break;
      case 2: gemv_rows_t<BITS, 2>(w, x, Kp, xs, bias, um, B, rank, ym, w.N, n0, n1, sbuf, zbuf); break;
      case 3: gemv_rows_t<BITS, 3>(w, x, Kp, xs, bias, um, B, rank, ym, w.N, n0, n1, sbuf, zbuf); break;
      default: gemv_rows_t<BITS, 4>(w, x, Kp, xs, bias, um, B, rank, ym, w.N, n0, n1, sbuf, zbuf); break;
    }
  }
  _mm_free(sbuf);
}

}  // namespace

int64_t prepared_len_f32(int64_t K, int bits) { return prepared_len(K, bits); }

void prepare_f32(const float* x, int64_t K, int bits, float* out) { prepare_f32_impl(x, K, bits, out); }

void gemv_rows(const PackedView& w, const float* xp, int64_t M, const float* group_sums, const float* bias,
               const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: return gemv_rows_bits<2>(w, xp, M, group_sums, bias, u, B, rank, y, n0, n1);
    case 3: return gemv_rows_bits<3>(w, xp, M, group_sums, bias, u, B, rank, y, n0, n1);
    default: return gemv_rows_bits<4>(w, xp, M, group_sums, bias, u, B, rank, y, n0, n1);
  }
}

}  // namespace avx2_decode
}  // namespace cpu
}  // namespace qalora
