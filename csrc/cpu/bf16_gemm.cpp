// The bf16 GEMM provider (cpu/bf16_gemm.h): oneDNN's batch-reduce GEMM
// micro-kernel as ATen exports it (at::native::cpublas::brgemm, bf16 inputs,
// float32 accumulation and output). Its bf16 "VNNI" form needs the B operand
// in pairs along the contraction (the layout KernelTable::dequantize_bf16_*
// writes directly, so no packing pass) and runs on AMX tiles; ATen answers
// whether this CPU has them with could_pack(kBFloat16). Where it does not
// (AVX512-BF16 without AMX, AVX2, aarch64), or where this torch was built
// without oneDNN's micro-kernels, there is no provider and the bf16 paths
// keep the float32 computation.
#include "cpu/bf16_gemm.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace qalora {
namespace cpu {
namespace {

void brgemm_vnni(int64_t M, int64_t N, int64_t Kc, const uint16_t* A, int64_t lda, const uint32_t* B, float* C,
                 int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, Kc, lda, /*ld_b=*/N, ldc, accumulate, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, /*is_vnni=*/true);
}

void brgemm_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

const Bf16Gemm kBrgemmAmx{"onednn-brgemm-amx", brgemm_vnni, brgemm_release};

std::atomic<bool>& enabled() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("QALORA_CPU_BF16_GEMM");
    return !(env && std::strcmp(env, "0") == 0);
  }()};
  return on;
}

bool amx_brgemm_available() {
  // could_pack(kBFloat16): oneDNN's micro-kernels are built in and the CPU has
  // AMX-BF16 (and the OS granted the tile state). False also when the user
  // turned oneDNN off (torch.backends.mkldnn.enabled = False).
  return at::native::cpublas::could_pack(at::kBFloat16);
}

}  // namespace

const Bf16Gemm* bf16_gemm() {
  if (!enabled().load(std::memory_order_relaxed)) return nullptr;
  return amx_brgemm_available() ? &kBrgemmAmx : nullptr;
}

const char* bf16_gemm_status() {
  if (!enabled().load(std::memory_order_relaxed)) return "off: disabled (QALORA_CPU_BF16_GEMM=0 or set_cpu_bf16_gemm)";
  if (amx_brgemm_available()) return kBrgemmAmx.name;
  return "off: no AMX-BF16 oneDNN micro-kernel on this CPU/torch (bf16 x runs the float32 GEMM)";
}

void set_bf16_gemm_enabled(bool on) { enabled().store(on, std::memory_order_relaxed); }

}  // namespace cpu
}  // namespace qalora
