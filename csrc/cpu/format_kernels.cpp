// The packed format's kernels on CPU: RTN quantization, pack and unpack
// (SPEC "Dequantization", format.h layout 1).
// Not hot: one build for every CPU.
#include <cmath>

#include "cpu/kernels.h"
#include "qalora/rtn.h"

namespace qalora {
namespace cpu {

void quantize_rtn_rows(const float* w, int64_t K, int bits, int group_size, void* scale, FloatType scale_type,
                       void* zero, FloatType zero_type, uint32_t* packed, int64_t stride_words, int64_t n0,
                       int64_t n1) {
  const int64_t L = K / group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const float* row = w + n * K;
    uint32_t* prow = packed + n * stride_words;
    for (int64_t i = row_code_words(K, bits); i < stride_words; ++i) prow[i] = 0u;
    for (int64_t g = 0; g < L; ++g) {
      float s, z;  // SPEC's RTN, the CUDA kernel's too (qalora/rtn.h)
      rtn_group(row + g * group_size, group_size, bits, scale_type, zero_type, &s, &z,
                prow + g * (group_size / kChunk) * bits);
      write_store(scale, n * L + g, scale_type, s);
      write_store(zero, n * L + g, zero_type, z);
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
