// The CUDA emulation's torch-free driver: tests of the emulation layer
// itself, then every kernel of csrc/cuda/ through its launcher against a
// scalar float64 reference. Buffers are exact-size heap allocations
// (std::vector), so under AddressSanitizer a read past a row's padding or
// past the last row is reported; under ThreadSanitizer a shared-memory race
// between emulated threads is (scripts/ci_sanitizers.sh runs both).
//   qalora_emu_selftest              all tests; exit status 0 when all pass
//   qalora_emu_selftest --no-racy    without the tests that remove a barrier on
//                                    purpose (they race: TSan would report them)
//   qalora_emu_selftest --race-demo  only one launch with a barrier removed: under
//                                    TSan it must report a data race (the check
//                                    that TSan sees the emulated threads' races)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda/compat.cuh"
#include "cuda/device_helpers.cuh"
#include "cuda/launchers.cuh"
#include "cuda/mma_sm80.cuh"
#include "qalora/format.h"

using qalora::FloatType;
using qalora::PackedView;

namespace {

int g_failures = 0;
int g_checks = 0;
#define CHECK(cond, ...)                                                 \
  do {                                                                   \
    ++g_checks;                                                          \
    if (!(cond)) {                                                       \
      ++g_failures;                                                      \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
      std::printf(__VA_ARGS__);                                          \
      std::printf("\n");                                                 \
    }                                                                    \
  } while (0)

std::mt19937 rng(12345);
float randn() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

uint32_t f32_bits(float f) { return qalora::float_bits(f); }

// ---- layer tests ------------------------------------------------------------

// mma against a plain 16x16x8 product, fragments built from the PTX ISA's
// formulas (written out here, not the kernels' helpers).
__global__ void mma_kernel(const uint32_t* a, const uint32_t* b, float* d, int bf16) {
  const int lane = threadIdx.x;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = d[lane * 4 + i];
  qalora_emu::mma_m16n8k16(acc, a + lane * 4, b + lane * 2, bf16 ? qalora_emu::MmaType::kBF16 : qalora_emu::MmaType::kF16);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}

void test_mma(bool bf16) {
  auto to16 = [bf16](float v) { return bf16 ? qalora::float_to_bf16_bits(v) : qalora::float_to_half_bits(v); };
  auto from16 = [bf16](uint16_t h) { return bf16 ? qalora::bf16_bits_to_float(h) : qalora::half_bits_to_float(h); };
  uint16_t A[16][16], B[16][8];
  float C[16][8];
  for (auto& r : A)
    for (auto& v : r) v = to16(randn());
  for (auto& r : B)
    for (auto& v : r) v = to16(randn());
  for (auto& r : C)
    for (auto& v : r) v = randn();
  std::vector<uint32_t> a(32 * 4), b(32 * 2);
  std::vector<float> d(32 * 4);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane % 4;
    uint16_t ai[8], bi[4];
    for (int i = 0; i < 8; ++i) {
      const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
      const int col = i < 4 ? 2 * t + (i & 1) : 2 * t + (i & 1) + 8;
      ai[i] = A[row][col];
    }
    for (int i = 0; i < 4; ++i) bi[i] = B[i < 2 ? 2 * t + (i & 1) : 2 * t + (i & 1) + 8][g];
    for (int r = 0; r < 4; ++r) a[lane * 4 + r] = ai[2 * r] | (static_cast<uint32_t>(ai[2 * r + 1]) << 16);
    for (int r = 0; r < 2; ++r) b[lane * 2 + r] = bi[2 * r] | (static_cast<uint32_t>(bi[2 * r + 1]) << 16);
    for (int i = 0; i < 4; ++i) d[lane * 4 + i] = C[i < 2 ? g : g + 8][2 * t + (i & 1)];
  }
  QALORA_LAUNCH(1, 32, 0, nullptr, mma_kernel)(a.data(), b.data(), d.data(), bf16 ? 1 : 0);
  CHECK(cudaGetLastError() == cudaSuccess, "mma launch");
  double worst = 0;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
      double ref = C[row][col];
      for (int k = 0; k < 16; ++k) ref += static_cast<double>(from16(A[row][k])) * from16(B[k][col]);
      worst = std::fmax(worst, std::fabs(d[lane * 4 + i] - ref) / (1.0 + std::fabs(ref)));
    }
  }
  CHECK(worst < 1e-5, "mma %s: worst relative error %g", bf16 ? "bf16" : "f16", worst);
}

