// qalora/epilogue.h — the one bias + adapter epilogue of every qlinear path,
// CPU and CUDA (SPEC "The QA-LoRA adapter" and "Precision and determinism"):
//
//   y[m, n] = (base[m, n] + bias[n]) + sum_r u[m, r] B[n, r]      (float32)
//
// base is the path's x W~^T (plus the zeros' term), u the adapter's input
// scaling / G * (mask * pool(x)) A^T. The bias is added first, then the
// adapter's dot product with r in order; the caller rounds the result ONCE
// to the output dtype. Header-only, torch-free, host and device (format.h's
// QALORA_HD).
#pragma once

#include <cstdint>

#include "qalora/format.h"

namespace qalora {

// sum_r u[r] * B[r], r in order (float32).
QALORA_HD float adapter_dot(const float* u, const float* B, int64_t rank) {
  float s = 0.f;
  for (int64_t r = 0; r < rank; ++r) s += u[r] * B[r];
  return s;
}

// base + bias[n] + u_row . B_row; bias and u_row may be null (no bias, no adapter).
QALORA_HD float epilogue(float base, const float* bias, int64_t n, const float* u_row, const float* B_row,
                         int64_t rank) {
  float v = base;
  if (bias) v += bias[n];
  if (u_row) v += adapter_dot(u_row, B_row, rank);
  return v;
}

}  // namespace qalora
