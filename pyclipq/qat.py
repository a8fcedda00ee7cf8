"""Deprecated: the QAT entry points are ``pyclipq.prepare_qat`` and ``pyclipq.convert_qat``.

``pyclipq.qat.convert`` read as ``pyclipq.convert`` but did something else (it exports a
QAT-prepared model); the names now say which is which. This alias stays for one release.
"""
import warnings

from .train import qat as _qat

_RENAMED = {"prepare": "prepare_qat", "convert": "convert_qat"}


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(f"pyclipq.qat.{name} is now pyclipq.{_RENAMED[name]}", DeprecationWarning, stacklevel=2)
        return getattr(_qat, _RENAMED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
