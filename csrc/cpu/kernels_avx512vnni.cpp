// Hand-written AVX-512 kernels for decode-sized M (M <= kGemvMaxM): the
// matrix-vector products of token-by-token generation, which must keep up
// with memory.
//
// Built with -mavx512f/bw/vl/vbmi/vnni and reached only through the
// "avx512vnni" kernel table (cpu/isa.cpp checks the CPU first). The table is
// the avx512 one with the small-M entries replaced.
//
// Layout trick (float activations): a vector lane holds one packed word
// (b = 2, 4: 32/b codes) or one 32-code chunk (b = 3: its 3 words gathered
// from 48 consecutive words), so every code of a "plane" sits at the same
// bit position in all 16 lanes: one shift extracts 16 codes and one vpermps
// against the table {i & (2^b - 1)} turns them into floats (the index uses
// the low 4 bits only, so no mask is needed). x is permuted once per call to
// match ("prepared" activations). Each lane belongs to one group, so the
// per-group scale is a per-lane vector.
//
// int8 activations (opt-in): x is quantized per weight group (absmax / 127)
// and the code x activation products are exact int32 sums (vpdpbusd: codes
// are the unsigned operand). b = 2, 4 use the word lanes with byte planes
// ((w >> t*b) & 0x0303.. / 0x0F0F..); b = 3 spreads each 3-byte run of 8
// codes over a qword (vpermb) and cuts the codes out with vpmultishiftqb.
#include <immintrin.h>

#include <cstring>

#include "cpu/kernels.h"

namespace qalora {
namespace cpu {
namespace avx512vnni {
namespace {

constexpr int kLanes = 16;

// Codes one lane holds, and codes in one span of 16 lanes.
constexpr int lane_codes(int bits) { return bits == 3 ? 32 : 32 / bits; }
constexpr int span_codes(int bits) { return kLanes * lane_codes(bits); }
// Packed words one span reads.
constexpr int span_words(int bits) { return span_codes(bits) * bits / 32; }

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Scale or zero row [off, off + L) as float32, zero-filled to round_up(L, 16) + 16.
void row_to_f32(const void* base, FloatType t, int64_t off, int64_t L, float* out) {
  int64_t i = 0;
  switch (t) {
    case FloatType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (; i + 16 <= L; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i))));
      for (; i < L; ++i) out[i] = half_bits_to_float(p[i]);
      break;
    }
    case FloatType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(base) + off;
      for (; i + 16 <= L; i += 16) {
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
        _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
      }
      for (; i < L; ++i) out[i] = bf16_bits_to_float(p[i]);
      break;
    }
    default:
      std::memcpy(out, static_cast<const float*>(base) + off, sizeof(float) * L);
      i = L;
  }
  const int64_t end = round_up(L, 16) + 16;
  for (; i < end; ++i) out[i] = 0.f;
}

float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// The adapter's B row of the next output: a separate stream from the packed
// codes, fetched while this row's codes are summed.
inline void prefetch_adapter_row(const float* row, int64_t rank) {
  for (int64_t i = 0; i < rank; i += 16) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
}

// Lane -> group index within a span (group_of_lane[i] = i / lanes_per_group).
__m512i lane_group_index(int lanes_per_group) {
  alignas(64) int32_t idx[kLanes];
  for (int i = 0; i < kLanes; ++i) idx[i] = lanes_per_group >= kLanes ? 0 : i / lanes_per_group;
  return _mm512_load_si512(idx);
}

// Per-lane values of one span: v[group of lane i], from a float row buffer.
inline __m512 per_lane(const float* row, int64_t g0, __m512i gidx) {
  return _mm512_permutexvar_ps(gidx, _mm512_loadu_ps(row + g0));
}

// The 16 lanes of span s: for b = 2, 4, word s*16 + i; for b = 3 the three
// words of chunk s*16 + i. Words past the row (a partial last span) read 0.
template <int BITS>
struct SpanWords {
  __m512i w[BITS == 3 ? 3 : 1];
};

