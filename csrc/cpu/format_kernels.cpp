// The packed format's kernels on CPU: RTN quantization, pack and unpack
// (SPEC "Dequantization", format.h layout 1).
// Not hot: one build for every CPU.
#include <cmath>

#include "cpu/kernels.h"

namespace qalora {
namespace cpu {

void quantize_rtn_rows(const float* w, int64_t K, int bits, int group_size, void* scale, FloatType scale_type,
                       void* zero, FloatType zero_type, uint32_t* packed, int64_t stride_words, int64_t n0,
                       int64_t n1) {
  const int64_t L = K / group_size;
  const float qmax = static_cast<float>((1 << bits) - 1);
  uint8_t codes[kChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * K;
    uint32_t* prow = packed + n * stride_words;
    for (int64_t i = row_code_words(K, bits); i < stride_words; ++i) prow[i] = 0u;
    for (int64_t g = 0; g < L; ++g) {
      const float* v = row + g * group_size;
      float lo = v[0], hi = v[0];
      for (int i = 1; i < group_size; ++i) {
        lo = v[i] < lo ? v[i] : lo;
        hi = v[i] > hi ? v[i] : hi;
      }
      // SPEC: scale and zero from min/max in float32, rounded to storage,
      // then codes from the STORED values.
      const float s = round_to_store((hi - lo) / qmax, scale_type);
      const float z = round_to_store(lo, zero_type);
      write_store(scale, n * L + g, scale_type, s);
      write_store(zero, n * L + g, zero_type, z);
      for (int c = 0; c < group_size / kChunk; ++c) {
        for (int i = 0; i < kChunk; ++i) {
          float q = 0.f;
          if (s != 0.f) {
            q = std::nearbyint((v[c * kChunk + i] - z) / s);  // default rounding mode: half to even
            q = q < 0.f ? 0.f : (q > qmax ? qmax : q);
          }
          codes[i] = static_cast<uint8_t>(q);
        }
        pack_chunk(codes, bits, prow + (g * (group_size / kChunk) + c) * bits);
      }
    }
  }
}

void pack_rows(const uint8_t* codes, int64_t K, int bits, uint32_t* packed, int64_t stride_words, int64_t n0,
               int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    uint32_t* prow = packed + n * stride_words;
    for (int64_t c = 0; c < K / kChunk; ++c) pack_chunk(codes + n * K + c * kChunk, bits, prow + c * bits);
    for (int64_t i = row_code_words(K, bits); i < stride_words; ++i) prow[i] = 0u;
  }
}

void unpack_rows(const uint32_t* packed, int64_t stride_words, int64_t K, int bits, uint8_t* codes, int64_t n0,
                 int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint32_t* prow = packed + n * stride_words;
    uint8_t* out = codes + n * K;
    for (int64_t c = 0; c < K / kChunk; ++c) {
      switch (bits) {
        case 2: unpack_chunk<2, uint8_t>(prow + c * 2, out + c * kChunk); break;
        case 3: unpack_chunk<3, uint8_t>(prow + c * 3, out + c * kChunk); break;
        default: unpack_chunk<4, uint8_t>(prow + c * 4, out + c * kChunk); break;
      }
    }
  }
}

}  // namespace cpu
}  // namespace qalora
