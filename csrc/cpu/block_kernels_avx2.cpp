// The block kernels (block_kernels.h) on 8-float AVX2 vectors (compiled with -mavx2 -mfma):
// the avx2 table's. Attention tiles of 4 query rows x 2 key vectors: 8 accumulators of 16 registers.
#include "block_kernels.h"

namespace pyclipq::cpu {

const BlockKernels& avx2_block_kernels() {
  static const BlockKernels table{"avx2", layer_norm_row_t<Avx2Vec>, epilogue_rows_t<Avx2Vec>,
                                  attention_head_t<Avx2Vec, 4, 2>};
  return table;
}

}  // namespace pyclipq::cpu
