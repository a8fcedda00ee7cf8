"""`pyclipq.qat.prepare` / `pyclipq.qat.convert`: the QAT entry points (defined in pyclipq.train.qat)."""
from .train.qat import convert, prepare  # noqa: F401

__all__ = ["prepare", "convert"]