__global__ void shfl_kernel(float* out, unsigned mask) {
  const int lane = threadIdx.x;
  if (!((mask >> lane) & 1u)) return;
  float v = static_cast<float>(lane);
  out[lane] = __shfl_xor_sync(mask, v, 16);
}

void test_shfl() {
  std::vector<float> out(32, -1.f);
  QALORA_LAUNCH(1, 32, 0, nullptr, shfl_kernel)(out.data(), 0xffffffffu);
  bool ok = true;
  for (int l = 0; l < 32; ++l) ok &= out[l] == static_cast<float>(l ^ 16);
  CHECK(ok, "full-mask shuffle");
  // Lanes 0..15 only: their xor-16 partners are outside the mask, so the value is undefined (poison).
  std::fill(out.begin(), out.end(), -1.f);
  QALORA_LAUNCH(1, 32, 0, nullptr, shfl_kernel)(out.data(), 0x0000ffffu);
  CHECK(cudaGetLastError() == cudaSuccess, "partial-mask shuffle launch");
  ok = true;
  for (int l = 0; l < 16; ++l) ok &= std::isnan(out[l]);
  for (int l = 16; l < 32; ++l) ok &= out[l] == -1.f;
  CHECK(ok, "a shuffle from a lane outside the mask reads poison");
}

__global__ void divergent_kernel(float* out) {
  const int lane = threadIdx.x;
  if (lane < 16) out[lane] = __shfl_xor_sync(0xffffffffu, 1.f, 1);  // lanes 16..31 never come
}

void test_divergence_fails_the_launch() {
  std::vector<float> out(32);
  QALORA_LAUNCH(1, 32, 0, nullptr, divergent_kernel)(out.data());
  const cudaError_t e = cudaGetLastError();
  CHECK(e == cudaErrorLaunchFailure, "a full-mask shuffle missing lanes deadlocks: got %d", static_cast<int>(e));
  CHECK(std::string(cudaGetErrorString(e)).find("deadlock") != std::string::npos, "message: %s", cudaGetErrorString(e));
}

// cp.async: a copy reads as poison until cp.async.wait_group releases its group.
__global__ void cp_async_kernel(const uint32_t* src, uint32_t* seen) {
  QALORA_SHARED(16, uint32_t, buf, [12]);
  for (int g = 0; g < 3; ++g) {
    qalora::cuda::sm80::cp_async_16(buf + 4 * g, src + 4 * g, true);
    qalora::cuda::sm80::cp_async_commit();
  }
  seen[0] = buf[0];
  qalora::cuda::sm80::cp_async_wait<2>();  // group 0 landed, 1 and 2 in flight
  seen[1] = buf[0];
  seen[2] = buf[4];
  qalora::cuda::sm80::cp_async_wait<0>();
  seen[3] = buf[4];
  seen[4] = buf[8];
  qalora::cuda::sm80::cp_async_4(buf, src, false);  // zero-fill, never waited for: lands at the thread's end
  seen[5] = buf[0];
}

void test_cp_async_groups() {
  std::vector<uint32_t> src(12);
  for (int i = 0; i < 12; ++i) src[i] = 100 + i;
  std::vector<uint32_t> seen(6, 7);
  QALORA_LAUNCH(1, 1, 0, nullptr, cp_async_kernel)(src.data(), seen.data());
  CHECK(cudaGetLastError() == cudaSuccess, "cp.async launch");
  CHECK(seen[0] == 0xFFFFFFFFu, "before any wait: poison, got %u", seen[0]);
  CHECK(seen[1] == 100 && seen[2] == 0xFFFFFFFFu, "wait_group 2: group 0 only (%u, %u)", seen[1], seen[2]);
  CHECK(seen[3] == 104 && seen[4] == 108, "wait_group 0: all (%u, %u)", seen[3], seen[4]);
  CHECK(seen[5] == 0xFFFFFFFFu, "an unwaited zero-fill reads poison, got %u", seen[5]);
}

