"""pyclipq's Triton kernels: kernels and their launch configurations only.

Nothing here imports pyclipq or torch.library: the host wrappers and the torch.library
registrations live in ``pyclipq/ops/triton.py``. Other projects can import the
``@triton.jit`` helpers of :mod:`pyclipq_triton.unpack` into their own kernels.

Format constants (bits, level offsets, K block) are passed in by the caller as
``tl.constexpr`` arguments: ``pyclipq/formats.py`` stays their single source.
"""
