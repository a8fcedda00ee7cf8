// Run-time choice of the CPU kernel table from CPUID and XGETBV (and, for AMX, the kernel's
// permission to use tile data), overridable for tests and benchmarks with
// PYCLIPQ_CPU_ISA=scalar|avx2|avx512_vnni|amx (read once, at first use).
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#endif

#include "pyclipq/cpu_kernels.h"

namespace pyclipq::cpu {
namespace {

struct Choice {
  const KernelTable* table;
  std::string reason;
};

// A table the CPU can run, best first, with what CPUID said about it.
struct Candidate {
  const char* name;
  const KernelTable* (*table)();
  bool supported;
  std::string missing;  // what the CPU or OS lacks, when unsupported
};

#if defined(__x86_64__) || defined(_M_X64)
// XCR0: which register state the OS saves on a context switch. AVX needs SSE + YMM (bits 1, 2);
// AVX-512 also needs the opmask, ZMM_Hi256 and Hi16_ZMM state (bits 5, 6, 7). A CPU can report
// AVX-512 in CPUID while the OS leaves zmm state unsaved: then the instructions fault.
uint64_t read_xcr0() {
  uint32_t eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return 0;
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

struct X86Features {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false;
  bool amx_tile = false, amx_int8 = false;
  bool os_ymm = false, os_zmm = false, os_tiles = false;
};

X86Features read_features() {
  X86Features f;
  uint32_t eax, ebx, ecx, edx;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx)) f.fma = ecx & bit_FMA;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) {
    f.avx2 = ebx & bit_AVX2;
    f.avx512f = ebx & bit_AVX512F;
    f.avx512bw = ebx & bit_AVX512BW;
    f.avx512vl = ebx & bit_AVX512VL;
    f.avx512vnni = ecx & bit_AVX512VNNI;
    f.amx_tile = edx & (1u << 24);
    f.amx_int8 = edx & (1u << 25);
  }
  const uint64_t xcr0 = read_xcr0();
  f.os_ymm = (xcr0 & 0x6) == 0x6;
  f.os_zmm = (xcr0 & 0xe6) == 0xe6;
  f.os_tiles = (xcr0 & 0x60000) == 0x60000;  // XTILECFG (bit 17) and XTILEDATA (bit 18)
  return f;
}

// Linux enables the 8 KiB of tile data per process only on request (Documentation/arch/x86/
// xstate.rst): until then the first tile instruction raises SIGILL. Returns "" once this process
// may use tiles, else why not (tests/test_cpu_kernels.py makes the kernel refuse with seccomp).
std::string request_tile_permission() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return std::string("the kernel's tile-data permission (arch_prctl(ARCH_REQ_XCOMP_PERM) failed: ") +
           std::strerror(errno) + ")";
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &granted) != 0 || !(granted & (1ul << kXfeatureXtiledata)))
    return "the kernel's tile-data permission (ARCH_GET_XCOMP_PERM does not list XTILEDATA)";
  return "";
#else
  return "Linux's tile-data permission (arch_prctl): this build targets another OS";
#endif
}

std::string missing_of(std::initializer_list<std::pair<bool, const char*>> needs) {
  std::string out;
  for (const auto& [ok, name] : needs)
    if (!ok) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}
#endif

std::vector<Candidate> candidates() {
  std::vector<Candidate> c;
#if defined(__x86_64__) || defined(_M_X64)
  const X86Features f = read_features();
  std::string miss = missing_of({{f.amx_tile, "amx_tile"},
                                 {f.amx_int8, "amx_int8"},
                                 {f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni, "avx512 f/bw/vl/vnni"},
                                 {f.os_zmm, "OS-saved zmm state (XCR0)"},
                                 {f.os_tiles, "OS-saved tile state (XCR0)"}});
  if (miss.empty()) miss = request_tile_permission();  // asked only of a CPU and OS that have tiles
  c.push_back({"amx", [] { return &amx_kernels(); }, miss.empty(), miss});
  miss = missing_of({{f.avx512f, "avx512f"},
                                 {f.avx512bw, "avx512bw"},
                                 {f.avx512vl, "avx512vl"},
                                 {f.avx512vnni, "avx512_vnni"},
                                 {f.os_zmm, "OS-saved zmm state (XCR0)"}});
  c.push_back({"avx512_vnni", [] { return &avx512_vnni_kernels(); }, miss.empty(), miss});
  miss = missing_of({{f.avx2, "avx2"}, {f.fma, "fma"}, {f.os_ymm, "OS-saved ymm state (XCR0)"}});
  c.push_back({"avx2", [] { return &avx2_kernels(); }, miss.empty(), miss});
#endif
  c.push_back({"scalar", [] { return &scalar_kernels(); }, true, ""});
  return c;
}

Choice choose() {
  const std::vector<Candidate> cands = candidates();
  const char* env = std::getenv("PYCLIPQ_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    std::string names;
    for (const Candidate& c : cands) {
      if (std::strcmp(env, c.name) == 0) {
        if (!c.supported)
          throw std::runtime_error(std::string("PYCLIPQ_CPU_ISA=") + env + " but this CPU/OS lacks " + c.missing);
        return {c.table(), std::string("forced by PYCLIPQ_CPU_ISA=") + env};
      }
      names += (names.empty() ? "'" : ", '") + std::string(c.name) + "'";
    }
    throw std::runtime_error("PYCLIPQ_CPU_ISA must be one of " + names + ", got '" + env + "'");
  }
  std::string skipped;
  for (const Candidate& c : cands) {
    if (c.supported) return {c.table(), "CPUID: best supported" + (skipped.empty() ? "" : " (" + skipped + ")")};
    skipped += (skipped.empty() ? "" : "; ") + std::string(c.name) + " needs " + c.missing;
  }
  return {&scalar_kernels(), "scalar"};
}

const Choice& choice() {
  static const Choice c = choose();
  return c;
}

}  // namespace

const KernelTable& active_kernels() { return *choice().table; }
const char* cpu_isa_reason() { return choice().reason.c_str(); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const Candidate& c : candidates())
    if (c.supported) out.push_back(c.name);
  return out;
}

}  // namespace pyclipq::cpu