// b = 3: word j of chunk i is word 3i + j of the span's 48 words (a, b, c):
// two 2-source permutes each. The first picks from a:b (indices 0..31); the
// second keeps those lanes and fills the ones whose word lies in c.
struct ChunkGather {
  __m512i from_ab[3], with_c[3];
  ChunkGather() {
    alignas(64) int32_t i1[kLanes], i2[kLanes];
    for (int j = 0; j < 3; ++j) {
      for (int i = 0; i < kLanes; ++i) {
        const int w = 3 * i + j;
        i1[i] = w < 32 ? w : 0;
        i2[i] = w < 32 ? i : 16 + (w - 32);
      }
      from_ab[j] = _mm512_load_si512(i1);
      with_c[j] = _mm512_load_si512(i2);
    }
  }
};

template <int BITS>
inline SpanWords<BITS> load_span(const uint32_t* row, int64_t s, int64_t row_words, const ChunkGather& gather) {
  SpanWords<BITS> out;
  const int64_t w0 = s * span_words(BITS);
  const int64_t left = row_words - w0;
  if (BITS != 3) {
    if (left >= kLanes) {
      out.w[0] = _mm512_loadu_si512(row + w0);
    } else {
      out.w[0] = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << left) - 1u), row + w0);
    }
  } else {
    __m512i a, b, c;
    if (left >= 48) {
      a = _mm512_loadu_si512(row + w0);
      b = _mm512_loadu_si512(row + w0 + 16);
      c = _mm512_loadu_si512(row + w0 + 32);
    } else {
      auto mask = [&](int64_t from) -> __mmask16 {
        const int64_t n = left - from;
        return n <= 0 ? 0 : n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1u);
      };
      a = _mm512_maskz_loadu_epi32(mask(0), row + w0);
      b = _mm512_maskz_loadu_epi32(mask(16), row + w0 + 16);
      c = _mm512_maskz_loadu_epi32(mask(32), row + w0 + 32);
    }
    for (int j = 0; j < 3; ++j) {
      const __m512i ab = _mm512_permutex2var_epi32(a, gather.from_ab[j], b);
      out.w[j] = _mm512_permutex2var_epi32(ab, gather.with_c[j], c);
    }
  }
  return out;
}

// Code `t` of every lane, in the low bits (higher bits are garbage: the
// vpermps table ignores them).
template <int BITS>
inline __m512i plane(const SpanWords<BITS>& sw, int t) {
  if (BITS != 3) return t == 0 ? sw.w[0] : _mm512_srli_epi32(sw.w[0], t * BITS);
  const int bit = 3 * t, j = bit >> 5, sh = bit & 31;
  if (sh + 3 <= 32) return sh == 0 ? sw.w[j] : _mm512_srli_epi32(sw.w[j], sh);
  return _mm512_or_si512(_mm512_srli_epi32(sw.w[j], sh), _mm512_slli_epi32(sw.w[j + 1], 32 - sh));
}

template <int BITS>
__m512 code_table() {
  alignas(64) float t[kLanes];
  for (int i = 0; i < kLanes; ++i) t[i] = static_cast<float>(i & ((1 << BITS) - 1));
  return _mm512_load_ps(t);
}

// ---- float activations -----------------------------------------------------

int64_t prepared_len(int64_t K, int bits) { return round_up(K, span_codes(bits)); }

// xp[s*S + t*16 + i] = x[s*S + i*C + t], zero past K.
void prepare_f32(const float* x, int64_t K, int bits, float* xp) {
  const int C = lane_codes(bits), S = span_codes(bits);
  const int64_t Kp = prepared_len(K, bits);
  for (int64_t s0 = 0; s0 < Kp; s0 += S)
    for (int t = 0; t < C; ++t)
      for (int i = 0; i < kLanes; ++i) {
        const int64_t k = s0 + i * C + t;
        xp[s0 + t * kLanes + i] = k < K ? x[k] : 0.f;
      }
}

