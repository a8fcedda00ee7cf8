// Limits that a backend's kernels and pyclipq/ops' routing rule must agree on. Torch-free, shared
// by the CUDA kernels and the Python module (_C.backend_limits, checked by tests/test_ops.py).
#pragma once

namespace pyclipq {

// The CUDA fused linears run the GEMV kernel up to this many rows (one m16 MMA tile), the GEMM above.
inline constexpr int kGemvMaxM = 16;

}  // namespace pyclipq
