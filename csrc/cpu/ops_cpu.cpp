// The CPU implementations of the qalora ops (schemas in torch_bindings.cpp):
// input checks, dtype handling, threading, and the choice between the small-M
// packed kernels and the large-M dequantize + GEMM path. The kernels
// themselves (cpu/*.cpp) see raw pointers only.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "cpu/bf16_gemm.h"
#include "cpu/kernels.h"
#include "checks.h"

namespace qalora {
namespace {

static_assert(kSmallMThreshold <= cpu::kMaxSmallM && kSmallMThresholdGrad <= cpu::kMaxSmallM,
              "the small-M kernels keep at most kMaxSmallM rows of accumulators");

// Rows of W dequantized per block in the large-M path: a block of float
// weights stays a few MB so it is reused from cache by the GEMM.
int64_t dequant_block_rows(int64_t K) {
  const int64_t rows = (int64_t{1} << 20) / (4 * K);  // ~1 MB of float32: per-thread, L2-sized
  // ... but never fewer than 64 rows: narrower blocks starve the GEMM (at
  // K = 11008, 16-row blocks ran 1.5x slower than F.linear at M = 512).
  return std::max<int64_t>(64, std::min<int64_t>(1024, rows / 16 * 16));
}

// Parallel dequantize of rows [n0, n1) into out (n1 - n0, K).
void dequantize_block(const PackedView& w, float* out, int64_t n0, int64_t n1) {
  const auto& k = cpu::active_kernels();
  at::parallel_for(n0, n1, 16, [&](int64_t a, int64_t b) { k.dequantize_rows(w, out + (a - n0) * w.K, a, b); });
}

// The group sums of x (M, K) float32 or bfloat16 (read in place): (M, L)
// float32, one sum per row and group.
at::Tensor group_sums_of(const at::Tensor& x2d, int64_t group_size) {
  const int64_t M = x2d.size(0), K = x2d.size(1);
  auto sums = at::empty({M, K / group_size}, x2d.options().dtype(at::kFloat));
  float* sp = sums.data_ptr<float>();
  const auto& k = cpu::active_kernels();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1));
  if (x2d.scalar_type() == at::kBFloat16) {
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(x2d.data_ptr<at::BFloat16>());
    at::parallel_for(0, M, grain, [&](int64_t a, int64_t b) { k.group_sums_bf16(xp, K, group_size, sp, a, b); });
  } else {
    const float* xp = x2d.data_ptr<float>();
    at::parallel_for(0, M, grain, [&](int64_t a, int64_t b) { k.group_sums(xp, K, group_size, sp, a, b); });
  }
  return sums;
}

// The float32 result rounded once to the output dtype. A small bf16 output
// (the small-M paths: at most kMaxSmallM rows) is rounded in one serial
// loop: ATen's copy splits 64K elements over the threads, and on a machine
// shared with other jobs that fork/join cost 20 ms at M = 16 (profiled),
// more than the kernel. Same rounding as torch's (nearest even).
at::Tensor to_output_dtype(const at::Tensor& y, at::ScalarType dtype) {
  if (dtype != at::kBFloat16 || y.numel() > (int64_t{1} << 20) || !y.is_contiguous()) return y.to(dtype);
  auto out = at::empty(y.sizes(), y.options().dtype(at::kBFloat16));
  const float* src = y.data_ptr<float>();
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t i = 0, n = y.numel(); i < n; ++i) dst[i] = float_to_bf16_bits(src[i]);
  return out;
}

