// Every qalora op schema (torch.ops.qalora.*), from op_schemas.h. The kernels
// are registered per backend: cpu/ops_cpu.cpp (CPU) and cuda/ops_cuda.cpp
// (CUDA); the fake (meta) kernels and the autograd formula are in
// python/qalora_ext/ops.py.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(qalora, m) { qalora::define_qalora_ops(m); }
