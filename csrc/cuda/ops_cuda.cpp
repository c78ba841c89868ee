// CUDA implementations of the qalora ops (schemas in op_schemas.h): input
// checks, device guard, the current stream, the plan (cuda/launch_plan.h:
// path by M, split-K), an NVTX range per call, and a check of every launch.
// The kernels (the .cu files, declared in cuda/launchers.cuh) see raw
// pointers only.
//
// The same file builds the emulated ops (QALORA_CUDA_EMULATION, the
// torch.ops.qalora_emu namespace, CPU tensors): only the `device` section
// below differs (no guard, stream or NVTX; a float32 CPU GEMM stands in for
// cuBLAS), so the emulation runs this binding's decisions and buffers too.
#include <ATen/ATen.h>
#include <torch/library.h>
#if !defined(QALORA_CUDA_EMULATION)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <nvtx3/nvToolsExt.h>
#endif

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "checks.h"
#include "cuda/launch_plan.h"
#include "cuda/launchers.cuh"
#include "op_schemas.h"

namespace qalora {

// NVTX ranges: on unless QALORA_NVTX=0 (read once) or set_nvtx(false).
std::atomic<bool>& nvtx_flag() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("QALORA_NVTX");
    return !(v && std::strcmp(v, "0") == 0);
  }()};
  return on;
}
void set_nvtx(bool on) { nvtx_flag().store(on); }
bool nvtx_enabled() { return nvtx_flag().load(); }

// Path by M. qlinear: fused GEMV for M <= gemv_max_m, the tensor-core kernel
// for M <= mma_max_m (float16/bfloat16 x, sm_80+), dequantize + cuBLAS above.
// qlinear_grad_input: the tensor-core kernel from the packed codes up to
// grad_mma_max_m rows of grad_out (float16/bfloat16, N % 8 == 0, sm_80+),
// dequantize + cuBLAS above. Changeable at run time (_C.set_cuda_path_limits)
// so bench/bench_gpu.py can time every path at every M and print the limits
// it measured; the defaults below are a-priori choices until a GPU run
// replaces them with that measurement.
namespace {
std::atomic<int64_t> g_gemv_max_m{cuda::kGemvMaxM};
std::atomic<int64_t> g_mma_max_m{128};
std::atomic<int64_t> g_grad_mma_max_m{256};
}  // namespace
// Checked by the caller (module.cpp): 0 <= gemv_max_m <= kGemvMaxM, the others >= 0.
void set_cuda_path_limits(int64_t gemv_max_m, int64_t mma_max_m, int64_t grad_mma_max_m) {
  TORCH_CHECK_VALUE(gemv_max_m >= 0 && gemv_max_m <= cuda::kGemvMaxM, "gemv_max_m must be in [0, ", cuda::kGemvMaxM,
                    "]; got ", gemv_max_m);
  TORCH_CHECK_VALUE(mma_max_m >= 0, "mma_max_m must be >= 0; got ", mma_max_m);
  TORCH_CHECK_VALUE(grad_mma_max_m >= 0, "grad_mma_max_m must be >= 0; got ", grad_mma_max_m);
  g_gemv_max_m.store(gemv_max_m);
  g_mma_max_m.store(mma_max_m);
  g_grad_mma_max_m.store(grad_mma_max_m);
}
std::array<int64_t, 3> cuda_path_limits() {
  return {g_gemv_max_m.load(), g_mma_max_m.load(), g_grad_mma_max_m.load()};
}

namespace {

// ---- device: what differs between the GPU and the emulation --------------
#if defined(QALORA_CUDA_EMULATION)
}  // namespace
// The emulated device (settable: torch.ops.qalora_emu.set_device): H200's
// multiprocessor count by default, with mma.sync.
std::atomic<int> g_emulated_sms{132};
std::atomic<bool> g_emulated_mma{true};
namespace {
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
cuda::DeviceInfo device_info() { return {g_emulated_sms.load(), g_emulated_mma.load()}; }
class NvtxRange {
 public:
  explicit NvtxRange(const std::string&) {}
};
// cuBLAS's stand-in: the product of the 16-bit operands in float32 (exact
// products, float32 sums), float32 out.
at::Tensor gemm_f32(const at::Tensor& a, const at::Tensor& b) { return at::mm(a.to(at::kFloat), b.to(at::kFloat)); }
// Every buffer a kernel writes starts as 0xFF bytes (NaN in every float
// format): an element, workspace entry or padding word a kernel forgets to
// write shows up.
at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  auto t = at::empty(sizes, opts);
  if (t.nbytes() > 0) std::memset(t.data_ptr(), 0xFF, t.nbytes());
  return t;
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return current_stream(); }
cuda::DeviceInfo device_info() {
  const auto* p = at::cuda::getCurrentDeviceProperties();
  return {p->multiProcessorCount, p->major >= 8};
}
class NvtxRange {
 public:
  explicit NvtxRange(const std::string& name) : on_(nvtx_enabled()) {
    if (on_) nvtxRangePushA(name.c_str());
  }
  ~NvtxRange() {
    if (on_) nvtxRangePop();
  }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;