// Blocking of the bf16 GEMM paths (bench/bench_cpu.py, 4096 x 4096, AMX).
// Forward: W~ rows per dequantized block (K x 128 bf16 at most 1 MB, so it
// stays in L2 while the rows of x pass over it; 256 rows ran 2x slower) and
// rows of x per GEMM call. grad_input contracts over the rows of W~: blocks
// of kBf16GradCols columns (whole groups) x kBf16GradRows rows, the float32
// accumulators (kBf16GradCallRows x kBf16GradCols) updated once per row block
// (64-column x 4096-row blocks, and 256 x 256, ran at half the dense GEMM's
// speed: x, or gx, re-read too often).
int64_t bf16_block_rows(int64_t K) {
  return std::max<int64_t>(32, std::min<int64_t>(128, ((int64_t{1} << 19) / K) / 16 * 16));  // K x rows bf16 <= 1 MB
}
constexpr int64_t kBf16CallRows = 256;
constexpr int64_t kBf16GradCols = 1024;
constexpr int64_t kBf16GradRows = 512;
constexpr int64_t kBf16GradCallRows = 512;

// ---------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rtn_cpu(const at::Tensor& weight, int64_t bits,
                                                                int64_t group_size, at::ScalarType scale_dtype,
                                                                at::ScalarType zero_dtype) {
  check_quantize_input(weight, bits, group_size);
  const int64_t N = weight.size(0), K = weight.size(1);
  auto w = weight.to(at::kFloat).contiguous();
  check_finite_weight(w);
  auto scale = at::empty({N, K / group_size}, w.options().dtype(scale_dtype));
  auto zero = at::empty({N, K / group_size}, w.options().dtype(zero_dtype));
  const int64_t stride = row_stride_words(K, static_cast<int>(bits));
  auto packed = at::empty({N, stride}, w.options().dtype(at::kInt));
  const FloatType st = float_type_of(scale, "scale_dtype"), zt = float_type_of(zero, "zero_dtype");
  const float* wp = w.data_ptr<float>();
  uint32_t* pp = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  void* sp = scale.data_ptr();
  void* zp = zero.data_ptr();
  at::parallel_for(0, N, 16, [&](int64_t a, int64_t b) {
    cpu::quantize_rtn_rows(wp, K, static_cast<int>(bits), static_cast<int>(group_size), sp, st, zp, zt, pp, stride,
                           a, b);
  });
  check_stored_finite(scale, zero, bits);
  return {packed, scale, zero};
}

at::Tensor pack_cpu(const at::Tensor& codes, int64_t bits) {
  check_codes(codes, bits);
  auto c = codes.contiguous();
  const int64_t N = c.size(0), K = c.size(1);
  const int64_t stride = row_stride_words(K, static_cast<int>(bits));
  auto packed = at::empty({N, stride}, c.options().dtype(at::kInt));
  const uint8_t* cp = c.data_ptr<uint8_t>();
  uint32_t* pp = reinterpret_cast<uint32_t*>(packed.data_ptr<int32_t>());
  at::parallel_for(0, N, 64,
                   [&](int64_t a, int64_t b) { cpu::pack_rows(cp, K, static_cast<int>(bits), pp, stride, a, b); });
  return packed;
}

at::Tensor unpack_cpu(const at::Tensor& packed, int64_t bits, int64_t in_features, int64_t layout) {
  check_unpack_args(packed, bits, in_features, layout);
  auto p = packed.contiguous();
  const int64_t N = p.size(0);
  auto codes = at::empty({N, in_features}, p.options().dtype(at::kByte));
  const uint32_t* pp = reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>());
  uint8_t* cp = codes.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t a, int64_t b) {
    cpu::unpack_rows(pp, p.size(1), in_features, static_cast<int>(bits), cp, a, b);
  });
  return codes;
}

at::Tensor dequantize_cpu(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                          int64_t group_size, int64_t layout) {
  check_quant_weight(packed, scale, zero, bits, group_size, layout);
  const auto cw = contiguous_weight(packed, scale, zero, bits, group_size);
  const PackedView& w = cw.view;
  auto out = at::empty({w.N, w.K}, packed.options().dtype(at::kFloat));
  dequantize_block(w, out.data_ptr<float>(), 0, w.N);
  return out;
}

// ---- qlinear: one function per M path ---------------------------------------

