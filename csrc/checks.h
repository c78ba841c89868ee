// Input checks shared by the CPU and CUDA bindings. Every message names the
// argument, what was expected and what was given; they raise ValueError /
// TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <initializer_list>
#include <optional>
#include <vector>

#include "qalora/format.h"

namespace qalora {

// Below this many rows of activations the packed small-M kernels run; at or
// above it, blocks of W are dequantized and BLAS does the GEMM (measured in
// bench/bench_cpu.py). Must not exceed cpu::kMaxSmallM.
constexpr int64_t kSmallMThreshold = 64;
// The same choice for grad_input (grad_out rows): its packed kernel is an
// axpy per (row, group), slower per row than the forward's, so BLAS takes
// over sooner (bench: INT4 4096x4096, 2 threads).
constexpr int64_t kSmallMThresholdGrad = 10;

// Rows of a (..., F) tensor: the product of its leading dimensions (well
// defined when F is 0, unlike numel() / F).
inline int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

// Inside an op's kernel, ATen calls run without autocast: the op already took
// the activations' dtype (a module under autocast casts x before the call),
// and autocast would otherwise re-cast some operands of the kernel's own
// GEMMs (bfloat16 x against float32 adapter products) but not others.
struct KernelDispatchGuard {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

inline void check_layout(int64_t layout) {
  TORCH_CHECK_VALUE(layout == kLayoutCanonical, "packed layout id ", layout,
                    " is not known to this build (known: 1 = canonical row bitstream v1)");
}

inline void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4; got ", bits);
}

inline void check_group_size(int64_t group_size) {
  TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128,
                    "group_size must be 32, 64 or 128; got ", group_size);
}

inline void check_in_features(int64_t K, int64_t group_size, const char* what) {
  TORCH_CHECK_VALUE(K > 0 && K % group_size == 0, what, ": in_features (", K,
                    ") must be a positive multiple of group_size (", group_size, ")");
}

inline void check_packed(const at::Tensor& packed, int64_t bits, int64_t K) {
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kInt, "packed must be int32; got ", packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, "packed must be 2-D (out_features, words); got shape ", packed.sizes());
  const int64_t want = row_stride_words(K, static_cast<int>(bits));
  TORCH_CHECK_VALUE(packed.size(1) == want, "packed has ", packed.size(1), " words per row; in_features=", K,
                    " at bits=", bits, " needs ", want, " (layout 1)");
}

// unpack's arguments.
inline void check_unpack_args(const at::Tensor& packed, int64_t bits, int64_t in_features, int64_t layout) {
  check_layout(layout);
  check_bits(bits);
  TORCH_CHECK_VALUE(in_features > 0 && in_features % kChunk == 0,
                    "in_features must be a positive multiple of 32; got ", in_features);
  check_packed(packed, bits, in_features);
}

inline void check_quant_weight(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                               int64_t bits, int64_t group_size, int64_t layout) {
  check_layout(layout);
  check_bits(bits);
  check_group_size(group_size);
  TORCH_CHECK_VALUE(scale.dim() == 2, "scale must be 2-D (out_features, groups); got shape ", scale.sizes());
  TORCH_CHECK_VALUE(zero.sizes() == scale.sizes(), "zero has shape ", zero.sizes(), " but scale has ",
                    scale.sizes(), "; both must be (out_features, in_features / group_size)");
  TORCH_CHECK_VALUE(scale.size(1) > 0, "scale must have at least one group; got shape ", scale.sizes());
  for (const at::Tensor* t : {&scale, &zero}) {
    const auto st = t->scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, t == &scale ? "scale" : "zero",
                     " must be float32, float16 or bfloat16; got ", st);
  }
  check_packed(packed, bits, scale.size(1) * group_size);
  TORCH_CHECK_VALUE(packed.size(0) == scale.size(0), "packed has ", packed.size(0), " rows but scale has ",
                    scale.size(0), " (out_features must agree)");
  TORCH_CHECK_VALUE(packed.device() == scale.device() && packed.device() == zero.device(),
                    "packed, scale and zero must be on one device; got ", packed.device(), ", ", scale.device(),
                    ", ", zero.device());
}

inline FloatType float_type_of(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, what, " must be float32, float16 or bfloat16; got ", t.scalar_type());
  }
  return FloatType::kFloat32;
}

// The raw view of a checked packed weight whose tensors are contiguous: what
// the kernels take.
inline PackedView view_of(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                          int64_t group_size) {
  PackedView v;
  v.packed = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  v.stride_words = packed.size(1);
  v.scale = scale.data_ptr();
  v.scale_type = float_type_of(scale, "scale");
  v.zero = zero.data_ptr();
  v.zero_type = float_type_of(zero, "zero");
  v.N = packed.size(0);
  v.K = scale.size(1) * group_size;
  v.bits = static_cast<int>(bits);
  v.group_size = static_cast<int>(group_size);
  return v;
}