// y rows [n0, n1) for MT activation rows (prepared, stride Kp).
template <int BITS, int MT>
void gemv_rows_t(const PackedView& w, const float* xp, int64_t Kp, const float* group_sums, const float* bias,
                 const float* u, const float* B, int64_t rank, float* y, int64_t ldy, int64_t n0, int64_t n1,
                 float* sbuf, float* zbuf) {
  constexpr int C = lane_codes(BITS), S = span_codes(BITS);
  const int64_t L = w.groups();
  const int lanes_per_group = w.group_size / C;
  const int groups_per_span = lanes_per_group >= kLanes ? 0 : kLanes / lanes_per_group;
  const __m512i gidx = lane_group_index(lanes_per_group);
  const __m512 table = code_table<BITS>();
  const int64_t spans = Kp / S;
  const int64_t row_words = w.K / kChunk * BITS;
  const ChunkGather gather;
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = w.packed + n * w.stride_words;
    if (u && n + 1 < n1) prefetch_adapter_row(B + (n + 1) * rank, rank);
    row_to_f32(w.scale, w.scale_type, n * L, L, sbuf);
    row_to_f32(w.zero, w.zero_type, n * L, L, zbuf);
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < spans; ++s) {
      const SpanWords<BITS> sw = load_span<BITS>(row, s, row_words, gather);
      __m512 ps[MT];
      for (int m = 0; m < MT; ++m) ps[m] = _mm512_setzero_ps();
      const float* xs = xp + s * S;
#pragma GCC unroll 32
      for (int t = 0; t < C; ++t) {
        const __m512 q = _mm512_permutexvar_ps(plane<BITS>(sw, t), table);
        for (int m = 0; m < MT; ++m) ps[m] = _mm512_fmadd_ps(q, _mm512_loadu_ps(xs + m * Kp + t * kLanes), ps[m]);
      }
      // groups_per_span == 0: the whole span is one group (g0 = s * S / G).
      const int64_t g0 = groups_per_span ? s * groups_per_span : s * S / w.group_size;
      const __m512 sv = per_lane(sbuf, g0, gidx);
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(ps[m], sv, acc[m]);
    }
    for (int m = 0; m < MT; ++m) {
      const float v = _mm512_reduce_add_ps(acc[m]) + dot_f32(zbuf, group_sums + m * L, L);
      y[m * ldy + n] = epilogue(v, bias, n, u ? u + m * rank : nullptr, B + n * rank, rank);
    }
  }
}

// M = 1, large K: NR output rows at a time, so each prepared x vector loaded
// feeds NR FMAs. With one row per pass the x loads (4 bytes per code)
// outnumber the code bytes eight to one, and for large K they come from L2.
template <int BITS, int NR>
void gemv_rows_m1(const PackedView& w, const float* xp, int64_t Kp, const float* group_sums, const float* bias,
                  const float* u, const float* B, int64_t rank, float* y, int64_t n0, float* const* sbuf,
                  float* const* zbuf) {
  constexpr int C = lane_codes(BITS), S = span_codes(BITS);
  const int64_t L = w.groups();
  const int lanes_per_group = w.group_size / C;
  const int groups_per_span = lanes_per_group >= kLanes ? 0 : kLanes / lanes_per_group;
  const __m512i gidx = lane_group_index(lanes_per_group);
  const __m512 table = code_table<BITS>();
  const int64_t spans = Kp / S;
  const int64_t row_words = w.K / kChunk * BITS;
  const ChunkGather gather;
  const uint32_t* rows[NR];
  __m512 acc[NR];
  for (int r = 0; r < NR; ++r) {
    rows[r] = w.packed + (n0 + r) * w.stride_words;
    row_to_f32(w.scale, w.scale_type, (n0 + r) * L, L, sbuf[r]);
    row_to_f32(w.zero, w.zero_type, (n0 + r) * L, L, zbuf[r]);
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < spans; ++s) {
    SpanWords<BITS> sw[NR];
    __m512 ps[NR];
    for (int r = 0; r < NR; ++r) {
      sw[r] = load_span<BITS>(rows[r], s, row_words, gather);
      ps[r] = _mm512_setzero_ps();
    }
    const float* xs = xp + s * S;
#pragma GCC unroll 32
    for (int t = 0; t < C; ++t) {
      const __m512 xv = _mm512_loadu_ps(xs + t * kLanes);
      for (int r = 0; r < NR; ++r)
        ps[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(plane<BITS>(sw[r], t), table), xv, ps[r]);
    }
    const int64_t g0 = groups_per_span ? s * groups_per_span : s * S / w.group_size;
    for (int r = 0; r < NR; ++r) acc[r] = _mm512_fmadd_ps(ps[r], per_lane(sbuf[r], g0, gidx), acc[r]);
  }
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + r;
    const float v = _mm512_reduce_add_ps(acc[r]) + dot_f32(zbuf[r], group_sums, L);
    y[n] = epilogue(v, bias, n, u, B + n * rank, rank);
  }
}

