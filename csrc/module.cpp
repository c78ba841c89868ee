// The pybind11 module qalora_ext._C. Importing it loads the op registrations
// (TORCH_LIBRARY in torch_bindings.cpp, the CPU kernels in cpu/ops_cpu.cpp,
// plus cuda/ops_cuda.cpp in CUDA builds); the functions
// here are build information and CPU-dispatch controls, not tensor ops.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <optional>
#include <stdexcept>
#include <string>

#include "cpu/bf16_gemm.h"
#include "cpu/kernels.h"
#include "checks.h"

#ifndef QALORA_VERSION
#define QALORA_VERSION "0+unknown"
#endif

namespace py = pybind11;

#if defined(QALORA_CUDA_KERNELS)
#include "cuda/launchers.cuh"
namespace qalora {
void set_nvtx(bool on);  // cuda/ops_cuda.cpp
bool nvtx_enabled();
void set_cuda_path_limits(int64_t gemv_max_m, int64_t mma_max_m, int64_t grad_mma_max_m);
std::array<int64_t, 3> cuda_path_limits();
}  // namespace qalora
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "qalora_ext compiled core: op registrations and build information";
  m.attr("__version__") = QALORA_VERSION;
  m.attr("LAYOUT_CANONICAL") = qalora::kLayoutCanonical;
  m.attr("SMALL_M_THRESHOLD") = qalora::kSmallMThreshold;
  m.attr("SMALL_M_THRESHOLD_GRAD") = qalora::kSmallMThresholdGrad;
  m.attr("GEMV_MAX_M") = qalora::cpu::kGemvMaxM;
  m.attr("SMALL_M_THRESHOLD_BF16") = qalora::cpu::kBf16GemmMinM;  // bf16 x: the bf16 GEMM from here, if any
#if defined(QALORA_CUDA_KERNELS)
  m.attr("WITH_CUDA") = true;
  m.attr("CUDA_GEMV_MAX_M") = qalora::cuda::kGemvMaxM;
  m.def("set_nvtx", &qalora::set_nvtx, py::arg("enabled"),
        "NVTX ranges around each CUDA op launch (on unless QALORA_NVTX=0).");
  m.def("nvtx_enabled", &qalora::nvtx_enabled);
  m.def(
      "set_cuda_path_limits",
      [](int64_t gemv_max_m, int64_t mma_max_m, std::optional<int64_t> grad_mma_max_m) {
        if (gemv_max_m < 0 || gemv_max_m > qalora::cuda::kGemvMaxM)
          throw py::value_error("gemv_max_m must be in [0, " + std::to_string(qalora::cuda::kGemvMaxM) +
                                "] (the GEMV keeps one accumulator per row); got " + std::to_string(gemv_max_m));
        if (mma_max_m < 0) throw py::value_error("mma_max_m must be >= 0; got " + std::to_string(mma_max_m));
        const int64_t grad = grad_mma_max_m.value_or(qalora::cuda_path_limits()[2]);
        if (grad < 0) throw py::value_error("grad_mma_max_m must be >= 0; got " + std::to_string(grad));
        qalora::set_cuda_path_limits(gemv_max_m, mma_max_m, grad);
      },
      py::arg("gemv_max_m"), py::arg("mma_max_m"), py::arg("grad_mma_max_m") = py::none(),
      "CUDA paths by M. qlinear: fused GEMV for M <= gemv_max_m, tensor-core kernel for M <= mma_max_m "
      "(float16/bfloat16 x, sm_80+), dequantize + cuBLAS above. qlinear_grad_input: tensor-core kernel from the "
      "packed codes for M <= grad_mma_max_m (unchanged when not given), dequantize + cuBLAS above.");
  m.def("cuda_path_limits", []() {
    const auto [g, mm, gr] = qalora::cuda_path_limits();
    py::dict d;
    d["gemv_max_m"] = g;
    d["mma_max_m"] = mm;
    d["grad_mma_max_m"] = gr;
    return d;
  });
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("compiled_cpu_isas", []() { return std::string(qalora::cpu::compiled_isas()); },
        "Comma-separated instruction sets the CPU kernels were compiled for.");
  m.def("best_cpu_isa", []() { return std::string(qalora::cpu::best_isa()); },
        "The best instruction set this CPU supports among the compiled ones.");
  m.def("get_cpu_isa", []() { return std::string(qalora::cpu::active_isa()); },
        "The instruction set whose CPU kernels run now.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        if (!qalora::cpu::set_isa(name.c_str())) {
          throw py::value_error("CPU ISA '" + name + "' is not available (compiled: " +
                                qalora::cpu::compiled_isas() + "; this CPU's best: " + qalora::cpu::best_isa() +
                                ")");
        }
      },
      py::arg("name"), "Force the CPU kernels of one instruction set ('scalar', 'avx2', 'avx512', 'avx512vnni', 'neon', 'auto').");
  m.def("cpu_bf16_gemm", []() { return std::string(qalora::cpu::bf16_gemm_status()); },
        "The bf16 GEMM that bfloat16 activations use at large M ('onednn-brgemm-amx'), or 'off: <why>' "
        "(then they run the float32 GEMM).");
  m.def("set_cpu_bf16_gemm", &qalora::cpu::set_bf16_gemm_enabled, py::arg("enabled"),
        "Allow (default, unless QALORA_CPU_BF16_GEMM=0) or forbid the bf16 GEMM for bfloat16 activations at large "
        "M; forbidden, they run the float32 path.");
}
