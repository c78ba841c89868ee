// CUDA implementations of the qalora ops (schemas in torch_bindings.cpp):
// input checks, device guard, the current stream, the choice of path by M, an
// NVTX range per call, and a check of every launch. The kernels (the .cu files,
// declared in cuda/launchers.cuh) see raw pointers only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <nvtx3/nvToolsExt.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/launchers.cuh"
#include "checks.h"

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
  g_gemv_max_m.store(gemv_max_m);
  g_mma_max_m.store(mma_max_m);
  g_grad_mma_max_m.store(grad_mma_max_m);
}
std::array<int64_t, 3> cuda_path_limits() {
  return {g_gemv_max_m.load(), g_mma_max_m.load(), g_grad_mma_max_m.load()};
}

namespace {

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
  if (reinterpret_cast<uintptr_t>(p.data_ptr()) % 16 != 0) p = p.clone();
  return contiguous_weight(p, scale, zero, bits, group_size);
}

// Contiguous and 16-byte aligned (the GEMV reads activations 16 bytes at a time).
at::Tensor aligned_contiguous(const at::Tensor& t) {
  auto c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
bool has_mma_m16n8k16() { return at::cuda::getCurrentDeviceProperties()->major >= 8; }

enum class Path { kGemv, kMma, kDequantCublas };
const char* path_name(Path p) {
  switch (p) {
    case Path::kGemv: return "gemv";
    case Path::kMma: return "mma";
    default: return "dequant+cublas";
  }
}
Path qlinear_path(int64_t M, at::ScalarType xt) {
  const auto limits = cuda_path_limits();
  if (M <= limits[0]) return Path::kGemv;
  if (M <= limits[1] && xt != at::kFloat && has_mma_m16n8k16()) return Path::kMma;
  return Path::kDequantCublas;
}

// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rtn_cuda(const at::Tensor& weight, int64_t bits,
                                                                 int64_t group_size, at::ScalarType scale_dtype,
                                                                 at::ScalarType zero_dtype) {
  check_quantize_input(weight, bits, group_size);
  const c10::cuda::CUDAGuard guard(weight.device());
  auto w = weight.to(at::kFloat).contiguous();
  check_finite_weight(w);
  const int64_t N = w.size(0), K = w.size(1);
  auto scale = at::empty({N, K / group_size}, w.options().dtype(scale_dtype));
  auto zero = at::empty({N, K / group_size}, w.options().dtype(zero_dtype));
  auto packed = at::zeros({N, row_stride_words(K, static_cast<int>(bits))}, w.options().dtype(at::kInt));
  const NvtxRange range(range_name("quantize_rtn", bits, group_size, 0, N, K, "rtn"));
  check_launch(cuda::launch_quantize_rtn(w.data_ptr<float>(), N, K, static_cast<int>(bits),
                                         static_cast<int>(group_size), scale.data_ptr(),
                                         float_type_of(scale, "scale_dtype"), zero.data_ptr(),
                                         float_type_of(zero, "zero_dtype"),
                                         reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()), packed.size(1),
                                         at::cuda::getCurrentCUDAStream()),
               "quantize_rtn");
  check_stored_finite(scale, zero, bits);
  return {packed, scale, zero};
}

at::Tensor pack_cuda(const at::Tensor& codes, int64_t bits) {
  const c10::cuda::CUDAGuard guard(codes.device());
  check_codes(codes, bits);
  auto c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  auto packed = at::zeros({N, row_stride_words(K, static_cast<int>(bits))}, c.options().dtype(at::kInt));
  if (c.numel() == 0) return packed;
  check_launch(cuda::launch_pack(c.data_ptr<uint8_t>(), N, K, static_cast<int>(bits),
                                 reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>()), packed.size(1),
                                 at::cuda::getCurrentCUDAStream()),
               "pack");
  return packed;
}

at::Tensor unpack_cuda(const at::Tensor& packed, int64_t bits, int64_t in_features, int64_t layout) {
  check_unpack_args(packed, bits, in_features, layout);
  const c10::cuda::CUDAGuard guard(packed.device());
  auto p = packed.contiguous();
  auto codes = at::empty({p.size(0), in_features}, p.options().dtype(at::kByte));
  if (p.size(0) == 0) return codes;
  check_launch(cuda::launch_unpack(reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>()), p.size(1), p.size(0),
                                   in_features, static_cast<int>(bits), codes.data_ptr<uint8_t>(),
                                   at::cuda::getCurrentCUDAStream()),
               "unpack");
  return codes;
}