// ---- int8 activations ------------------------------------------------------

// b = 2, 4: byte planes of the word lanes. xq_p[s*S + t*64 + 4i + j] =
// xq[s*S + i*C + j*P + t] (P = 8/b planes), zero past K. b = 3: natural order,
// zero-padded to a multiple of 64.
int64_t prepared_len_i8(int64_t K, int bits) { return bits == 3 ? round_up(K, 64) + 64 : round_up(K, span_codes(bits)); }

void prepare_i8(const int8_t* xq, int64_t K, int bits, int8_t* out) {
  const int64_t Kp = prepared_len_i8(K, bits);
  if (bits == 3) {
    std::memcpy(out, xq, K);
    std::memset(out + K, 0, Kp - K);
    return;
  }
  const int C = lane_codes(bits), S = span_codes(bits), P = 8 / bits;
  for (int64_t s0 = 0; s0 < Kp; s0 += S)
    for (int t = 0; t < P; ++t)
      for (int i = 0; i < kLanes; ++i)
        for (int j = 0; j < 4; ++j) {
          const int64_t k = s0 + i * C + j * P + t;
          out[s0 + t * 64 + 4 * i + j] = k < K ? xq[k] : 0;
        }
}

inline void finish_row_i8(const __m512* acc, int MT, const float* zbuf, const float* group_sums, int64_t L,
                          const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t ldy,
                          int64_t n) {
  for (int m = 0; m < MT; ++m) {
    const float v = _mm512_reduce_add_ps(acc[m]) + dot_f32(zbuf, group_sums + m * L, L);
    y[m * ldy + n] = epilogue(v, bias, n, u ? u + m * rank : nullptr, B + n * rank, rank);
  }
}

template <int BITS, int MT>
void gemv_rows_i8_words(const PackedView& w, const int8_t* xq, int64_t Kp, const float* dx, const float* group_sums,
                        const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t ldy,
                        int64_t n0, int64_t n1, float* sbuf, float* zbuf) {
  constexpr int C = lane_codes(BITS), S = span_codes(BITS), P = 8 / BITS;
  const int64_t L = w.groups();
  const int lanes_per_group = w.group_size / C;
  const int groups_per_span = lanes_per_group >= kLanes ? 0 : kLanes / lanes_per_group;
  const __m512i gidx = lane_group_index(lanes_per_group);
  const __m512i bytemask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const int64_t spans = Kp / S;
  const int64_t row_words = w.K / kChunk * BITS;
  const ChunkGather gather;  // unused for b = 2, 4
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* row = w.packed + n * w.stride_words;
    if (u && n + 1 < n1) prefetch_adapter_row(B + (n + 1) * rank, rank);
    row_to_f32(w.scale, w.scale_type, n * L, L, sbuf);
    row_to_f32(w.zero, w.zero_type, n * L, L, zbuf);
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < spans; ++s) {
      const __m512i wv = load_span<BITS>(row, s, row_words, gather).w[0];
      __m512i is[MT];
      for (int m = 0; m < MT; ++m) is[m] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int t = 0; t < P; ++t) {
        const __m512i v = _mm512_and_si512(t == 0 ? wv : _mm512_srli_epi32(wv, t * BITS), bytemask);
        for (int m = 0; m < MT; ++m)
          is[m] = _mm512_dpbusd_epi32(is[m], v, _mm512_loadu_si512(xq + m * Kp + s * S + t * 64));
      }
      const int64_t g0 = groups_per_span ? s * groups_per_span : s * S / w.group_size;
      const __m512 sv = per_lane(sbuf, g0, gidx);
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[m]), _mm512_mul_ps(sv, per_lane(dx + m * L, g0, gidx)), acc[m]);
    }
    finish_row_i8(acc, MT, zbuf, group_sums, L, bias, u, B, rank, y, ldy, n);
  }
}