// What the small-M kernels take, as raw pointers: x (M, K), its group sums
// (M, L), and the epilogue's bias (N), adapter input u (M, rank) and lora_B
// (N, rank), each null when absent; y (M, N) is written.
struct SmallMArgs {
  const float* x;  // float32 x, or null when x_bf16 is given
  const uint16_t* x_bf16;
  const float* group_sums;
  const float* bias;
  const float* u;
  const float* B;
  int64_t rank;
  float* y;
};

// The adapter's input u = scaling * (mask * mean over groups) A^T, (M, r):
// small, computed once before the product.
at::Tensor adapter_input_of(const at::Tensor& group_sums, const at::Tensor& lora_A,
                            const std::optional<at::Tensor>& pool_mask, double scaling, int64_t group_size) {
  const int64_t M = group_sums.size(0), L = group_sums.size(1);
  if (M < kSmallMThreshold) {
    // Plain loops: at decode sizes the temporaries of the ATen version
    // cost more than the arithmetic (M x r x L multiply-adds).
    auto A = lora_A.to(at::kFloat).contiguous();
    at::Tensor mask;
    if (pool_mask) mask = pool_mask->reshape({M, L}).to(at::kFloat).contiguous();
    const int64_t rank = A.size(0);
    auto u = at::empty({M, rank}, group_sums.options());
    cpu::adapter_input(group_sums.data_ptr<float>(), pool_mask ? mask.data_ptr<float>() : nullptr,
                       A.data_ptr<float>(), M, L, rank, scaling / static_cast<double>(group_size),
                       u.data_ptr<float>());
    return u;
  }
  auto pooled = group_sums / static_cast<double>(group_size);
  if (pool_mask) pooled = pooled * pool_mask->reshape({M, L}).to(at::kFloat);
  return (at::mm(pooled, lora_A.to(at::kFloat).t()) * scaling).contiguous();
}

// Small M, int8 activations (op qlinear_int8): x quantized per group to int8,
// the code x activation sums exact integers.
void qlinear_rows_int8(const cpu::KernelTable& k, const PackedView& w, const at::Tensor& x2, const SmallMArgs& a) {
  const int64_t M = x2.size(0), K = w.K, L = w.groups();
  TORCH_CHECK_VALUE(at::isfinite(x2).all().item<bool>(),
                    "x has NaN or infinite values; int8 activations need finite inputs");
  auto xq = at::empty({M, K}, x2.options().dtype(at::kChar));
  auto dx = at::zeros({M * L + 16}, x2.options());  // the kernels may read 16 past the end
  int8_t* qp = xq.data_ptr<int8_t>();
  float* dp = dx.data_ptr<float>();
  cpu::quantize_act_i8_rows(a.x, K, w.group_size, qp, dp, 0, M);
  const int64_t Kp = k.prepared_len_i8(K, w.bits);
  auto xqp = at::empty({M, Kp}, xq.options());
  int8_t* pp = xqp.data_ptr<int8_t>();
  for (int64_t m = 0; m < M; ++m) k.prepare_i8(qp + m * K, K, w.bits, pp + m * Kp);
  at::parallel_for(0, w.N, 64, [&](int64_t n0, int64_t n1) {
    k.forward_rows_i8(w, pp, dp, M, a.group_sums, a.bias, a.u, a.B, a.rank, a.y, n0, n1);
  });
}

