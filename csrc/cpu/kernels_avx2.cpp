// The AVX2 + FMA kernel table. Compiled with -mavx2 -mfma (see CMakeLists.txt) and only
// selected when CPUID reports both.
#include "kernels_portable.h"

namespace pyclipq::cpu {

const KernelTable& avx2_kernels() {
  static const KernelTable table{"avx2", portable_quantize_rows, portable_gemm, portable_linear};
  return table;
}

}  // namespace pyclipq::cpu
