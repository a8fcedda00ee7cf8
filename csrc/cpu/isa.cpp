// Run-time choice of the CPU kernel table from CPUID, overridable for tests and
// benchmarks with PYCLIPQ_CPU_ISA=scalar|avx2 (read once, at first use).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "pyclipq/cpu_kernels.h"

namespace pyclipq::cpu {
namespace {

struct Choice {
  const KernelTable* table;
  std::string reason;
};

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

Choice choose() {
  const char* env = std::getenv("PYCLIPQ_CPU_ISA");
  const bool has_avx2 = cpu_has_avx2_fma();
  if (env != nullptr && *env != '\0') {
    if (std::strcmp(env, "scalar") == 0) return {&scalar_kernels(), "forced by PYCLIPQ_CPU_ISA=scalar"};
#if defined(__x86_64__) || defined(_M_X64)
    if (std::strcmp(env, "avx2") == 0) {
      if (!has_avx2) throw std::runtime_error("PYCLIPQ_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
      return {&avx2_kernels(), "forced by PYCLIPQ_CPU_ISA=avx2"};
    }
#endif
    throw std::runtime_error(std::string("PYCLIPQ_CPU_ISA must be 'scalar' or 'avx2', got '") + env + "'");
  }
#if defined(__x86_64__) || defined(_M_X64)
  if (has_avx2) return {&avx2_kernels(), "CPUID: avx2+fma"};
#endif
  return {&scalar_kernels(), "CPUID: no avx2+fma"};
}

const Choice& choice() {
  static const Choice c = choose();
  return c;
}

}  // namespace

const KernelTable& active_kernels() { return *choice().table; }
const char* cpu_isa_reason() { return choice().reason.c_str(); }

}  // namespace pyclipq::cpu
