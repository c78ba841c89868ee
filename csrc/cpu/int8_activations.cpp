// Activations quantized to int8 per weight group, for op qlinear_int8 (the
// kernels that consume them are in the ISA tables). Not hot: one build.
#include <cmath>

#include "cpu/kernels.h"

namespace qalora {
namespace cpu {

void quantize_act_i8_rows(const float* x, int64_t K, int64_t group_size, int8_t* xq, float* dx, int64_t m0,
                          int64_t m1) {
  const int64_t L = K / group_size;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < L; ++g) {
      const float* v = x + m * K + g * group_size;
      int8_t* q = xq + m * K + g * group_size;
      float amax = 0.f;
      for (int64_t i = 0; i < group_size; ++i) amax = std::fmax(amax, std::fabs(v[i]));
      dx[m * L + g] = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t i = 0; i < group_size; ++i) {
        const float r = std::nearbyint(v[i] * inv);
        q[i] = static_cast<int8_t>(r > 127.f ? 127.f : (r < -127.f ? -127.f : r));
      }
    }
  }
}

}  // namespace cpu
}  // namespace qalora
