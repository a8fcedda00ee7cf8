"""pyclipq: low-bit (int8 / int4 / int2 / ternary) kernels and conversion for CLIP models."""
from __future__ import annotations

from ._build import build_info, load_extension
from ._version import __version__  # noqa: F401  (the public pyclipq.__version__)

_C = load_extension()

from . import formats  # noqa: E402
from . import ops  # noqa: E402

# Imported eagerly on purpose: `pyclipq.convert` and `pyclipq.calibrate` name both a
# function and a module, and a lazily imported submodule would shadow the function.
from .configs import QuantConfig  # noqa: E402
from .convert import convert, summary  # noqa: E402
from .io import load, save  # noqa: E402
from .models import pooled_only  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .train.qat import convert_qat, prepare_qat  # noqa: E402

__all__ = ["__version__", "build_info", "formats", "ops", "QuantConfig", "convert", "summary", "save", "load", "pooled_only", "calibrate",
           "prepare_qat", "convert_qat"]
