// The block kernels (block_kernels.h) one float at a time: the scalar table's, always built.
#include "block_kernels.h"

namespace pyclipq::cpu {

const BlockKernels& scalar_block_kernels() {
  static const BlockKernels table{"scalar", layer_norm_row_t<ScalarVec>, epilogue_rows_t<ScalarVec>,
                                  attention_head_t<ScalarVec, 1, 1>};
  return table;
}

}  // namespace pyclipq::cpu
