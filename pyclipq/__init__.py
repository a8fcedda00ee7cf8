"""pyclipq: low-bit (int8 / int4 / int2 / ternary) kernels and conversion for CLIP models."""
from __future__ import annotations

__version__ = "0.1.0"

from ._build import build_info, load_extension  # noqa: E402

_C = load_extension()

from . import formats  # noqa: E402
from . import ops  # noqa: E402

_LAZY = {
    "convert": ("pyclipq.convert", "convert"),
    "save": ("pyclipq.io", "save"),
    "load": ("pyclipq.io", "load"),
    "QuantConfig": ("pyclipq.configs", "QuantConfig"),
    "calibrate": ("pyclipq.calibrate", "calibrate"),
}


def __getattr__(name):
    # Upper layers load on first use so `import pyclipq` stays cheap for kernel users.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'pyclipq' has no attribute {name!r}")


__all__ = ["build_info", "formats", "ops", *_LAZY]