// Decode-sized M (M <= cpu::kGemvMaxM, the ISA has gemv_rows): the
// hand-written kernel, x in its own order.
void qlinear_gemv(const cpu::KernelTable& k, const PackedView& w, const at::Tensor& x2, const SmallMArgs& a) {
  const int64_t M = x2.size(0), K = w.K;
  const int64_t Kp = k.prepared_len_f32(K, w.bits);
  auto xprep = at::empty({M, Kp}, x2.options().dtype(at::kFloat));
  float* pp = xprep.data_ptr<float>();
  if (a.x_bf16) {
    // bf16 x: each row widened on its own (at most kGemvMaxM rows), then put in the kernel's order.
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xr = a.x_bf16 + m * K;
      for (int64_t i = 0; i < K; ++i) row[i] = bf16_bits_to_float(xr[i]);
      k.prepare_f32(row.data(), K, w.bits, pp + m * Kp);
    }
  } else {
    for (int64_t m = 0; m < M; ++m) k.prepare_f32(a.x + m * K, K, w.bits, pp + m * Kp);
  }
  at::parallel_for(0, w.N, 64, [&](int64_t n0, int64_t n1) {
    k.gemv_rows(w, pp, M, a.group_sums, a.bias, a.u, a.B, a.rank, a.y, n0, n1);
  });
}

// Small M (M < kSmallMThreshold): the packed kernel, all M rows of x per
// block of weight rows.
void qlinear_rows(const cpu::KernelTable& k, const PackedView& w, int64_t M, const SmallMArgs& a) {
  const int64_t N = w.N;
  // Tasks get whole blocks of 16 rows (a multiple of every ISA's row lanes),
  // so only the last rows of the matrix take the one-row tail path.
  constexpr int64_t kRowBlock = 16;
  at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * kRowBlock, n1 = std::min(N, b1 * kRowBlock);
    if (a.x_bf16) {
      k.forward_rows_bf16(w, a.x_bf16, M, a.group_sums, a.bias, a.u, a.B, a.rank, a.y, n0, n1);
    } else {
      k.forward_rows(w, a.x, M, a.group_sums, a.bias, a.u, a.B, a.rank, a.y, n0, n1);
    }
  });
}

// Large M (M >= kSmallMThreshold): the GEMM's arithmetic dominates. One
// parallel region: each task dequantizes its own blocks of rows into a small
// float buffer and runs a single-threaded GEMM on it (BLAS inside a parallel
// region runs serially). One fork/join per call instead of two per block keeps
// this path steady on a busy machine. bias, u and B: float32 or undefined.
void qlinear_dequant_gemm(const cpu::KernelTable& k, const PackedView& w, const at::Tensor& x2, const at::Tensor& bias,
                          const at::Tensor& u, const at::Tensor& B, at::Tensor& y) {
  const int64_t N = w.N, K = w.K;
  const int64_t rows = dequant_block_rows(K);
  const int64_t nblocks = (N + rows - 1) / rows;
  // OpenMP workers do not inherit the caller's thread-local state: without
  // it, the ATen calls below would run outside the caller's inference mode
  // (and refuse to write into y, an inference tensor there) and above the
  // autograd guard.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard same_state(caller_state);
    auto wbuf = at::empty({std::min(rows, N), K}, x2.options());
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * rows, n1 = std::min(N, n0 + rows);
      auto wb = wbuf.narrow(0, 0, n1 - n0);
      k.dequantize_rows(w, wb.data_ptr<float>(), n0, n1);
      auto yb = y.narrow(1, n0, n1 - n0);
      if (bias.defined()) {
        at::addmm_out(yb, bias.narrow(0, n0, n1 - n0), x2, wb.t());
      } else {
        at::mm_out(yb, x2, wb.t());
      }
    }
  });
  if (u.defined()) y.addmm_(u, B.t());
}