// A packed weight made contiguous, with the raw view the kernels take (the
// tensors keep the memory alive while the view is used).
struct ContiguousWeight {
  at::Tensor packed, scale, zero;
  PackedView view;
};

inline ContiguousWeight contiguous_weight(const at::Tensor& packed, const at::Tensor& scale,
                                          const at::Tensor& zero, int64_t bits, int64_t group_size) {
  ContiguousWeight c{packed.contiguous(), scale.contiguous(), zero.contiguous(), {}};
  c.view = view_of(c.packed, c.scale, c.zero, bits, group_size);
  return c;
}

// quantize_rtn's input: a 2-D floating weight whose rows split into groups.
inline void check_quantize_input(const at::Tensor& weight, int64_t bits, int64_t group_size) {
  check_bits(bits);
  check_group_size(group_size);
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (out_features, in_features); got shape ", weight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), "weight must be a floating tensor; got ",
                   weight.scalar_type());
  check_in_features(weight.size(1), group_size, "weight");
}

inline void check_finite_weight(const at::Tensor& w) {
  TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>(),
                    "weight has NaN or infinite values; quantization needs finite weights");
}

// After quantization: scales and zeros must fit their storage dtypes.
inline void check_stored_finite(const at::Tensor& scale, const at::Tensor& zero, int64_t bits) {
  TORCH_CHECK_VALUE(at::isfinite(scale).all().item<bool>(), "a group's scale (max - min) / ", (1 << bits) - 1,
                    " overflows ", scale.scalar_type(), "; store scales as float32 (scale_dtype=torch.float32)");
  TORCH_CHECK_VALUE(at::isfinite(zero).all().item<bool>(), "a group's zero (its minimum) overflows ",
                    zero.scalar_type(), "; store zeros as float32 (zero_dtype=torch.float32)");
}

// pack's input: 2-D uint8 codes, in_features a multiple of 32, every code < 2^bits.
inline void check_codes(const at::Tensor& codes, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK_VALUE(codes.dim() == 2, "codes must be 2-D (out_features, in_features); got shape ", codes.sizes());
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, "codes must be uint8; got ", codes.scalar_type());
  TORCH_CHECK_VALUE(codes.size(1) % kChunk == 0, "codes: in_features must be a multiple of 32; got ",
                    codes.size(1));
  if (codes.numel() > 0) {
    const int64_t mx = codes.max().item<int64_t>();
    TORCH_CHECK_VALUE(mx < (int64_t{1} << bits), "codes must be in [0, ", (1 << bits) - 1, "] for bits=", bits,
                      "; found ", mx);
  }
}

// cuda_kernel: the CUDA kernels' dtypes (float16 too) even for CPU tensors (the
// emulated CUDA ops, QALORA_CUDA_EMULATION).
inline void check_activation(const at::Tensor& x, int64_t features, const char* what, bool cuda_kernel = false) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == features, what, " must have last dimension ", features,
                    "; got shape ", x.sizes());
  const auto st = x.scalar_type();
  if (x.is_cpu() && !cuda_kernel) {
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16, what, " must be float32 or bfloat16 on CPU; got ",
                     st);
  } else {
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, what,
                     " must be float16, bfloat16 or float32; got ", st);
  }
}

inline void check_same_device(const at::Tensor& x, std::initializer_list<const at::Tensor*> others,
                              const char* op) {
  for (const at::Tensor* t : others) {
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": all tensors must be on one device; the input is on ",
                      x.device(), " but the weight is on ", t->device());
  }
}

// Returns whether an adapter is present; checks its shapes.
inline bool check_adapter(const std::optional<at::Tensor>& A, const std::optional<at::Tensor>& B, int64_t N,
                          int64_t L, const at::Tensor& x) {
  TORCH_CHECK_VALUE(A.has_value() == B.has_value(), "lora_A and lora_B must be given together");
  if (!A) return false;
  TORCH_CHECK_VALUE(A->dim() == 2 && A->size(1) == L && A->size(0) >= 1, "lora_A must be (rank, in_features / "
                    "group_size) = (r, ", L, "); got shape ", A->sizes());
  TORCH_CHECK_VALUE(B->dim() == 2 && B->size(0) == N && B->size(1) == A->size(0),
                    "lora_B must be (out_features, rank) = (", N, ", ", A->size(0), "); got shape ", B->sizes());
  for (const at::Tensor* t : {&*A, &*B}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), t == &*A ? "lora_A" : "lora_B",
                     " must be floating point; got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), "lora_A/lora_B are on ", t->device(), " but the input is on ",
                      x.device());
  }
  return true;
}

inline void check_bias(const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& x) {
  if (!bias) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "bias must be (out_features,) = (", N,
                    ",); got shape ", bias->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "bias must be floating point; got ",
                   bias->scalar_type());
  TORCH_CHECK_VALUE(bias->device() == x.device(), "bias is on ", bias->device(), " but the input is on ",
                    x.device());
}

