// The three constructs of csrc/cuda/ that cannot be plain shared C++, each
// with a device body (nvcc) and an emulated body (QALORA_CUDA_EMULATION: the
// same sources compiled as host C++ against csrc/emulation/, see
// emulation/device.h and README "Development"):
//   QALORA_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<...>>>(args...)
//   QALORA_SHARED(align, type, name, dims);                     __shared__ __align__(align) type name dims;
//   QALORA_SM80                                                 1 where mma.sync / cp.async exist
// (inline PTX has its emulated body next to it, in cuda/mma_sm80.cuh).
#pragma once

#if defined(QALORA_CUDA_EMULATION)
#include "emulation/device.h"
#define QALORA_LAUNCH(grid, block, smem, stream, ...) ::qalora_emu::launch(grid, block, smem, stream, __VA_ARGS__)
#define QALORA_SHARED(align, type, name, dims) \
  type(&name) dims = *static_cast<type(*) dims>(::qalora_emu::shared_alloc(sizeof(type dims), align))
#define QALORA_SM80 1
#else
#define QALORA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define QALORA_SHARED(align, type, name, dims) __shared__ __align__(align) type name dims
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define QALORA_SM80 1
#else
#define QALORA_SM80 0
#endif
#endif