// Large M, bfloat16 x, a bf16 GEMM on this CPU (SPEC "16-bit activations"):
// each task dequantizes blocks of bf16_block_rows(K) rows of W~ straight to bf16
// in the GEMM's operand layout and multiplies x (bf16) by them with float32
// accumulation into y (float32); the bias is added per block, the adapter
// after, both in float32, and the caller rounds y once. Tasks own disjoint
// columns of y: the result does not depend on the thread count. Each thread
// takes the next block when it finishes one (not a fixed share): on a machine
// shared with other jobs, a thread that loses its core no longer holds up the
// call with half of the blocks; a block's arithmetic is the same whichever
// thread runs it.
void qlinear_bf16_gemm(const cpu::KernelTable& k, const cpu::Bf16Gemm& gemm, const PackedView& w,
                       const at::Tensor& xb, const at::Tensor& bias, const at::Tensor& u, const at::Tensor& B,
                       at::Tensor& y) {
  const int64_t M = xb.size(0), N = w.N, K = w.K;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t rows = bf16_block_rows(K);
  const int64_t nblocks = (N + rows - 1) / rows;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nblocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<uint32_t> wbuf(static_cast<size_t>(K / 2 * rows));
    for (int64_t blk = next.fetch_add(1); blk < nblocks; blk = next.fetch_add(1)) {
      const int64_t n0 = blk * rows, n1 = std::min(N, n0 + rows), nb = n1 - n0;
      k.dequantize_bf16_kpairs(w, wbuf.data(), n0, n1);
      for (int64_t m0 = 0; m0 < M; m0 += kBf16CallRows) {
        const int64_t mr = std::min(kBf16CallRows, M - m0);
        gemm.gemm(mr, nb, K, xp + m0 * K, K, wbuf.data(), yp + m0 * N + n0, N, false);
      }
      if (bp) {
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) yp[m * N + n] += bp[n];
      }
    }
    gemm.release();
  });
  if (u.defined()) y.addmm_(u, B.t());
}

// x (..., K) -> y (..., N) = x W~^T + bias + scaling * (pool'(x) A^T) B^T.
// int8_activations: below kSmallMThreshold rows, x is quantized per group to
// int8 and the code x activation sums are exact integers (op qlinear_int8).
at::Tensor qlinear_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                        const at::Tensor& zero, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                        const std::optional<at::Tensor>& pool_mask, double scaling, int64_t bits, int64_t group_size,
                        int64_t layout, bool int8_activations) {
  // Registered below autograd (qlinear's gradient is its own op), so the ATen
  // calls inside must not record autograd either: x or the adapter may
  // require grad, and mm_out refuses such inputs.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const KernelDispatchGuard kernel_guard;  // the kernel's own casts, not autocast's
  const bool adapter =
      check_qlinear_args(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, bits, group_size, layout);
  const int64_t N = packed.size(0), K = scale.size(1) * group_size;

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = leading_rows(x);
  if (M == 0 || N == 0) return at::zeros(out_shape, x.options());

  const auto& k = cpu::active_kernels();
  // bfloat16 x: read in place by the small-M kernels; at large M multiplied
  // in bf16 where this CPU has a bf16 GEMM (cpu/bf16_gemm.h), else in float32.
  const bool x_bf16 = x.scalar_type() == at::kBFloat16 && !int8_activations;
  const cpu::Bf16Gemm* bf16_gemm = x_bf16 && M >= cpu::kBf16GemmMinM ? cpu::bf16_gemm() : nullptr;
  const bool keep_bf16 = x_bf16 && (M < kSmallMThreshold || bf16_gemm);
  auto x2 = keep_bf16 ? x.reshape({M, K}).contiguous() : x.reshape({M, K}).to(at::kFloat).contiguous();
  const auto cw = contiguous_weight(packed, scale, zero, bits, group_size);
  const PackedView& w = cw.view;
  auto group_sums = group_sums_of(x2, group_size);

  at::Tensor u, B, b;
  if (adapter) {
    B = lora_B->to(at::kFloat).contiguous();
    u = adapter_input_of(group_sums, *lora_A, pool_mask, scaling, group_size);
  }
  if (bias) b = bias->to(at::kFloat).contiguous();

  auto y = at::empty({M, N}, x2.options().dtype(at::kFloat));
  if (bf16_gemm) {
    qlinear_bf16_gemm(k, *bf16_gemm, w, x2, b, u, B, y);
  } else if (M >= kSmallMThreshold) {
    qlinear_dequant_gemm(k, w, x2, b, u, B, y);
  } else {
    const SmallMArgs args{keep_bf16 ? nullptr : x2.data_ptr<float>(),
                          keep_bf16 ? reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>()) : nullptr,
                          group_sums.data_ptr<float>(),
                          bias ? b.data_ptr<float>() : nullptr,
                          adapter ? u.data_ptr<float>() : nullptr,
                          adapter ? B.data_ptr<float>() : nullptr,
                          adapter ? u.size(1) : 0,
                          y.data_ptr<float>()};
    if (int8_activations) {
      qlinear_rows_int8(k, w, x2, args);
    } else if (M <= cpu::kGemvMaxM && k.gemv_rows) {
      qlinear_gemv(k, w, x2, args);
    } else {
      qlinear_rows(k, w, M, args);
    }
  }
  return to_output_dtype(y, x.scalar_type()).reshape(out_shape);
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& zero, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                       const std::optional<at::Tensor>& pool_mask, double scaling, int64_t bits, int64_t group_size,
                       int64_t layout) {
  return qlinear_impl(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, scaling, bits, group_size, layout,
                      false);
}