// A barrier between writes and reads of other threads' shared memory; the
// adversarial order makes its removal visible.
constexpr int kBarrierLine = __LINE__ + 5;  // the __syncthreads() below
__global__ void barrier_kernel(float* out) {
  QALORA_SHARED(4, float, sh, [128]);
  const int t = threadIdx.x;
  sh[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = sh[(t + 37) % 128];
}

bool g_no_racy = false;

void race_demo() {
  std::vector<float> out(128);
  qalora_emu::set_option("skip_barrier", std::string(__FILE__) + ":" + std::to_string(kBarrierLine));
  QALORA_LAUNCH(1, 128, 0, nullptr, barrier_kernel)(out.data());
}

void test_barrier_and_poison() {
  std::vector<float> out(128);
  QALORA_LAUNCH(1, 128, 0, nullptr, barrier_kernel)(out.data());
  bool ok = true;
  for (int t = 0; t < 128; ++t) ok &= out[t] == static_cast<float>((t + 37) % 128);
  CHECK(ok, "barrier: every thread reads its neighbour's value");
  if (g_no_racy) return;
  const std::string saved = qalora_emu::get_option("skip_barrier");
  for (const char* order : {"adversarial", "reverse", "shuffle", "forward"}) {
    qalora_emu::set_option("order", order);
    qalora_emu::set_option("skip_barrier", std::string(__FILE__) + ":" + std::to_string(kBarrierLine));
    QALORA_LAUNCH(1, 128, 0, nullptr, barrier_kernel)(out.data());
    int poisoned = 0;
    for (int t = 0; t < 128; ++t) poisoned += std::isnan(out[t]);
    if (std::string(order) == "forward")
      CHECK(poisoned > 0 && poisoned < 128, "forward order: the reads of later threads' slots are poison (%d)", poisoned);
    else
      CHECK(poisoned > 0, "order %s: without the barrier some reads are poison (%d)", order, poisoned);
  }
  qalora_emu::set_option("skip_barrier", saved);
  qalora_emu::set_option("order", "adversarial");
}

// ---- the kernels against a scalar reference --------------------------------

struct Layer {
  int64_t N, K;
  int bits, G;
  std::vector<uint8_t> codes;
  std::vector<uint32_t> packed;
  std::vector<float> scale, zero;
  PackedView view() const {
    PackedView v;
    v.packed = packed.data();
    v.stride_words = qalora::row_stride_words(K, bits);
    v.scale = scale.data();
    v.scale_type = FloatType::kFloat32;
    v.zero = zero.data();
    v.zero_type = FloatType::kFloat32;
    v.N = N;
    v.K = K;
    v.bits = bits;
    v.group_size = G;
    return v;
  }
  double w(int64_t n, int64_t k) const { return static_cast<double>(scale[n * (K / G) + k / G]) * codes[n * K + k] + zero[n * (K / G) + k / G]; }
};

Layer make_layer(int64_t N, int64_t K, int bits, int G) {
  Layer l{N, K, bits, G, {}, {}, {}, {}};
  const int64_t S = qalora::row_stride_words(K, bits);
  l.codes.resize(N * K);
  l.packed.assign(N * S, 0u);
  for (auto& c : l.codes) c = static_cast<uint8_t>(rng() % (1u << bits));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < K / 32; ++c) qalora::pack_chunk(&l.codes[n * K + c * 32], bits, &l.packed[n * S + c * bits]);
  l.scale.resize(N * (K / G));
  l.zero.resize(N * (K / G));
  for (auto& s : l.scale) s = 0.01f + 0.02f * std::fabs(randn());
  for (auto& z : l.zero) z = -0.1f * std::fabs(randn());
  return l;
}

template <typename T>
std::vector<T> activations(int64_t M, int64_t K, FloatType t, std::vector<double>* exact) {
  std::vector<T> x(M * K);
  exact->resize(M * K);
  for (int64_t i = 0; i < M * K; ++i) {
    float v = randn();
    if (t == FloatType::kFloat16) {
      const uint16_t h = qalora::float_to_half_bits(v);
      std::memcpy(&x[i], &h, 2);
      v = qalora::half_bits_to_float(h);
    } else if (t == FloatType::kBFloat16) {
      const uint16_t h = qalora::float_to_bf16_bits(v);
      std::memcpy(&x[i], &h, 2);
      v = qalora::bf16_bits_to_float(h);
    } else {
      std::memcpy(&x[i], &v, 4);
    }
    (*exact)[i] = v;
  }
  return x;
}

