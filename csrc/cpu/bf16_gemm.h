// The bfloat16 x bfloat16 -> float32 GEMM of the large-M bf16 paths, chosen
// at run time (cpu/bf16_gemm.cpp). Raw pointers, no torch headers: the
// binding calls it on the blocks of W~ the kernel table dequantized.
#pragma once

#include <cstdint>

namespace qalora {
namespace cpu {

// bf16 x runs the bf16 GEMM from this many rows on (where there is one),
// instead of kSmallMThreshold: an AMX GEMM on W~ dequantized to bf16 beats
// the packed small-M kernel from far fewer rows than the float32 GEMM does.
// 4096 x 4096 INT4, 1 thread: 8.8 ms at M=16 against 15.2 ms for the packed
// kernel, 9.5 vs 32 at M=32; a tie at M=8 (9.7 vs 9.6).
constexpr int64_t kBf16GemmMinM = 12;

struct Bf16Gemm {
  const char* name;
  // C (M x N, row stride ldc, float32) = A (M x Kc bf16 bits, row-major, row stride lda)
  //   @ B (Kc x N, in pairs along Kc: word [(kc / 2) * N + n] holds B[kc & ~1, n] | B[kc | 1, n] << 16)
  //   (+ C when accumulate). Kc is even. Products and sums in float32.
  void (*gemm)(int64_t M, int64_t N, int64_t Kc, const uint16_t* A, int64_t lda, const uint32_t* B, float* C,
               int64_t ldc, bool accumulate);
  // Called once by each thread after its last gemm (hands back the tile registers' state).
  void (*release)();
};

// The GEMM this CPU and this torch provide, or null: then the bf16 paths keep
// the float32 computation (x converted to float32). Disabled by
// QALORA_CPU_BF16_GEMM=0 (read once) or set_bf16_gemm_enabled(false).
const Bf16Gemm* bf16_gemm();
// "onednn-brgemm-amx" (what runs), or "off: <why>".
const char* bf16_gemm_status();
void set_bf16_gemm_enabled(bool enabled);

}  // namespace cpu
}  // namespace qalora