at::Tensor qlinear_int8_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const at::Tensor& zero, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                            const std::optional<at::Tensor>& pool_mask, double scaling, int64_t bits,
                            int64_t group_size, int64_t layout) {
  return qlinear_impl(x, packed, scale, zero, bias, lora_A, lora_B, pool_mask, scaling, bits, group_size, layout,
                      true);
}

// grad_input at large M, bfloat16 gy (M, N), a bf16 GEMM on this CPU: gx (M, K)
// float32, holding the adapter's term, += gy W~. Each task owns column blocks
// of gx (kBf16GradCols, whole groups) and walks the rows of W~ in order,
// dequantizing each (rows x columns) block to bf16 in pairs of rows and
// accumulating in float32: no sum crosses tasks, so the result does not
// depend on the thread count.
void grad_input_bf16_gemm(const cpu::KernelTable& k, const cpu::Bf16Gemm& gemm, const PackedView& w,
                          at::Tensor gy, at::Tensor& gx) {
  const int64_t M = gy.size(0), N = w.N, K = w.K, G = w.group_size, L = w.groups();
  // The contraction runs over pairs of rows of W~: an odd N gets one zero column of gy (and a zero row of W~).
  if (N % 2) gy = at::constant_pad_nd(gy, {0, 1});
  const int64_t lda = gy.size(1);
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(gy.data_ptr<at::BFloat16>());
  float* xp = gx.data_ptr<float>();
  const int64_t groups_per_block = std::max<int64_t>(1, kBf16GradCols / G);
  const int64_t nblocks = (L + groups_per_block - 1) / groups_per_block;
  const int64_t rows = std::min(kBf16GradRows, N);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(nblocks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<uint32_t> wbuf(static_cast<size_t>((rows + 1) / 2 * groups_per_block * G));
    for (int64_t c = next.fetch_add(1); c < nblocks; c = next.fetch_add(1)) {
      const int64_t g0 = c * groups_per_block, g1 = std::min(L, g0 + groups_per_block), kb = (g1 - g0) * G;
      for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t n1 = std::min(N, n0 + rows), kc = (n1 - n0 + 1) / 2 * 2;
        k.dequantize_bf16_npairs(w, wbuf.data(), n0, n1, g0, g1);
        for (int64_t m0 = 0; m0 < M; m0 += kBf16GradCallRows) {
          const int64_t mr = std::min(kBf16GradCallRows, M - m0);
          gemm.gemm(mr, kb, kc, gp + m0 * lda + n0, lda, wbuf.data(), xp + m0 * K + g0 * G, K, true);
        }
      }
    }
    gemm.release();
  });
}

