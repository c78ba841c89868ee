// qalora/rtn.h — round-to-nearest (min-max) quantization of one group, the
// one implementation the CPU kernel (cpu/format_kernels.cpp) and the CUDA
// kernel (cuda/format_kernels.cu) both run, so their results are
// bit-identical (SPEC "Dequantization"):
//   1. scale = (max - min) / (2^b - 1), zero = min, in float32;
//   2. both rounded to their storage dtypes;
//   3. q = clamp(round_half_even((w - zero_s) / scale_s), 0, 2^b - 1) from the
//      STORED values; q = 0 where scale_s == 0.
// Only correctly rounded float32 operations (no contraction possible: no
// product is added), on the host and on the device.
#pragma once

#include <cmath>
#include <cstdint>

#include "qalora/format.h"

namespace qalora {

QALORA_HD float rtn_round_half_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);  // the default rounding mode: half to even
#endif
}

QALORA_HD float rtn_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);  // IEEE division even under --use_fast_math
#else
  return a / b;
#endif
}

// One group of G = group_size weights at v: its stored scale and zero (as
// float32 values, already rounded to scale_type / zero_type) and its codes
// packed into group_size / 32 * bits words at `words` (layout 1).
QALORA_HD void rtn_group(const float* v, int group_size, int bits, FloatType scale_type, FloatType zero_type,
                         float* scale_out, float* zero_out, uint32_t* words) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  float lo = v[0], hi = v[0];
  for (int i = 1; i < group_size; ++i) {
    lo = v[i] < lo ? v[i] : lo;
    hi = v[i] > hi ? v[i] : hi;
  }
  const float s = round_to_store(rtn_div(hi - lo, qmax), scale_type);
  const float z = round_to_store(lo, zero_type);
  *scale_out = s;
  *zero_out = z;
  uint8_t codes[kChunk];
  for (int c = 0; c < group_size / kChunk; ++c) {
    for (int i = 0; i < kChunk; ++i) {
      float q = 0.f;
      if (s != 0.f) {
        q = rtn_round_half_even(rtn_div(v[c * kChunk + i] - z, s));
        q = q < 0.f ? 0.f : (q > qmax ? qmax : q);
      }
      codes[i] = static_cast<uint8_t>(q);
    }
    pack_chunk(codes, bits, words + c * bits);
  }
}

}  // namespace qalora