float out_value(const void* y, int64_t i, FloatType t) { return qalora::load_store(y, i, t); }

double rel(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

// The forward through the binding's sequence (chunk sums, adapter input, the kernel, split-K reduce).
void test_forward(const char* path, int64_t M, int64_t N, int64_t K, int bits, int G, FloatType t, int splits) {
  Layer l = make_layer(N, K, bits, G);
  const PackedView w = l.view();
  std::vector<double> xe;
  std::vector<uint16_t> x16;
  std::vector<float> x32;
  const void* x;
  if (t == FloatType::kFloat32) {
    x32 = activations<float>(M, K, t, &xe);
    x = x32.data();
  } else {
    x16 = activations<uint16_t>(M, K, t, &xe);
    x = x16.data();
  }
  const int64_t L = K / G, rank = 3;
  std::vector<float> cs(M * (K / 32)), bias(N), A(rank * L), B(N * rank), u(M * rank), ws(splits * M * N);
  for (auto& v : bias) v = randn();
  for (auto& v : A) v = 0.3f * randn();
  for (auto& v : B) v = 0.3f * randn();
  std::vector<uint16_t> y16(t == FloatType::kFloat32 ? 0 : M * N);
  std::vector<float> y32(t == FloatType::kFloat32 ? M * N : 0);
  void* y = t == FloatType::kFloat32 ? static_cast<void*>(y32.data()) : static_cast<void*>(y16.data());
  CHECK(qalora::cuda::launch_chunk_sums(x, t, M, K, cs.data(), nullptr) == cudaSuccess, "chunk sums");
  CHECK(qalora::cuda::launch_adapter_input(cs.data(), nullptr, A.data(), M, L, rank, G, 1.5f, u.data(), nullptr) ==
            cudaSuccess, "adapter input");
  cudaError_t e;
  if (std::string(path) == "gemv")
    e = qalora::cuda::launch_gemv(w, x, t, M, cs.data(), bias.data(), u.data(), B.data(), rank, y, splits,
                                  splits > 1 ? ws.data() : nullptr, nullptr);
  else
    e = qalora::cuda::launch_mma_gemm(w, x, t, M, cs.data(), bias.data(), u.data(), B.data(), rank, y, splits,
                                      splits > 1 ? ws.data() : nullptr, nullptr);
  CHECK(e == cudaSuccess, "%s launch: %s", path, cudaGetErrorString(e));
  std::vector<double> got(M * N), ref(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias[n];
      for (int64_t k = 0; k < K; ++k) acc += xe[m * K + k] * l.w(n, k);
      for (int64_t r = 0; r < rank; ++r) {
        double ur = 0;
        for (int64_t g = 0; g < L; ++g) {
          double xs = 0;
          for (int64_t k = g * G; k < (g + 1) * G; ++k) xs += xe[m * K + k];
          ur += xs * A[r * L + g];
        }
        acc += 1.5 / G * ur * B[n * rank + r];
      }
      ref[m * N + n] = acc;
      got[m * N + n] = out_value(y, m * N + n, t);
    }
  const double err = rel(got, ref), tol = t == FloatType::kFloat32 ? 1e-5 : t == FloatType::kFloat16 ? 2e-3 : 1e-2;
  CHECK(err <= tol, "%s M=%lld N=%lld K=%lld b=%d G=%d type=%d splits=%d: relative error %g", path, (long long)M,
        (long long)N, (long long)K, bits, G, static_cast<int>(t), splits, err);
}

void test_grad(int64_t M, int64_t N, int64_t K, int bits, int G, FloatType t) {
  Layer l = make_layer(N, K, bits, G);
  std::vector<double> ge;
  std::vector<uint16_t> gy = activations<uint16_t>(M, N, t, &ge);
  const int64_t L = K / G;
  std::vector<float> add(M * L);
  for (auto& v : add) v = randn();
  std::vector<uint16_t> gx(M * K);
  const cudaError_t e = qalora::cuda::launch_grad_mma(l.view(), gy.data(), t, M, add.data(), gx.data(), nullptr);
  CHECK(e == cudaSuccess, "grad_mma launch: %s", cudaGetErrorString(e));
  std::vector<double> got(M * K), ref(M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      double acc = add[m * L + k / G];
      for (int64_t n = 0; n < N; ++n) acc += ge[m * N + n] * l.w(n, k);
      ref[m * K + k] = acc;
      got[m * K + k] = out_value(gx.data(), m * K + k, t);
    }
  const double err = rel(got, ref), tol = t == FloatType::kFloat16 ? 2e-3 : 1e-2;
  CHECK(err <= tol, "grad_mma M=%lld N=%lld K=%lld b=%d G=%d: relative error %g", (long long)M, (long long)N,
        (long long)K, bits, G, err);
}

void test_format(int64_t N, int64_t K, int bits, int G) {
  Layer l = make_layer(N, K, bits, G);
  const int64_t S = qalora::row_stride_words(K, bits);
  std::vector<uint8_t> codes(N * K);
  CHECK(qalora::cuda::launch_unpack(l.packed.data(), S, N, K, bits, codes.data(), nullptr) == cudaSuccess, "unpack");
  CHECK(codes == l.codes, "unpack N=%lld K=%lld b=%d", (long long)N, (long long)K, bits);
  std::vector<uint32_t> packed(N * S, 0u);
  CHECK(qalora::cuda::launch_pack(l.codes.data(), N, K, bits, packed.data(), S, nullptr) == cudaSuccess, "pack");
  CHECK(packed == l.packed, "pack N=%lld K=%lld b=%d", (long long)N, (long long)K, bits);
  std::vector<float> deq(N * K);
  CHECK(qalora::cuda::launch_dequantize(l.view(), deq.data(), FloatType::kFloat32, nullptr) == cudaSuccess, "dequantize");
  double worst = 0;
  for (int64_t i = 0; i < N * K; ++i) worst = std::fmax(worst, std::fabs(deq[i] - l.w(i / K, i % K)));
  CHECK(worst < 1e-6, "dequantize: worst error %g", worst);
  // RTN: the codes of a weight that is exactly a dequantized layer come back.
  std::vector<float> wts(N * K);
  for (int64_t i = 0; i < N * K; ++i) wts[i] = randn();
  std::vector<uint16_t> sc(N * (K / G));
  std::vector<float> zr(N * (K / G));
  std::vector<uint32_t> q(N * S, 0u);
  CHECK(qalora::cuda::launch_quantize_rtn(wts.data(), N, K, bits, G, sc.data(), FloatType::kFloat16, zr.data(),
                                          FloatType::kFloat32, q.data(), S, nullptr) == cudaSuccess, "rtn");
  bool ok = true;
  for (int64_t n = 0; n < N && ok; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const float s = qalora::half_bits_to_float(sc[n * (K / G) + k / G]), z = zr[n * (K / G) + k / G];
      const float wq = s * static_cast<float>(qalora::get_code(&q[n * S], k, bits)) + z;
      if (std::fabs(wq - wts[n * K + k]) > s / 2 * 1.001f + 1e-6f) ok = false;
    }
  CHECK(ok, "quantize_rtn N=%lld K=%lld b=%d G=%d: |W~ - w| <= scale / 2", (long long)N, (long long)K, bits, G);
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--race-demo") {
      race_demo();
      return 0;
    }
    if (a == "--no-racy") g_no_racy = true;
  }
  test_mma(false);
  test_mma(true);
  test_shfl();
  test_divergence_fails_the_launch();
  test_cp_async_groups();
  test_barrier_and_poison();
  for (int bits = 2; bits <= 4; ++bits) {
    for (FloatType t : {FloatType::kFloat16, FloatType::kBFloat16, FloatType::kFloat32}) {
      test_forward("gemv", 3, 9, 416, bits, 32, t, 1);
      test_forward("gemv", 8, 5, 4096, bits, 64, t, 4);
    }
    for (FloatType t : {FloatType::kFloat16, FloatType::kBFloat16}) {
      test_forward("mma", 17, 72, 576, bits, 64, t, 1);
      test_forward("mma", 65, 9, 1024, bits, 128, t, 2);
      test_grad(17, 40, 608, bits, 32, t);
      test_grad(65, 24, 256, bits, 128, t);
    }
    test_format(7, 96, bits, 32);
    test_format(5, 384, bits, 128);
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures ? 1 : 0;
}