// grad_x (..., K) = grad_out W~ + scaling/G * unpool(mask * ((grad_out B) A))
at::Tensor qlinear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& scale,
                                  const at::Tensor& zero, const std::optional<at::Tensor>& lora_A,
                                  const std::optional<at::Tensor>& lora_B,
                                  const std::optional<at::Tensor>& pool_mask, double scaling, int64_t bits,
                                  int64_t group_size, int64_t layout) {
  // Registered below autograd (qlinear's gradient is its own op), so the ATen
  // calls inside must not record autograd either: x or the adapter may
  // require grad, and mm_out refuses such inputs.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const KernelDispatchGuard kernel_guard;  // the kernel's own casts, not autocast's
  const bool adapter =
      check_grad_input_args(grad_out, packed, scale, zero, lora_A, lora_B, pool_mask, bits, group_size, layout);
  const int64_t N = packed.size(0), K = scale.size(1) * group_size, L = scale.size(1);
  std::vector<int64_t> out_shape(grad_out.sizes().begin(), grad_out.sizes().end());
  out_shape.back() = K;
  const int64_t M = leading_rows(grad_out);
  if (M == 0 || N == 0) return at::zeros(out_shape, grad_out.options());  // N == 0: an empty sum

  // bfloat16 grad_out at large M, a bf16 GEMM on this CPU: gy W~ in bf16
  // with float32 accumulation (grad_input_bf16_gemm); otherwise float32.
  const cpu::Bf16Gemm* bf16_gemm =
      grad_out.scalar_type() == at::kBFloat16 && M >= kSmallMThresholdGrad ? cpu::bf16_gemm() : nullptr;
  auto gy = bf16_gemm ? grad_out.reshape({M, N}).contiguous() : grad_out.reshape({M, N}).to(at::kFloat).contiguous();
  const auto cw = contiguous_weight(packed, scale, zero, bits, group_size);
  const PackedView& w = cw.view;

  at::Tensor group_add;  // (M, L): the adapter's gradient, one value per group
  if (adapter) group_add = adapter_grad_per_group(gy, *lora_A, *lora_B, pool_mask, scaling, group_size);

  at::Tensor gx;
  if (bf16_gemm) {
    gx = adapter ? group_add.repeat_interleave(group_size, 1) : at::zeros({M, K}, gy.options().dtype(at::kFloat));
    grad_input_bf16_gemm(cpu::active_kernels(), *bf16_gemm, w, gy, gx);
  } else if (M < kSmallMThresholdGrad) {
    gx = at::empty({M, K}, gy.options());
    auto gyT = gy.t().contiguous();
    const float* gp = gyT.data_ptr<float>();
    const float* ap = adapter ? group_add.data_ptr<float>() : nullptr;
    float* xp = gx.data_ptr<float>();
    const auto& k = cpu::active_kernels();
    // Each task owns whole groups (disjoint columns of gx): no reduction
    // across threads, so the result does not depend on the thread count.
    const int64_t grain = std::max<int64_t>(1, 256 / group_size);
    at::parallel_for(0, L, grain, [&](int64_t g0, int64_t g1) { k.grad_input_groups(w, gp, M, ap, xp, g0, g1); });
  } else {
    gx = adapter ? group_add.repeat_interleave(group_size, 1) : at::zeros({M, K}, gy.options());
    const int64_t rows = dequant_block_rows(K);
    auto wbuf = at::empty({std::min(rows, N), K}, gy.options());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t n1 = std::min(N, n0 + rows);
      auto wb = wbuf.narrow(0, 0, n1 - n0);
      dequantize_block(w, wb.data_ptr<float>(), n0, n1);
      gx.addmm_(gy.narrow(1, n0, n1 - n0), wb);
    }
  }
  return to_output_dtype(gx, grad_out.scalar_type()).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qalora, CPU, m) {
  m.impl("quantize_rtn", &quantize_rtn_cpu);
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("qlinear", &qlinear_cpu);
  m.impl("qlinear_int8", &qlinear_int8_cpu);
  m.impl("qlinear_grad_input", &qlinear_grad_input_cpu);
}

}  // namespace qalora
