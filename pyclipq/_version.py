"""The package version: one definition (pyproject.toml reads it, io records it in checkpoints)."""
__version__ = "0.1.0"
