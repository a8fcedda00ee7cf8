"""pyclipq's Triton kernels: kernels and their launch configurations only.

Nothing here imports pyclipq or torch.library: the host wrappers and the torch.library
registrations live in ``pyclipq/ops/triton.py``. Other projects can import the
``@triton.jit`` helpers of :mod:`pyclipq_triton.unpack` into their own kernels.

A format's constants (bits, level offsets) are passed in by the caller as ``tl.constexpr``
arguments; the layout's block width and trits per byte are the two constexprs of
:mod:`pyclipq_triton.unpack`, which tests/test_triton_ops.py checks against pyclipq/formats.py.
"""
