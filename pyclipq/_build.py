"""Loading the compiled extension pyclipq._C, and what it was built with."""
from __future__ import annotations

import importlib

import torch

REBUILD_HINT = (
    "Rebuild pyclipq against the installed torch: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` from the pyclipq source tree "
    "(see README.md)."
)


class ExtensionError(ImportError):
    pass


def load_extension():
    try:
        module = importlib.import_module("pyclipq._C")
    except ImportError as e:
        raise ExtensionError(
            f"pyclipq's compiled extension pyclipq._C could not be loaded ({e}). {REBUILD_HINT}"
        ) from e
    built = module.torch_version()
    if built.split("+")[0] != torch.__version__.split("+")[0]:
        raise ExtensionError(
            f"pyclipq._C was built against torch {built} but torch {torch.__version__} is installed. {REBUILD_HINT}"
        )
    return module


def build_info() -> dict:
    """What the extension was built with and what it picked at run time."""
    info = dict(load_extension().build_info())
    try:
        import triton

        info["triton_version"] = triton.__version__
    except Exception:  # triton is optional: CPU-only installs work without it
        info["triton_version"] = None
    info["torch_runtime_version"] = torch.__version__
    info["cuda_device_available"] = torch.cuda.is_available()
    return info