// b = 3: 64 codes (24 bytes) at a time, natural order.
template <int MT>
void gemv_rows_i8_b3(const PackedView& w, const int8_t* xq, int64_t Kp, const float* dx, const float* group_sums,
                     const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t ldy,
                     int64_t n0, int64_t n1, float* sbuf, float* zbuf) {
  const int64_t L = w.groups();
  alignas(64) uint8_t idx[64], sh[64];
  for (int t = 0; t < 8; ++t)
    for (int j = 0; j < 8; ++j) {
      idx[8 * t + j] = static_cast<uint8_t>(3 * t + (j < 3 ? j : 2));
      sh[8 * t + j] = static_cast<uint8_t>(3 * j);
    }
  const __m512i spread = _mm512_load_si512(idx), shifts = _mm512_load_si512(sh);
  const __m512i mask = _mm512_set1_epi8(7);
  const int lanes_per_group = w.group_size / 4;  // a dword lane sums 4 codes
  const __m512i gidx = lane_group_index(lanes_per_group);
  const int64_t blocks = (w.K + 63) / 64;
  const int64_t row_bytes = w.K * 3 / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(w.packed + n * w.stride_words);
    if (u && n + 1 < n1) prefetch_adapter_row(B + (n + 1) * rank, rank);
    row_to_f32(w.scale, w.scale_type, n * L, L, sbuf);
    row_to_f32(w.zero, w.zero_type, n * L, L, zbuf);
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t b0 = blk * 24;
      // A whole block reads 32 bytes (24 used); the row's last block is masked.
      const int64_t left = row_bytes - b0;
      const __m256i raw = left >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b0))
                                     : _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1ull << left) - 1), row + b0);
      const __m512i v = _mm512_and_si512(
          _mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(spread, _mm512_castsi256_si512(raw))), mask);
      const int64_t g0 = blk * 64 / w.group_size;
      __m512 sv = per_lane(sbuf, g0, gidx);
      for (int m = 0; m < MT; ++m) {
        const __m512i is = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_loadu_si512(xq + m * Kp + blk * 64));
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is), _mm512_mul_ps(sv, per_lane(dx + m * L, g0, gidx)), acc[m]);
      }
    }
    finish_row_i8(acc, MT, zbuf, group_sums, L, bias, u, B, rank, y, ldy, n);
  }
}

// ---- table entries -----------------------------------------------------------

// Per-thread row buffers for a row's scales and zeros as float32.
struct RowBuffers {
  float* s;
  float* z;
  explicit RowBuffers(int64_t L) {
    const int64_t n = ((L + 15) / 16 + 1) * 16;
    s = static_cast<float*>(_mm_malloc(sizeof(float) * n * 2, 64));
    z = s + n;
  }
  ~RowBuffers() { _mm_free(s); }
  RowBuffers(const RowBuffers&) = delete;
  RowBuffers& operator=(const RowBuffers&) = delete;
};

template <int BITS>
void gemv_rows_bits(const PackedView& w, const float* xp, int64_t M, const float* group_sums, const float* bias,
                    const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1) {
  const int64_t Kp = prepared_len(w.K, BITS), L = w.groups();
  // Row blocks pay only when the prepared x no longer fits L1 (32 KB): then
  // its re-reads from L2 bind. Below, one row at a time streams the codes
  // strictly in order and measured twice as fast (INT4 4096x4096: 0.23 vs
  // 0.47 ms; 4096x11008: 1.77 vs 1.17 ms the other way round).
  if (M == 1 && Kp * static_cast<int64_t>(sizeof(float)) > (32 << 10)) {
    constexpr int NR = 4;
    RowBuffers b0(L), b1(L), b2(L), b3(L);
    float* const sb[NR] = {b0.s, b1.s, b2.s, b3.s};
    float* const zb[NR] = {b0.z, b1.z, b2.z, b3.z};
    int64_t n = n0;
    for (; n + NR <= n1; n += NR) gemv_rows_m1<BITS, NR>(w, xp, Kp, group_sums, bias, u, B, rank, y, n, sb, zb);
    for (; n < n1; ++n) gemv_rows_m1<BITS, 1>(w, xp, Kp, group_sums, bias, u, B, rank, y, n, sb, zb);
    return;
  }
  RowBuffers buf(L);
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mt = M - m0 < 4 ? M - m0 : 4;
    const float* x = xp + m0 * Kp;
    const float* xs = group_sums + m0 * L;
    const float* um = u ? u + m0 * rank : nullptr;
    float* ym = y + m0 * w.N;
    switch (mt) {
      case 1: gemv_rows_t<BITS, 1>(w, x, Kp, xs, bias, um, B, rank, ym, w.N, n0, n1, buf.s, buf.z); break;
      case 2: gemv_rows_t<BITS, 2>(w, x, Kp, xs, bias, um, B, rank, ym, w.N, n0, n1, buf.s, buf.z); break;
      case 3: gemv_rows_t<BITS, 3>(w, x, Kp, xs, bias, um, B, rank, ym, w.N, n0, n1, buf.s, buf.z); break;
      default: gemv_rows_t<BITS, 4>(w, x, Kp, xs, bias, um, B, rank, ym, w.N, n0, n1, buf.s, buf.z); break;
    }
  }
}