inline void check_pool_mask(const std::optional<at::Tensor>& mask, const at::Tensor& x, int64_t L,
                            bool adapter) {
  if (!mask) return;
  TORCH_CHECK_VALUE(adapter, "pool_mask is the adapter's dropout mask; it needs lora_A and lora_B");
  std::vector<int64_t> want(x.sizes().begin(), x.sizes().end());
  want.back() = L;
  TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef(want), "pool_mask must have shape ", at::IntArrayRef(want),
                    " (the input's leading dims, then groups); got ", mask->sizes());
  TORCH_CHECK_VALUE(mask->device() == x.device(), "pool_mask is on ", mask->device(), " but the input is on ",
                    x.device());
}

// All of qlinear's / qlinear_int8's argument checks; returns whether an adapter is given.
inline bool check_qlinear_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               const at::Tensor& zero, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                               const std::optional<at::Tensor>& pool_mask, int64_t bits, int64_t group_size,
                               int64_t layout, bool cuda_kernel = false) {
  check_quant_weight(packed, scale, zero, bits, group_size, layout);
  const int64_t N = packed.size(0), L = scale.size(1);
  check_activation(x, L * group_size, "x", cuda_kernel);
  check_same_device(x, {&packed, &scale, &zero}, "qlinear");
  const bool adapter = check_adapter(lora_A, lora_B, N, L, x);
  check_bias(bias, N, x);
  check_pool_mask(pool_mask, x, L, adapter);
  return adapter;
}

// All of qlinear_grad_input's argument checks; returns whether an adapter is given.
inline bool check_grad_input_args(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& scale,
                                  const at::Tensor& zero, const std::optional<at::Tensor>& lora_A,
                                  const std::optional<at::Tensor>& lora_B,
                                  const std::optional<at::Tensor>& pool_mask, int64_t bits, int64_t group_size,
                                  int64_t layout, bool cuda_kernel = false) {
  check_quant_weight(packed, scale, zero, bits, group_size, layout);
  const int64_t N = packed.size(0), L = scale.size(1);
  check_activation(grad_out, N, "grad_out", cuda_kernel);
  check_same_device(grad_out, {&packed, &scale, &zero}, "qlinear_grad_input");
  const bool adapter = check_adapter(lora_A, lora_B, N, L, grad_out);
  check_pool_mask(pool_mask, grad_out, L, adapter);
  return adapter;
}

// The adapter's part of grad_x, one value per (row, group) (SPEC "Backward"):
// scaling/G * mask * ((gy B) A), float32 (M, L). gy: (M, N).
// On the CPU the two small products are fixed-order loops (each output a
// serial float32 sum, rows split over threads): a BLAS GEMM with M rows and
// r columns splits its long contraction over threads, and its result then
// depends on the thread count (SPEC: deterministic whatever the count).
inline at::Tensor adapter_grad_per_group(const at::Tensor& gy, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                         const std::optional<at::Tensor>& pool_mask, double scaling,
                                         int64_t group_size) {
  const double factor = scaling / static_cast<double>(group_size);
  if (!gy.is_cpu()) {
    auto g = at::mm(at::mm(gy.to(at::kFloat), lora_B.to(at::kFloat)), lora_A.to(at::kFloat)) * factor;
    if (pool_mask) g = g * pool_mask->reshape({g.size(0), g.size(1)}).to(at::kFloat);
    return g.contiguous();
  }
  const auto y = gy.to(at::kFloat).contiguous();
  const auto B = lora_B.to(at::kFloat).contiguous();  // (N, r)
  const auto A = lora_A.to(at::kFloat).contiguous();  // (r, L)
  const int64_t M = y.size(0), N = y.size(1), r = B.size(1), L = A.size(1);
  at::Tensor mask;
  if (pool_mask) mask = pool_mask->reshape({M, L}).to(at::kFloat).contiguous();
  auto g = at::empty({M, L}, y.options());
  const float* yp = y.data_ptr<float>();
  const float* bp = B.data_ptr<float>();
  const float* ap = A.data_ptr<float>();
  const float* mp = pool_mask ? mask.data_ptr<float>() : nullptr;
  float* gp = g.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> t(static_cast<size_t>(r));
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(t.begin(), t.end(), 0.f);
      for (int64_t n = 0; n < N; ++n) {  // t = gy[m] B, n in order
        const float v = yp[m * N + n];
        for (int64_t j = 0; j < r; ++j) t[j] += v * bp[n * r + j];
      }
      for (int64_t l = 0; l < L; ++l) {
        float s = 0.f;
        for (int64_t j = 0; j < r; ++j) s += t[j] * ap[j * L + l];
        float v = static_cast<float>(s * factor);
        if (mp) v *= mp[m * L + l];
        gp[m * L + l] = v;
      }
    }
  });
  return g;
}

}  // namespace qalora