 private:
  bool on_;
};
// cuBLAS with float32 output (16-bit operands, float32 accumulation), so the
// epilogue adds bias and adapter before the one rounding (SPEC).
at::Tensor gemm_f32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}
at::Tensor device_empty(at::IntArrayRef sizes, const at::TensorOptions& opts) { return at::empty(sizes, opts); }
#endif

std::string range_name(const char* op, int64_t bits, int64_t G, int64_t M, int64_t N, int64_t K, const char* path) {
  return std::string("qalora.") + op + " b" + std::to_string(bits) + " g" + std::to_string(G) +
         " M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) + " " + path;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "qalora CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

// The packed weight made contiguous, and its raw view. The kernels read codes
// 16 bytes at a time: a view whose base is not on a 16-byte boundary (an odd
// storage offset) is copied first.
ContiguousWeight weight_of(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                           int64_t group_size) {
  auto p = packed.contiguous();
  if (cuda::needs_aligned_copy(p.data_ptr())) p = p.clone();
  return contiguous_weight(p, scale, zero, bits, group_size);
}

// Contiguous and 16-byte aligned (the GEMV reads activations 16 bytes at a time).
at::Tensor aligned_contiguous(const at::Tensor& t) {
  auto c = t.contiguous();
  if (cuda::needs_aligned_copy(c.data_ptr())) c = c.clone();
  return c;
}

cuda::PathLimits path_limits() {
  const auto l = cuda_path_limits();
  return {l[0], l[1], l[2]};
}

// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rtn_cuda(const at::Tensor& weight, int64_t bits,
                                                                 int64_t group_size, at::ScalarType scale_dtype,
                                                                 at::ScalarType zero_dtype) {
  check_quantize_input(weight, bits, group_size);
  const DeviceGuard guard(weight.device());
  auto w = weight.to(at::kFloat).contiguous();
  check_finite_weight(w);
  const int64_t N = w.size(0), K = w.size(1);
  auto scale = device_empty({N, K / group_size}, w.options().dtype(scale_dtype));
  auto zero = device_empty({N, K / group_size}, w.options().dtype(zero_dtype));
  auto packed = at::zeros({N, row_stride_words(K, static_cast<int>(bits))}, w.options().dtype(at::kInt));
  const NvtxRange range(range_name("quantize_rtn", bits, group_size, 0, N, K, "rtn"));
  check_launch(cuda::launch_quantize_rtn(w.data_ptr<float>(), N, K, static_cast<int>(bits),
                                         static_cast<int>(group_size), scale.data_ptr(),
                                         float_type_of(scale, "scale_dtype"), zero.data_ptr(),
                                         float_type_of(zero, "zero_dtype"),
                                         reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()), packed.size(1),
                                         current_stream()),
               "quantize_rtn");
  check_stored_finite(scale, zero, bits);
  return {packed, scale, zero};
}

at::Tensor pack_cuda(const at::Tensor& codes, int64_t bits) {
  const DeviceGuard guard(codes.device());
  check_codes(codes, bits);
  auto c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  auto packed = at::zeros({N, row_stride_words(K, static_cast<int>(bits))}, c.options().dtype(at::kInt));
  if (c.numel() == 0) return packed;
  check_launch(cuda::launch_pack(c.data_ptr<uint8_t>(), N, K, static_cast<int>(bits),
                                 reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()), packed.size(1),
                                 current_stream()),
               "pack");
  return packed;
}

at::Tensor unpack_cuda(const at::Tensor& packed, int64_t bits, int64_t in_features, int64_t layout) {
  check_unpack_args(packed, bits, in_features, layout);
  const DeviceGuard guard(packed.device());
  auto p = packed.contiguous();
  auto codes = device_empty({p.size(0), in_features}, p.options().dtype(at::kByte));
  if (p.size(0) == 0) return codes;
  check_launch(cuda::launch_unpack(reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>()), p.size(1), p.size(0),
                                   in_features, static_cast<int>(bits), codes.data_ptr<uint8_t>(),
                                   current_stream()),
               "unpack");
  return codes;
}

