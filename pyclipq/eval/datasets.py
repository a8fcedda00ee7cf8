"""Datasets the user already has on disk: an ImageFolder root, a CIFAR-100 root, a retrieval CSV.

Nothing is ever downloaded (these machines have no internet); a missing dataset raises
FileNotFoundError saying what to pass instead.
"""
from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .prompts import cifar100_classnames


@dataclass
class LabelledImages:
    dataset: torch.utils.data.Dataset  # yields (image tensor, class id)
    classnames: list[str]


@dataclass
class RetrievalPairs:
    image_paths: list[Path]  # unique images, in order of first appearance
    captions: list[str]  # one per CSV row
    text_to_image: torch.Tensor  # (len(captions),) index into image_paths


def make_loader(dataset, batch_size: int = 256, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """In-order batches; evaluation needs no shuffling, and features keep the dataset's order."""
    if batch_size <= 0:
        raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def image_folder(root, transform: Callable) -> LabelledImages:
    """torchvision ImageFolder (one sub-folder per class); class names are the folder names, '_' read as ' '."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: {root} is not a folder; pass an ImageFolder root with one sub-folder of images per class")
    try:
        dataset = ImageFolder(str(root), transform=transform)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"root: {root} holds no class sub-folders with images ({error}); "
            "pass an ImageFolder root with one sub-folder of images per class"
        ) from error
    return LabelledImages(dataset, [name.replace("_", " ") for name in dataset.classes])


def cifar100(root, transform: Callable, train: bool = False) -> LabelledImages:
    """torchvision CIFAR-100 (test split by default) with OpenAI's class names for zero-shot prompts."""
    from torchvision.datasets import CIFAR100

    root = Path(root)
    try:
        dataset = CIFAR100(str(root), train=train, transform=transform, download=False)
    except RuntimeError as error:
        raise FileNotFoundError(
            f"root: CIFAR-100 not found under {root}. Pass the folder that contains 'cifar-100-python/' "
            "(torchvision's layout, as left by CIFAR100(root, download=True) on a machine with internet); "
            "nothing is downloaded here"
        ) from error
    return LabelledImages(dataset, cifar100_classnames())


def read_csv_columns(csv_path, columns: dict[str, str]) -> list[tuple[str, ...]]:
    """The named columns of every row of a CSV (a .tsv file is read tab-separated).

    columns: {argument name: column name}, so that a missing column is reported under the
    argument that named it. Returns one tuple per row, in file order, columns in the given order.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        wanted = " and ".join(repr(column) for column in columns.values())
        raise FileNotFoundError(f"csv_path: {csv_path} not found; pass a CSV with {wanted} columns")
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        present = reader.fieldnames or []
        for argument, column in columns.items():
            if column not in present:
                raise ValueError(f"{argument}: column {column!r} not in {csv_path.name}; its columns are {present}")
        rows = [tuple(row[column] for column in columns.values()) for row in reader]
    if not rows:
        raise ValueError(f"csv_path: {csv_path} has a header but no rows")
    return rows


def read_retrieval_csv(csv_path, *, image_column: str = "image", caption_column: str = "caption", root=None) -> RetrievalPairs:
    """Rows of (image path, caption); relative paths are read from root (default: the CSV's folder).

    A .tsv file is read tab-separated, anything else comma-separated.
    """
    csv_path = Path(csv_path)
    rows = read_csv_columns(csv_path, {"image_column": image_column, "caption_column": caption_column})
    root = Path(root) if root is not None else csv_path.parent

    image_index: dict[Path, int] = {}
    captions, owners = [], []
    for line, (image, caption) in enumerate(rows, start=2):
        if not image or caption is None or not caption.strip():
            raise ValueError(f"csv_path: {csv_path.name} line {line} lacks an image path or a caption")
        path = Path(image) if Path(image).is_absolute() else root / image
        owners.append(image_index.setdefault(path, len(image_index)))
        captions.append(caption)
    missing = [str(path) for path in image_index if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"csv_path: {len(missing)} image(s) listed in {csv_path.name} not found, e.g. {missing[0]}; "
            "pass root= the folder the relative paths start from"
        )
    return RetrievalPairs(list(image_index), captions, torch.tensor(owners))


class ImagePaths(torch.utils.data.Dataset):
    """Images read from paths (as RGB) and transformed; yields (image tensor, index)."""

    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), index


def image_path_loader(paths: Sequence[Path], transform: Callable, batch_size: int = 256, num_workers: int = 0):
    return make_loader(ImagePaths(paths, transform), batch_size=batch_size, num_workers=num_workers)
