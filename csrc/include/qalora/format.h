// qalora/format.h — the canonical packed layout (layout id 1), shared by the
// CPU kernels, the CUDA kernels and (through the ops) the Python layer.
//
// Header-only and free of torch: everything here is plain C++ that also
// compiles as CUDA device code, so the bit tricks the GPU uses are the same
// ones the CPU tests exercise.
//
// ---------------------------------------------------------------------------
// Layout 1: "row bitstream, 16-byte aligned rows"
// ---------------------------------------------------------------------------
// A weight W of shape (N, K) (out x in) with b-bit codes q[n, k] in
// [0, 2^b - 1] is stored as a row-major int32 tensor of shape (N, S):
//
//   * Each row n holds the codes of that row in order of k.
//   * Every run of 32 consecutive codes (a "chunk"; k in [32c, 32c + 32)) is a
//     little-endian bitstream of 32*b bits held in exactly b 32-bit words:
//     code i of the chunk sits in bits [b*i, b*i + b) of that bitstream,
//     where bit j of the stream is bit (j % 32) of word (j / 32).
//     For b = 4 and b = 2 no code crosses a word (8 or 16 codes per word);
//     for b = 3 codes 10 and 21 straddle words 0/1 and 1/2.
//   * K must be a multiple of 32 (every supported group size is), so a row
//     holds K/32 chunks = K*b/32 words; the row stride S rounds that up to a
//     multiple of 4 words (16 bytes). Padding words are zero.
//
// Why: group sizes 32/64/128 are whole chunks, so a group is b (or 2b, 4b)
// whole words and never shares a word with its neighbour; rows start on
// 16-byte boundaries, so a GPU thread can fetch codes with 128-bit loads
// (for b = 3, three 16-byte loads hold exactly four chunks = 128 codes);
// and 3 bits really cost 3 bits (no padding to 4 inside a row).
//
// Worked example (b = 3): codes of one chunk q[0..31] = 5, 2, 7, 0, 1, ...
//   stream bits 0..2 = 5 = 0b101, bits 3..5 = 2 = 0b010, bits 6..8 = 7 = 0b111
//   word0 = ...0_111_010_101 (binary, LSB right) = 0x1D5 | (codes 3..10 << 9..)
//   code 10 uses bits 30..32: its low 2 bits are word0 bits 30..31 and its
//   high bit is word1 bit 0.
// Worked example (b = 4): q[0..7] = 1, 2, 3, 4, 5, 6, 7, 8 -> word0 = 0x87654321.
//
// Scales and zeros are separate (N, K/G) float tensors (see SPEC):
//   W~[n, k] = scale[n, k/G] * q[n, k] + zero[n, k/G].
#pragma once

#include <cstdint>
#include <cstring>

// Internal linkage on the host: the CPU kernels compile this header once per
// instruction set (scalar, AVX2, AVX-512) and the linker must never merge an
// AVX-512 copy of a helper into the scalar path (that would be SIGILL on an
// older CPU), so no helper here is a shared weak symbol.
#if defined(__CUDACC__)
#define QALORA_HD static __host__ __device__ __forceinline__
#else
#define QALORA_HD static inline
#endif

