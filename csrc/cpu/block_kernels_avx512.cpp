// The block kernels (block_kernels.h) on 16-float AVX-512 vectors: the avx512_vnni and amx
// tables'. Attention tiles of 4 query rows x 4 key vectors (64 keys, or a 64-wide head in P V):
// 16 accumulators + 4 operands + 1 broadcast of 32 registers.
#include "block_kernels.h"

namespace pyclipq::cpu {

const BlockKernels& avx512_block_kernels() {
  static const BlockKernels table{"avx512", layer_norm_row_t<Avx512Vec>, epilogue_rows_t<Avx512Vec>,
                                  attention_head_t<Avx512Vec, 4, 4>};
  return table;
}

}  // namespace pyclipq::cpu
