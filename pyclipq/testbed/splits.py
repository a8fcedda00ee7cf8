"""Train / validation / test splits of the test bed, each a deterministic stream of scenes.

A split is a sequence of fixed-size chunks; chunk i of split s is rendered from a generator
seeded by numpy's SeedSequence([s's code, i]), so splits never share a seed and
make_split(s, n) is always a prefix of make_split(s, m) for m > n.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from .captions import CaptionBatch, write_captions
from .scenes import SceneAttributes, sample_and_render

SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
_ATTRIBUTE_FIELDS = tuple(field.name for field in fields(SceneAttributes))
CHUNK_SIZE = 256


@dataclass
class TestbedSplit:
    """Model-ready scenes: images in [0, 1] at the model's resolution, no preprocessing needed."""

    __test__ = False  # not a pytest test class, despite the name

    images: torch.Tensor  # (n, 3, IMAGE_SIZE, IMAGE_SIZE) float32
    labels: torch.Tensor  # (n,) class ids, see scenes.class_names()
    captions: list[str]
    mentions_size: torch.Tensor
    mentions_position: torch.Tensor
    attributes: SceneAttributes

    def __len__(self) -> int:
        return self.images.shape[0]

    def caption_matches(self) -> torch.Tensor:
        """(images, captions) bool: caption j truthfully describes image i.

        True when the class matches and so do the size and position, where caption j mentions
        them; a caption that leaves them out describes every scene of its class.
        """
        a = self.attributes
        same_class = self.labels[:, None] == self.labels[None, :]
        same_size = a.size[:, None] == a.size[None, :]
        same_place = (a.column[:, None] == a.column[None, :]) & (a.row[:, None] == a.row[None, :])
        size_ok = ~self.mentions_size[None, :] | same_size
        place_ok = ~self.mentions_position[None, :] | same_place
        return same_class & size_ok & place_ok

    def loader(self, batch_size: int = 256) -> torch.utils.data.DataLoader:
        """(image, label) batches in order, the shape eval's zero-shot functions take."""
        dataset = torch.utils.data.TensorDataset(self.images, self.labels)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def chunk_seed(split: str, chunk: int) -> int:
    if split not in SPLIT_CODES:
        raise ValueError(f"split: expected one of {sorted(SPLIT_CODES)}, got {split!r}")
    state = np.random.SeedSequence([SPLIT_CODES[split], chunk]).generate_state(1, dtype=np.uint64)[0]
    # 63 bits, so the seed also fits a signed int64 (JSON readers, torch's seed() round trip).
    return int(state >> 1)


def render_chunk(split: str, chunk: int) -> TestbedSplit:
    generator = torch.Generator().manual_seed(chunk_seed(split, chunk))
    images, attributes = sample_and_render(CHUNK_SIZE, generator)
    captions: CaptionBatch = write_captions(attributes, generator)
    return TestbedSplit(
        images=images,
        labels=attributes.label,
        captions=captions.texts,
        mentions_size=captions.mentions_size,
        mentions_position=captions.mentions_position,
        attributes=attributes,
    )


def make_split(split: str, n: int, first_chunk: int = 0) -> TestbedSplit:
    """The first n scenes of a split (starting at chunk first_chunk)."""
    if n <= 0:
        raise ValueError(f"n: expected a positive number of scenes, got {n}")
    chunks = [render_chunk(split, first_chunk + i) for i in range(-(-n // CHUNK_SIZE))]
    return _truncate(_concatenate(chunks), n)


def iterate_batches(split: str, batch_size: int, first_chunk: int = 0) -> Iterator[TestbedSplit]:
    """An endless stream of consecutive batches of a split; used for training."""
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
    chunk = first_chunk
    pending: list[TestbedSplit] = []
    pending_count = 0
    while True:
        while pending_count < batch_size:
            pending.append(render_chunk(split, chunk))
            pending_count += CHUNK_SIZE
            chunk += 1
        merged = _concatenate(pending)
        yield _truncate(merged, batch_size)
        rest = _slice(merged, batch_size, len(merged))
        pending, pending_count = ([rest], len(rest)) if len(rest) else ([], 0)


def _concatenate(parts: list[TestbedSplit]) -> TestbedSplit:
    if len(parts) == 1:
        return parts[0]
    return TestbedSplit(
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        captions=[c for p in parts for c in p.captions],
        mentions_size=torch.cat([p.mentions_size for p in parts]),
        mentions_position=torch.cat([p.mentions_position for p in parts]),
        attributes=SceneAttributes(
            **{
                field: torch.cat([getattr(p.attributes, field) for p in parts])
                for field in _ATTRIBUTE_FIELDS
            }
        ),
    )


def _slice(data: TestbedSplit, start: int, stop: int) -> TestbedSplit:
    return TestbedSplit(
        images=data.images[start:stop],
        labels=data.labels[start:stop],
        captions=data.captions[start:stop],
        mentions_size=data.mentions_size[start:stop],
        mentions_position=data.mentions_position[start:stop],
        attributes=SceneAttributes(
            **{
                field: getattr(data.attributes, field)[start:stop]
                for field in _ATTRIBUTE_FIELDS
            }
        ),
    )


def _truncate(data: TestbedSplit, n: int) -> TestbedSplit:
    return data if len(data) == n else _slice(data, 0, n)
