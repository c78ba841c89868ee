// Run-time choice of the CPU kernel table.
//
// The build compiles the hot kernels once per instruction set; here we pick
// the best one this CPU supports, unless QALORA_CPU_ISA (environment, read
// once) or set_isa() (tests, benchmarks) forces another.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/kernels.h"

namespace qalora {
namespace cpu {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (!std::strcmp(isa, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!std::strcmp(isa, "avx512"))
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!std::strcmp(isa, "avx512vnni"))
    return cpu_has("avx512") && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
#endif
#if defined(__aarch64__)
  if (!std::strcmp(isa, "neon")) return true;  // NEON is part of the aarch64 baseline
#endif
  return !std::strcmp(isa, "scalar");
}

const KernelTable* table_for(const char* isa) {
  if (!cpu_has(isa)) return nullptr;
  if (!std::strcmp(isa, "scalar")) return kernel_table_scalar();
#if defined(QALORA_HAVE_AVX2)
  if (!std::strcmp(isa, "avx2")) return kernel_table_avx2();
#endif
#if defined(QALORA_HAVE_AVX512)
  if (!std::strcmp(isa, "avx512")) return kernel_table_avx512();
#endif
#if defined(QALORA_HAVE_AVX512VNNI)
  if (!std::strcmp(isa, "avx512vnni")) return kernel_table_avx512vnni();
#endif
#if defined(QALORA_HAVE_NEON)
  if (!std::strcmp(isa, "neon")) return kernel_table_neon();
#endif
  return nullptr;
}

const KernelTable* best_table() {
  for (const char* isa : {"avx512vnni", "avx512", "avx2", "neon"}) {
    if (const KernelTable* t = table_for(isa)) return t;
  }
  return kernel_table_scalar();
}

const KernelTable* initial_table() {
  const char* env = std::getenv("QALORA_CPU_ISA");
  if (env && *env && std::strcmp(env, "auto") != 0) {
    if (const KernelTable* t = table_for(env)) return t;
  }
  return best_table();
}

std::atomic<const KernelTable*>& current() {
  static std::atomic<const KernelTable*> table{initial_table()};
  return table;
}

}  // namespace

const KernelTable& active_kernels() { return *current().load(std::memory_order_acquire); }

bool set_isa(const char* name) {
  const KernelTable* t = std::strcmp(name, "auto") == 0 ? best_table() : table_for(name);
  if (!t) return false;
  current().store(t, std::memory_order_release);
  return true;
}

const char* active_isa() { return active_kernels().name; }
const char* best_isa() { return best_table()->name; }

const char* compiled_isas() {
  return "scalar"
#if defined(QALORA_HAVE_AVX2)
         ",avx2"
#endif
#if defined(QALORA_HAVE_AVX512)
         ",avx512"
#endif
#if defined(QALORA_HAVE_AVX512VNNI)
         ",avx512vnni"
#endif
#if defined(QALORA_HAVE_NEON)
         ",neon"
#endif
      ;
}

}  // namespace cpu
}  // namespace qalora