// W~ (N, K) in `dtype`.
at::Tensor dequantize_to(const ContiguousWeight& w, at::ScalarType dtype, const at::TensorOptions& opts) {
  auto out = device_empty({w.view.N, w.view.K}, opts.dtype(dtype));
  if (w.view.N == 0) return out;
  check_launch(cuda::launch_dequantize(w.view, out.data_ptr(), float_type_of(out, "out"),
                                       current_stream()),
               "dequantize");
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                           int64_t group_size, int64_t layout) {
  check_quant_weight(packed, scale, zero, bits, group_size, layout);
  const DeviceGuard guard(packed.device());
  const ContiguousWeight w = weight_of(packed, scale, zero, bits, group_size);
  const NvtxRange range(range_name("dequantize", bits, group_size, 0, w.view.N, w.view.K, "dequant"));
  return dequantize_to(w, at::kFloat, packed.options());
}

at::Tensor qlinear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                        const at::Tensor& zero, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                        const std::optional<at::Tensor>& pool_mask, double scaling, int64_t bits, int64_t group_size,
                        int64_t layout) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the gradient is qlinear's own formula
  const KernelDispatchGuard kernel_guard;  // the kernel's own casts, not autocast's
  const bool adapter =
      check_qlinear_args(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, bits, group_size, layout, true);
  const int64_t N = packed.size(0), K = scale.size(1) * group_size, L = scale.size(1);
  const DeviceGuard guard(x.device());

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = leading_rows(x);
  if (M == 0 || N == 0) return at::zeros(out_shape, x.options());
  const ContiguousWeight w = weight_of(packed, scale, zero, bits, group_size);
  auto x2 = aligned_contiguous(x.reshape({M, K}));
  const auto stream = current_stream();
  const auto f32 = x.options().dtype(at::kFloat);
  const FloatType xt = float_type_of(x2, "x");

  // Chunk sums of x (the zeros' term of the GEMV and the MMA kernel, and the
  // group sums the adapter's input is made of)
  // and the adapter's u = scaling/G * (mask * group sums) A^T, (M, r).
  const cuda::ForwardPlan plan = cuda::plan_qlinear(w.view, M, xt, adapter, device_info(), path_limits());
  const NvtxRange range(range_name("qlinear", bits, group_size, M, N, K, cuda::path_name(plan.path)));
  at::Tensor chunk_sums;
  if (plan.chunk_sums) {
    chunk_sums = device_empty({M, K / kChunk}, f32);
    check_launch(
        cuda::launch_chunk_sums(x2.data_ptr(), float_type_of(x2, "x"), M, K, chunk_sums.data_ptr<float>(), stream),
        "chunk_sums");
  }
  at::Tensor u, B, A, mask, b;
  if (adapter) {
    A = lora_A->to(at::kFloat).contiguous();
    B = lora_B->to(at::kFloat).contiguous();
    if (pool_mask) mask = pool_mask->reshape({M, L}).to(at::kFloat).contiguous();
    u = device_empty({M, A.size(0)}, f32);
    check_launch(cuda::launch_adapter_input(chunk_sums.data_ptr<float>(), pool_mask ? mask.data_ptr<float>() : nullptr,
                                            A.data_ptr<float>(), M, L, A.size(0), static_cast<int>(group_size),
                                            static_cast<float>(scaling), u.data_ptr<float>(), stream),
                 "adapter_input");
  }
  if (bias) b = bias->to(at::kFloat).contiguous();

  at::Tensor y;
  if (plan.path != cuda::Path::kDequantGemm) {
    y = device_empty({M, N}, x2.options());
    at::Tensor workspace;
    if (plan.splits > 1) workspace = device_empty({plan.workspace_floats}, f32);
    const auto launch = plan.path == cuda::Path::kGemv ? cuda::launch_gemv : cuda::launch_mma_gemm;
    check_launch(launch(w.view, x2.data_ptr(), xt, M, chunk_sums.data_ptr<float>(),
                        bias ? b.data_ptr<float>() : nullptr, adapter ? u.data_ptr<float>() : nullptr,
                        adapter ? B.data_ptr<float>() : nullptr, adapter ? u.size(1) : 0, y.data_ptr(), plan.splits,
                        plan.splits > 1 ? workspace.data_ptr<float>() : nullptr, stream),
                 cuda::path_name(plan.path));
  } else {
    // Large M: dequantize into a buffer of x's dtype (the caching allocator
    // reuses it call to call), the GEMM with float32 output, then the
    // epilogue in float32 (bias, then the adapter, the order of
    // qalora/epilogue.h) and one rounding to x's dtype (SPEC).
    auto wdq = dequantize_to(w, x2.scalar_type(), x2.options());
    auto y32 = gemm_f32(x2, wdq.t());
    if (bias) y32.add_(b);
    if (adapter) y32.add_(at::mm(u, B.t()));
    y = y32.to(x2.scalar_type());
  }
  return y.reshape(out_shape);
}

at::Tensor qlinear_int8_cuda(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, int64_t,
                             int64_t, int64_t) {
  TORCH_CHECK_VALUE(false, "qlinear_int8: int8 activations are a CPU path (the input is on ", x.device(),
                    "); on CUDA use qlinear, whose float16/bfloat16 GEMV already streams the packed weight");
  return at::Tensor();
}

