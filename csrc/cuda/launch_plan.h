// What the CUDA binding decides before it launches anything, torch-free so
// that the real binding and the emulated one (QALORA_CUDA_EMULATION) run the
// same decisions: the path by M, the split count and workspace of split-K,
// the tensor-core paths' conditions, the aligned copies the kernels' 16-byte
// loads need.
#pragma once

#include <cstdint>

#include "cuda/launchers.cuh"
#include "qalora/format.h"

namespace qalora {
namespace cuda {

// Rows of activations per path (changeable at run time: _C.set_cuda_path_limits).
struct PathLimits {
  int64_t gemv_max_m, mma_max_m, grad_mma_max_m;
};

enum class Path { kGemv, kMma, kDequantGemm };

inline const char* path_name(Path p) {
  switch (p) {
    case Path::kGemv: return "gemv";
    case Path::kMma: return "mma";
    default: return "dequant+gemm";
  }
}

// The device a plan is made for.
struct DeviceInfo {
  int sms;       // multiprocessors (the split counts fill them)
  bool has_mma;  // mma.sync m16n8k16 and cp.async (sm_80 and newer)
};

// qlinear: fused GEMV up to gemv_max_m rows, the tensor-core kernel up to
// mma_max_m (float16/bfloat16 x on sm_80+), dequantize + GEMM above.
struct ForwardPlan {
  Path path;
  int splits;                 // split-K parts (1: none)
  int64_t workspace_floats;   // splits * M * N when split, else 0
  bool chunk_sums;            // the prologue's chunk sums are needed
};

inline ForwardPlan plan_qlinear(const PackedView& w, int64_t M, FloatType xt, bool adapter, const DeviceInfo& dev,
                                const PathLimits& lim) {
  ForwardPlan p{Path::kDequantGemm, 1, 0, adapter};
  if (M <= lim.gemv_max_m)
    p.path = Path::kGemv;
  else if (M <= lim.mma_max_m && xt != FloatType::kFloat32 && dev.has_mma)
    p.path = Path::kMma;
  if (p.path == Path::kDequantGemm) return p;
  p.chunk_sums = true;
  p.splits = p.path == Path::kGemv ? gemv_splits(w, dev.sms) : mma_splits(w, M, dev.sms);
  if (p.splits > 1) p.workspace_floats = static_cast<int64_t>(p.splits) * M * w.N;
  return p;
}

// qlinear_grad_input: the tensor-core kernel from the packed codes up to
// grad_mma_max_m rows (float16/bfloat16, N % 8 == 0 so grad_out rows start on
// 16-byte boundaries, sm_80+), dequantize + GEMM otherwise.
inline bool grad_input_uses_mma(int64_t M, int64_t N, FloatType t, const DeviceInfo& dev, const PathLimits& lim) {
  return M <= lim.grad_mma_max_m && t != FloatType::kFloat32 && N % 8 == 0 && dev.has_mma;
}

// The kernels read packed codes and activations 16 bytes at a time: a base
// that is not on a 16-byte boundary is copied first.
inline bool needs_aligned_copy(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; }

}  // namespace cuda
}  // namespace qalora