namespace qalora {

// Layout ids. Every packed tensor travels with one; every op checks it.
constexpr int kLayoutCanonical = 1;

constexpr int kChunk = 32;  // codes per chunk (b words per chunk)

QALORA_HD constexpr bool bits_supported(int bits) { return bits >= 2 && bits <= 4; }

// Words that hold the codes of one row, before padding.
QALORA_HD constexpr int64_t row_code_words(int64_t in_features, int bits) {
  return in_features / kChunk * bits;
}

// Row stride in 32-bit words: padded to a multiple of 4 words (16 bytes).
QALORA_HD constexpr int64_t row_stride_words(int64_t in_features, int bits) {
  return (row_code_words(in_features, bits) + 3) / 4 * 4;
}

// Code k of a row (k counted from the start of the row).
QALORA_HD uint32_t get_code(const uint32_t* row, int64_t k, int bits) {
  const int64_t bit = (k >> 5) * (32 * bits) + (k & 31) * bits;
  const int64_t w = bit >> 5;
  const int s = static_cast<int>(bit & 31);
  const uint32_t mask = (1u << bits) - 1u;
  uint32_t v = row[w] >> s;
  if (s + bits > 32) v |= row[w + 1] << (32 - s);
  return v & mask;
}

// Unpack one 32-code chunk (b words at `words`) into out[0..31].
// Templated on bits so the shifts are compile-time constants.
template <int BITS, typename T>
QALORA_HD void unpack_chunk(const uint32_t* words, T* out) {
  constexpr uint32_t mask = (1u << BITS) - 1u;
  if constexpr (BITS == 4 || BITS == 2) {
    constexpr int per_word = 32 / BITS;
#pragma unroll
    for (int w = 0; w < BITS; ++w) {
      const uint32_t v = words[w];
#pragma unroll
      for (int i = 0; i < per_word; ++i) out[w * per_word + i] = static_cast<T>((v >> (i * BITS)) & mask);
    }
  } else {
    // 3 bits: a 96-bit stream; join neighbouring words so straddling codes
    // come out of one 64-bit shift.
    const uint64_t lo = static_cast<uint64_t>(words[0]) | (static_cast<uint64_t>(words[1]) << 32);
    const uint64_t hi = static_cast<uint64_t>(words[1]) | (static_cast<uint64_t>(words[2]) << 32);
#pragma unroll
    for (int i = 0; i < 21; ++i) out[i] = static_cast<T>((lo >> (3 * i)) & mask);  // bits 0..62
#pragma unroll
    for (int i = 21; i < 32; ++i) out[i] = static_cast<T>((hi >> (3 * i - 32)) & mask);  // bits 63..95
  }
}

// Pack 32 codes (values already in range) into b words.
template <typename T>
QALORA_HD void pack_chunk(const T* codes, int bits, uint32_t* words) {
  for (int w = 0; w < bits; ++w) words[w] = 0u;
  for (int i = 0; i < kChunk; ++i) {
    const uint32_t c = static_cast<uint32_t>(codes[i]);
    const int bit = i * bits;
    const int w = bit >> 5, s = bit & 31;
    words[w] |= c << s;
    if (s + bits > 32) words[w + 1] |= c >> (32 - s);
  }
}

// ---- 16-bit float storage conversions (round to nearest even) -------------
// Used by quantization to round scales/zeros to their storage dtype exactly
// as torch's .to(float16/bfloat16) does, without torch headers.

QALORA_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
QALORA_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

QALORA_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    // subnormal: value = mant * 2^-24
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

QALORA_HD uint16_t float_to_half_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) {  // inf or nan
    return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  }
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero) in half: quantum 2^-24. Round the exact
    // value abs * 2^24 to nearest even integer.
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to 0
    const uint32_t e = abs >> 23;                                 // biased exponent
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;             // 24-bit significand
    const int shift = static_cast<int>(126 - e);                  // m * 2^(e-150) * 2^24 = m >> (126-e)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  // normal: drop 13 mantissa bits with round-to-nearest-even
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  const uint32_t rem = r & 0x1fffu;
  r >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

QALORA_HD float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

QALORA_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet nan
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return static_cast<uint16_t>(u >> 16);
}

// The float formats kernels read and write as raw bits: scales and zeros in
// their storage dtypes, and (CUDA) activations and outputs.
enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

QALORA_HD float load_store(const void* base, int64_t i, FloatType t) {
  switch (t) {
    case FloatType::kFloat16: return half_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    case FloatType::kBFloat16: return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

QALORA_HD void write_store(void* base, int64_t i, FloatType t, float v) {
  switch (t) {
    case FloatType::kFloat16: static_cast<uint16_t*>(base)[i] = float_to_half_bits(v); break;
    case FloatType::kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

// A packed weight in layout 1, described by raw pointers (host or device
// memory): what every CPU and CUDA kernel takes.
struct PackedView {
  const uint32_t* packed;  // (N, stride_words)
  int64_t stride_words;
  const void* scale;  // (N, L) in scale_type
  FloatType scale_type;
  const void* zero;  // (N, L) in zero_type
  FloatType zero_type;
  int64_t N, K;
  int bits;
  int group_size;
#if defined(__CUDACC__)
  __host__ __device__
#endif
  int64_t groups() const { return K / group_size; }
};

// Value after a round trip through the storage dtype.
QALORA_HD float round_to_store(float v, FloatType t) {
  switch (t) {
    case FloatType::kFloat16: return half_bits_to_float(float_to_half_bits(v));
    case FloatType::kBFloat16: return bf16_bits_to_float(float_to_bf16_bits(v));
    default: return v;
  }
}

}  // namespace qalora