void gemv_rows(const PackedView& w, const float* xp, int64_t M, const float* group_sums, const float* bias,
               const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1) {
  switch (w.bits) {
    case 2: return gemv_rows_bits<2>(w, xp, M, group_sums, bias, u, B, rank, y, n0, n1);
    case 3: return gemv_rows_bits<3>(w, xp, M, group_sums, bias, u, B, rank, y, n0, n1);
    default: return gemv_rows_bits<4>(w, xp, M, group_sums, bias, u, B, rank, y, n0, n1);
  }
}

template <int MT>
void i8_rows_mt(const PackedView& w, const int8_t* xq, int64_t Kp, const float* dx, const float* group_sums,
                const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t n0, int64_t n1,
                RowBuffers& buf) {
  switch (w.bits) {
    case 2:
      return gemv_rows_i8_words<2, MT>(w, xq, Kp, dx, group_sums, bias, u, B, rank, y, w.N, n0, n1, buf.s, buf.z);
    case 3: return gemv_rows_i8_b3<MT>(w, xq, Kp, dx, group_sums, bias, u, B, rank, y, w.N, n0, n1, buf.s, buf.z);
    default:
      return gemv_rows_i8_words<4, MT>(w, xq, Kp, dx, group_sums, bias, u, B, rank, y, w.N, n0, n1, buf.s, buf.z);
  }
}

void forward_rows_i8(const PackedView& w, const int8_t* xq, const float* dx, int64_t M, const float* group_sums,
                     const float* bias, const float* u, const float* B, int64_t rank, float* y, int64_t n0,
                     int64_t n1) {
  RowBuffers buf(w.groups());
  const int64_t Kp = prepared_len_i8(w.K, w.bits), L = w.groups();
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mt = M - m0 < 4 ? M - m0 : 4;
    const int8_t* x = xq + m0 * Kp;
    const float* d = dx + m0 * L;
    const float* xs = group_sums + m0 * L;
    const float* um = u ? u + m0 * rank : nullptr;
    float* ym = y + m0 * w.N;
    switch (mt) {
      case 1: i8_rows_mt<1>(w, x, Kp, d, xs, bias, um, B, rank, ym, n0, n1, buf); break;
      case 2: i8_rows_mt<2>(w, x, Kp, d, xs, bias, um, B, rank, ym, n0, n1, buf); break;
      case 3: i8_rows_mt<3>(w, x, Kp, d, xs, bias, um, B, rank, ym, n0, n1, buf); break;
      default: i8_rows_mt<4>(w, x, Kp, d, xs, bias, um, B, rank, ym, n0, n1, buf); break;
    }
  }
}

}  // namespace
}  // namespace avx512vnni

const KernelTable* kernel_table_avx512vnni() {
  static const KernelTable table = [] {
    KernelTable t = *kernel_table_avx512();
    t.name = "avx512vnni";
    t.prepared_len_f32 = avx512vnni::prepared_len;
    t.prepare_f32 = avx512vnni::prepare_f32;
    t.gemv_rows = avx512vnni::gemv_rows;
    t.prepared_len_i8 = avx512vnni::prepared_len_i8;
    t.prepare_i8 = avx512vnni::prepare_i8;
    t.forward_rows_i8 = avx512vnni::forward_rows_i8;
    return t;
  }();
  return &table;
}

}  // namespace cpu
}  // namespace qalora