// W~ (N, K) in `dtype`.
at::Tensor dequantize_to(const ContiguousWeight& w, at::ScalarType dtype, const at::TensorOptions& opts) {
  auto out = at::empty({w.view.N, w.view.K}, opts.dtype(dtype));
  if (w.view.N == 0) return out;
  check_launch(cuda::launch_dequantize(w.view, out.data_ptr(), float_type_of(out, "out"),
                                       at::cuda::getCurrentCUDAStream()),
               "dequantize");
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                           int64_t group_size, int64_t layout) {
  check_quant_weight(packed, scale, zero, bits, group_size, layout);
  const c10::cuda::CUDAGuard guard(packed.device());
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
      check_qlinear_args(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, bits, group_size, layout);
  const int64_t N = packed.size(0), K = scale.size(1) * group_size, L = scale.size(1);
  const c10::cuda::CUDAGuard guard(x.device());

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = leading_rows(x);
  if (M == 0 || N == 0) return at::zeros(out_shape, x.options());
  const ContiguousWeight w = weight_of(packed, scale, zero, bits, group_size);
  auto x2 = aligned_contiguous(x.reshape({M, K}));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);

  // Chunk sums of x (the zeros' term of the GEMV and the MMA kernel, and the
  // group sums the adapter's input is made of)
  // and the adapter's u = scaling/G * (mask * group sums) A^T, (M, r).
  const Path path = qlinear_path(M, x2.scalar_type());
  const NvtxRange range(range_name("qlinear", bits, group_size, M, N, K, path_name(path)));
  at::Tensor chunk_sums;
  if (path != Path::kDequantCublas || adapter) {
    chunk_sums = at::empty({M, K / kChunk}, f32);
    check_launch(
        cuda::launch_chunk_sums(x2.data_ptr(), float_type_of(x2, "x"), M, K, chunk_sums.data_ptr<float>(), stream),
        "chunk_sums");
  }
  at::Tensor u, B, A, mask, b;
  if (adapter) {
    A = lora_A->to(at::kFloat).contiguous();
    B = lora_B->to(at::kFloat).contiguous();
    if (pool_mask) mask = pool_mask->reshape({M, L}).to(at::kFloat).contiguous();
    u = at::empty({M, A.size(0)}, f32);
    check_launch(cuda::launch_adapter_input(chunk_sums.data_ptr<float>(), pool_mask ? mask.data_ptr<float>() : nullptr,
                                            A.data_ptr<float>(), M, L, A.size(0), static_cast<int>(group_size),
                                            static_cast<float>(scaling), u.data_ptr<float>(), stream),
                 "adapter_input");
  }
  if (bias) b = bias->to(at::kFloat).contiguous();

  at::Tensor y;
  if (path != Path::kDequantCublas) {
    y = at::empty({M, N}, x2.options());
    const bool gemv = path == Path::kGemv;
    const int splits = gemv ? cuda::gemv_splits(w.view, sm_count()) : cuda::mma_splits(w.view, M, sm_count());
    at::Tensor workspace;
    if (splits > 1) workspace = at::empty({splits, M, N}, f32);
    const auto launch = gemv ? cuda::launch_gemv : cuda::launch_mma_gemm;
    check_launch(launch(w.view, x2.data_ptr(), float_type_of(x2, "x"), M, chunk_sums.data_ptr<float>(),
                        bias ? b.data_ptr<float>() : nullptr, adapter ? u.data_ptr<float>() : nullptr,
                        adapter ? B.data_ptr<float>() : nullptr, adapter ? u.size(1) : 0, y.data_ptr(), splits,
                        splits > 1 ? workspace.data_ptr<float>() : nullptr, stream),
                 path_name(path));
  } else {
    // Large M: dequantize into a buffer of x's dtype (the caching allocator
    // reuses it call to call) and let cuBLAS do the GEMM.
    auto wdq = dequantize_to(w, x2.scalar_type(), x2.options());
    y = bias ? at::addmm(b.to(x2.scalar_type()), x2, wdq.t()) : at::mm(x2, wdq.t());
    if (adapter) y = (y.to(at::kFloat) + at::mm(u, B.t())).to(x2.scalar_type());
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
      check_grad_input_args(grad_out, packed, scale, zero, lora_A, lora_B, pool_mask, bits, group_size, layout);
  const int64_t N = packed.size(0), K = scale.size(1) * group_size;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  std::vector<int64_t> out_shape(grad_out.sizes().begin(), grad_out.sizes().end());
  out_shape.back() = K;
  const int64_t M = leading_rows(grad_out);
  if (M == 0 || N == 0) return at::zeros(out_shape, grad_out.options());  // N == 0: an empty sum
  const ContiguousWeight w = weight_of(packed, scale, zero, bits, group_size);
  auto gy = aligned_contiguous(grad_out.reshape({M, N}));
  const bool mma = M <= cuda_path_limits()[2] && gy.scalar_type() != at::kFloat && N % 8 == 0 &&
                   has_mma_m16n8k16();
  const NvtxRange range(
      range_name("qlinear_grad_input", bits, group_size, M, N, K, mma ? "mma" : "dequant+cublas"));
  at::Tensor group_add;  // the adapter's term, one value per row and group (M, L) float32
  if (adapter) group_add = adapter_grad_per_group(gy, *lora_A, *lora_B, pool_mask, scaling, group_size).contiguous();
  at::Tensor gx;
  if (mma) {
    gx = at::empty({M, K}, gy.options());
    check_launch(cuda::launch_grad_mma(w.view, gy.data_ptr(), float_type_of(gy, "grad_out"), M,
                                       adapter ? group_add.data_ptr<float>() : nullptr, gx.data_ptr(),
                                       at::cuda::getCurrentCUDAStream()),
                 "grad_mma");
  } else {
    gx = at::mm(gy, dequantize_to(w, gy.scalar_type(), gy.options()));
    if (adapter) gx = (gx.to(at::kFloat) + group_add.repeat_interleave(group_size, 1)).to(gy.scalar_type());
  }
  return gx.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qalora, CUDA, m) {
  m.impl("quantize_rtn", &quantize_rtn_cuda);
  m.impl("pack", &pack_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("qlinear", &qlinear_cuda);
  m.impl("qlinear_int8", &qlinear_int8_cuda);
  m.impl("qlinear_grad_input", &qlinear_grad_input_cuda);
}

}  // namespace qalora
