// The portable scalar kernel table: always built, always tested (PYCLIPQ_CPU_ISA=scalar).
#include "kernels_portable.h"

namespace pyclipq::cpu {

const KernelTable& scalar_kernels() {
  static const KernelTable table{"scalar", portable_quantize_rows, portable_gemm, portable_linear, {0, 8, 96 * 1024},
                                 portable_hadamard,
                                 0,
                                 &scalar_block_kernels()};
  return table;
}

}  // namespace pyclipq::cpu
