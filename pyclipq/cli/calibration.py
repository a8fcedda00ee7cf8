"""Calibration sets from the user's own files, for `pyclipq convert --calibrate`.

A calibration source is a folder of images (read with PIL and the model's own
preprocessing) or a text file with one caption per line (the model's tokenizer). Given
both, each batch pairs images with texts, so that both towers of a CLIP are calibrated.
"""
from __future__ import annotations

import os

import torch

from .loading import LoadedModel

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TEXT_SUFFIXES = (".txt",)


class CalibrationSetError(ValueError):
    """The calibration files cannot make a calibration set (missing, empty, unreadable, wrong kind)."""


def _image_files(folder: str) -> list[str]:
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def _load_images(paths: list[str], loaded: LoadedModel) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    if loaded.preprocess is None:
        raise CalibrationSetError(f"--calibrate: {loaded.label} has no image preprocessing; calibrate it with a text file")
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(loaded.preprocess(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as e:
            raise CalibrationSetError(f"--calibrate: cannot read image {path} ({type(e).__name__}: {e})") from e
    return torch.stack(tensors)


def _texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def calibration_batches(loaded: LoadedModel, sources: list[str], num_batches: int, batch_size: int) -> list:
    """Up to `num_batches` batches of `batch_size` from image folders and/or caption files."""
    if batch_size < 1 or num_batches < 1:
        raise CalibrationSetError(f"--calibrate-batches and --calibrate-batch-size must be >= 1, got "
                                  f"{num_batches} and {batch_size}")
    wanted = num_batches * batch_size
    images, texts = [], []
    for source in sources:
        if os.path.isdir(source):
            files = _image_files(source)
            if not files:
                raise CalibrationSetError(f"--calibrate: folder {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            images += files
        elif os.path.isfile(source) and source.lower().endswith(TEXT_SUFFIXES):
            lines = _texts(source)
            if not lines:
                raise CalibrationSetError(f"--calibrate: text file {source} has no non-empty line")
            texts += lines
        elif not os.path.exists(source):
            raise CalibrationSetError(f"--calibrate: {source} does not exist")
        else:
            raise CalibrationSetError(f"--calibrate: {source} must be a folder of images or a .txt file with one "
                                      "caption per line")
    if texts and loaded.tokenize is None:
        raise CalibrationSetError(f"--calibrate: {loaded.label} has no tokenizer for the caption file; use images")
    images, texts = images[:wanted], texts[:wanted]
    count = max(len(images), len(texts))
    batches = []
    for start in range(0, count, batch_size):
        parts = []
        if images:  # cycle the shorter source so that every batch feeds both towers
            chunk = [images[i % len(images)] for i in range(start, min(start + batch_size, count))]
            parts.append(_load_images(chunk, loaded))
        if texts:
            chunk = [texts[i % len(texts)] for i in range(start, min(start + batch_size, count))]
            parts.append(loaded.tokenize(chunk))
        batches.append(tuple(parts) if len(parts) > 1 else parts[0])
    return batches
