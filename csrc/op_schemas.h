// Every qalora op schema, defined once: torch_bindings.cpp defines them as
// torch.ops.qalora.*, and the CUDA emulation build (cuda/ops_cuda.cpp with
// QALORA_CUDA_EMULATION) defines the same schemas as torch.ops.qalora_emu.*.
// Shapes are written (out_features N, in_features K); G = group_size, L = K / G.
#pragma once

#include <torch/library.h>

namespace qalora {

inline void define_qalora_ops(torch::Library& m) {
  // RTN (min-max) quantization of weight (N, K) per group: (packed (N, words)
  // int32, scale (N, L), zero (N, L)) in the given storage dtypes (SPEC).
  m.def("quantize_rtn(Tensor weight, int bits, int group_size, ScalarType scale_dtype, ScalarType zero_dtype)"
        " -> (Tensor, Tensor, Tensor)");
  // uint8 codes (N, K) -> packed int32 (N, words) in layout 1 (format.h).
  m.def("pack(Tensor codes, int bits) -> Tensor");
  // packed int32 (N, words) -> uint8 codes (N, in_features).
  m.def("unpack(Tensor packed, int bits, int in_features, int layout) -> Tensor");
  // W~ = scale * q + zero, float32 (N, K).
  m.def("dequantize(Tensor packed, Tensor scale, Tensor zero, int bits, int group_size, int layout) -> Tensor");
  // y = x W~^T + bias + scaling * (mask * pool(x)) A^T B^T, x (..., K) -> y
  // (..., N) in x's dtype; its autograd formula (ops.py) calls qlinear_grad_input.
  m.def("qlinear(Tensor x, Tensor packed, Tensor scale, Tensor zero, Tensor? bias, Tensor? lora_A, "
        "Tensor? lora_B, Tensor? pool_mask, float scaling, int bits, int group_size, int layout) -> Tensor");
  // qlinear with activations quantized to int8 per group (opt-in, inference
  // only: it has no autograd formula).
  m.def("qlinear_int8(Tensor x, Tensor packed, Tensor scale, Tensor zero, Tensor? bias, Tensor? lora_A, "
        "Tensor? lora_B, Tensor? pool_mask, float scaling, int bits, int group_size, int layout) -> Tensor");
  // qlinear's gradient with respect to x: grad_out (..., N) -> grad_x (..., K)
  // = grad_out W~ + scaling / G * unpool(mask * ((grad_out B) A)).
  m.def("qlinear_grad_input(Tensor grad_out, Tensor packed, Tensor scale, Tensor zero, Tensor? lora_A, "
        "Tensor? lora_B, Tensor? pool_mask, float scaling, int bits, int group_size, int layout) -> Tensor");
}

}  // namespace qalora