// grad_x = grad_out W~ + scaling/G * unpool(mask * ((grad_out B) A)): W~
// dequantized in grad_out's dtype, cuBLAS for the product.
at::Tensor qlinear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& scale,
                                   const at::Tensor& zero, const std::optional<at::Tensor>& lora_A,
                                   const std::optional<at::Tensor>& lora_B,
                                   const std::optional<at::Tensor>& pool_mask, double scaling, int64_t bits,
                                   int64_t group_size, int64_t layout) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const KernelDispatchGuard kernel_guard;  // the kernel's own casts, not autocast's
  const bool adapter =
      check_grad_input_args(grad_out, packed, scale, zero, lora_A, lora_B, pool_mask, bits, group_size, layout, true);
  const int64_t N = packed.size(0), K = scale.size(1) * group_size;
  const DeviceGuard guard(grad_out.device());
  std::vector<int64_t> out_shape(grad_out.sizes().begin(), grad_out.sizes().end());
  out_shape.back() = K;
  const int64_t M = leading_rows(grad_out);
  if (M == 0 || N == 0) return at::zeros(out_shape, grad_out.options());  // N == 0: an empty sum
  const ContiguousWeight w = weight_of(packed, scale, zero, bits, group_size);
  auto gy = aligned_contiguous(grad_out.reshape({M, N}));
  const bool mma = cuda::grad_input_uses_mma(M, N, float_type_of(gy, "grad_out"), device_info(), path_limits());
  const NvtxRange range(
      range_name("qlinear_grad_input", bits, group_size, M, N, K, mma ? "mma" : "dequant+gemm"));
  at::Tensor group_add;  // the adapter's term, one value per row and group (M, L) float32
  if (adapter) group_add = adapter_grad_per_group(gy, *lora_A, *lora_B, pool_mask, scaling, group_size).contiguous();
  at::Tensor gx;
  if (mma) {
    gx = device_empty({M, K}, gy.options());
    check_launch(cuda::launch_grad_mma(w.view, gy.data_ptr(), float_type_of(gy, "grad_out"), M,
                                       adapter ? group_add.data_ptr<float>() : nullptr, gx.data_ptr(),
                                       current_stream()),
                 "grad_mma");
  } else {
    auto gx32 = gemm_f32(gy, dequantize_to(w, gy.scalar_type(), gy.options()));
    if (adapter) gx32.add_(group_add.repeat_interleave(group_size, 1));
    gx = gx32.to(gy.scalar_type());  // one rounding (SPEC)
  }
  return gx.reshape(out_shape);
}

void register_kernels(torch::Library& m) {
  m.impl("quantize_rtn", &quantize_rtn_cuda);
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("qlinear", &qlinear_cuda);
  m.impl("qlinear_int8", &qlinear_int8_cuda);
  m.impl("qlinear_grad_input", &qlinear_grad_input_cuda);
}

}  // namespace

#if defined(QALORA_CUDA_EMULATION)
// The emulated device's ops: torch.ops.qalora_emu.*, CPU tensors in and out,
// never mixed with the CPU kernels of torch.ops.qalora.
TORCH_LIBRARY(qalora_emu, m) {
  define_qalora_ops(m);
  // Controls of the emulated device (tests and the mutation script use them).
  m.def("cuda_path_limits() -> int[]", [] {
    const auto l = cuda_path_limits();
    return std::vector<int64_t>(l.begin(), l.end());
  });
  m.def("set_cuda_path_limits(int gemv_max_m, int mma_max_m, int grad_mma_max_m) -> ()", &set_cuda_path_limits);
  m.def("set_device(int sms, bool has_mma) -> ()", [](int64_t sms, bool has_mma) {
    TORCH_CHECK_VALUE(sms >= 1, "sms must be >= 1; got ", sms);
    g_emulated_sms.store(static_cast<int>(sms));
    g_emulated_mma.store(has_mma);
  });
  m.def("set_option(str name, str value) -> ()", [](std::string name, std::string value) {
    try {
      qalora_emu::set_option(name, value);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK_VALUE(false, e.what());
    }
  });
  m.def("get_option(str name) -> str", [](std::string name) {
    try {
      return qalora_emu::get_option(name);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK_VALUE(false, e.what());
    }
    return std::string();
  });
  m.def("launch_count() -> int", [] { return qalora_emu::launch_count(); });
}
TORCH_LIBRARY_IMPL(qalora_emu, CPU, m) { register_kernels(m); }
#else
TORCH_LIBRARY_IMPL(qalora, CUDA, m) { register_kernels(m); }
#endif

}  // namespace qalora
