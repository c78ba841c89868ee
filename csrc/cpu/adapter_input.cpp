// The adapter's input at small M, from the group sums of x. Not hot: one build.
#include "cpu/kernels.h"

namespace qalora {
namespace cpu {

void adapter_input(const float* group_sums, const float* mask, const float* A, int64_t M, int64_t L, int64_t rank,
                          double factor, float* u) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xs = group_sums + m * L;
    const float* mk = mask ? mask + m * L : nullptr;
    for (int64_t r = 0; r < rank; ++r) {
      const float* a = A + r * L;
      float acc = 0.f;
      if (mk) {
        for (int64_t g = 0; g < L; ++g) acc += mk[g] * xs[g] * a[g];
      } else {
        for (int64_t g = 0; g < L; ++g) acc += xs[g] * a[g];
      }
      u[m * rank + r] = static_cast<float>(factor * acc);
    }
  }
}

}  // namespace cpu
}  // namespace qalora
