"""Training data from the user's disk: image-caption pairs and labelled images, sharded over ranks.

- pairs from a CSV/TSV (image path, caption): `CaptionPairs` + a DataLoader whose sampler is a
  DistributedSampler (`train_loader`), so each rank reads its own slice of every epoch;
- pairs from webdataset tar shards (``.jpg``/``.png``/``.webp`` + ``.txt`` per key, as img2dataset
  writes them): `webdataset_pairs`, split by node and by DataLoader worker with webdataset's own
  splitters;
- labelled images from an ImageFolder (one sub-folder per class, for P4Q): `LabelledImages`;
- unlabelled texts (a ``.txt`` file, one text a line, or a CSV column) and unlabelled images (a
  folder, searched recursively, a CSV column, or webdataset shards), for label-free
  distillation: `Texts`, `Images`, `webdataset_images`, and `unlabelled_batches`, which reads
  every ``--data`` source given and zips their batches into one {"images", "tokens"} batch.

Images go through the model's own preprocessing, captions through its tokenizer, both in the
DataLoader workers. A corrupt or missing image is skipped with a warning and counted (each
batch carries ``skipped``, the number left out of it); with ``strict=True`` it raises
`BadImageError` naming the file instead.

Epoch order is a function of the torch seed the trainer sets before each epoch (the
DistributedSampler's epoch, the base seed DataLoader workers get), so an interrupted run
resumes with the same batches.
"""
from __future__ import annotations

import io
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .distributed import world
from .eval.datasets import image_folder, read_csv_columns

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DATA_KINDS = ("csv", "wds", "imagefolder", "folder", "txt")


class BadImageError(ValueError):
    """An image that cannot be read, under strict=True (--strict-images)."""


def read_image(source, transform: Callable, key: str, strict: bool) -> torch.Tensor | None:
    """transform(RGB image) of a path or encoded bytes; None (with a warning) if it cannot be read, unless strict."""
    from PIL import Image, UnidentifiedImageError

    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        with Image.open(handle) as image:
            return transform(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        # OSError covers a missing file and a truncated one; PIL raises SyntaxError on some broken headers
        if strict:
            raise BadImageError(f"image {key}: cannot be read ({type(error).__name__}: {error}); "
                                "drop --strict-images to skip bad images instead") from error
        warnings.warn(f"skipping image {key}: {type(error).__name__}: {error}", stacklevel=2)
        return None


def parse_data_spec(spec: str, argument: str = "--data") -> tuple[str, str]:
    """'csv:PATH' | 'wds:SHARDS' | 'imagefolder:DIR' | 'folder:DIR' | 'txt:FILE', or a bare path whose kind is guessed.

    A bare .csv/.tsv is a CSV, a .txt a text file (one text a line), a .tar (or a brace pattern
    of them) webdataset shards, a folder of .tar files webdataset shards, a folder with
    sub-folders an ImageFolder, any other folder a flat folder of images.
    """
    kind, sep, rest = spec.partition(":")
    if sep and kind in DATA_KINDS:
        if kind != "wds" and not Path(rest).exists():
            raise FileNotFoundError(f"{argument}: {rest} not found")
        return kind, rest
    path = Path(spec)
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        if not path.is_file():
            raise FileNotFoundError(f"{argument}: {spec} not found")
        return ("txt" if path.suffix.lower() == ".txt" else "csv"), spec
    if spec.endswith(".tar") or ("{" in spec and ".tar" in spec):
        return "wds", spec
    if path.is_dir():
        if any(path.glob("*.tar")):
            return "wds", spec
        if any(child.is_dir() for child in path.iterdir()):
            return "imagefolder", spec
        return "folder", spec
    if not path.exists():
        raise FileNotFoundError(f"{argument}: {spec} not found")
    raise ValueError(f"{argument}: cannot tell what {spec} is; write csv:PATH, txt:PATH, wds:SHARDS, imagefolder:DIR "
                     "or folder:DIR")


def shard_urls(spec: str, argument: str = "--data") -> list[str]:
    """Local tar shards: a folder of .tar files, a brace pattern (shards-{0000..0099}.tar) or one file; sorted, checked."""
    import webdataset as wds

    path = Path(spec)
    urls = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else list(wds.shardlists.expand_urls(spec))
    if not urls:
        raise ValueError(f"{argument}: no .tar shards in {spec}")
    missing = [url for url in urls if "://" not in url and not Path(url).is_file()]
    if missing:
        raise FileNotFoundError(f"{argument}: {len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
    return urls


# ---------------------------------------------------------------- batches


class PairCollate:
    """Items (image or None, caption[, skipped before it]) -> {"images", "tokens", "skipped"}."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer = tokenizer

    def __call__(self, items):
        good = [item for item in items if item[0] is not None]
        skipped = sum(1 for item in items if item[0] is None) + sum(int(item[2]) for item in items if len(item) > 2)
        if not good:
            raise BadImageError(f"a whole batch of {len(items)} images could not be read; check the data")
        return {
            "images": torch.stack([item[0] for item in good]),
            "tokens": self.tokenizer([item[1] for item in good]),
            "skipped": torch.tensor(skipped),
        }


class TextCollate:
    """Texts -> {"tokens"}."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]):
        self.tokenizer = tokenizer

    def __call__(self, texts):
        return {"tokens": self.tokenizer(list(texts))}


class ImageCollate:
    """Items (image or None[, skipped before it]) -> {"images", "skipped"}."""

    def __call__(self, items):
        items = [item if isinstance(item, tuple) else (item, 0) for item in items]
        good = [image for image, _ in items if image is not None]
        if not good:
            raise BadImageError(f"a whole batch of {len(items)} images could not be read; check the data")
        skipped = sum(1 for image, _ in items if image is None) + sum(int(n) for _, n in items)
        return {"images": torch.stack(good), "skipped": torch.tensor(skipped)}


class LabelledCollate:
    """Items (image or None, class id) -> (images, labels, skipped) (P4Q's objective reads the first two)."""

    def __call__(self, items):
        good = [item for item in items if item[0] is not None]
        if not good:
            raise BadImageError(f"a whole batch of {len(items)} images could not be read; check the data")
        images = torch.stack([item[0] for item in good])
        labels = torch.tensor([int(item[1]) for item in good])
        return images, labels, torch.tensor(len(items) - len(good))


# ---------------------------------------------------------------- map-style datasets


class CaptionPairs(Dataset):
    """(image path, caption) rows; an item is (preprocessed image or None, caption)."""

    def __init__(self, rows: Sequence[tuple[Path, str]], transform: Callable, strict: bool = False):
        if not rows:
            raise ValueError("data: no image-caption pairs")
        self.rows = list(rows)
        self.transform = transform
        self.strict = strict

    @classmethod
    def from_csv(cls, csv_path, transform: Callable, *, image_column: str = "image", caption_column: str = "caption",
                 root=None, strict: bool = False) -> "CaptionPairs":
        """Relative image paths are read from root (default: the CSV's folder); a missing image is a bad image."""
        csv_path = Path(csv_path)
        root = Path(root) if root is not None else csv_path.parent
        rows = read_csv_columns(csv_path, {"image_column": image_column, "caption_column": caption_column})
        pairs = []
        for line, (image, caption) in enumerate(rows, start=2):
            if not image or caption is None or not caption.strip():
                raise ValueError(f"csv_path: {csv_path.name} line {line} lacks an image path or a caption")
            pairs.append((Path(image) if Path(image).is_absolute() else root / image, caption))
        return cls(pairs, transform, strict)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        path, caption = self.rows[index]
        return read_image(path, self.transform, str(path), self.strict), caption


class LabelledImages(Dataset):
    """An ImageFolder's (path, class id) samples; an item is (preprocessed image or None, class id)."""

    def __init__(self, root, transform: Callable, strict: bool = False):
        folder = image_folder(root, transform)  # torchvision's scan: classes, extensions, errors
        self.samples = list(folder.dataset.samples)
        self.classnames = folder.classnames
        self.transform = transform
        self.strict = strict

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        return read_image(path, self.transform, path, self.strict), label


class Texts(Dataset):
    """Unlabelled texts; an item is one text."""

    def __init__(self, texts: Sequence[str], source: str = "data"):
        texts = [t.strip() for t in texts if t is not None and t.strip()]
        if not texts:
            raise ValueError(f"--data: {source} holds no text")
        self.texts = texts

    @classmethod
    def from_file(cls, path) -> "Texts":
        """A text file, one text a line (blank lines skipped)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--data: {path} not found")
        return cls(path.read_text(encoding="utf-8").splitlines(), str(path))

    @classmethod
    def from_csv(cls, csv_path, column: str = "caption") -> "Texts":
        rows = read_csv_columns(csv_path, {"--text-column": column})
        return cls([row[0] for row in rows], f"column {column!r} of {Path(csv_path).name}")

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]

    def joined(self, fraction: float, seed: int = 0) -> "Texts":
        """The same number of texts, `fraction` of them (chosen by `seed`) followed by another text
        of the set drawn at random: longer, multi-sentence sequences. Measured on all-MiniLM-L6-v2
        (ternary, 1500 steps; benchmarks/README.md, "What limits the cosine"): 0.4 lifts two joined
        held-out sentences from 0.921 to 0.947 cosine, and leaves single sentences, long ones
        included, where they were; hence an opt-in for texts shorter than what will be embedded."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"join_texts (--join-texts): expected a fraction in [0, 1], got {fraction!r}")
        rng = random.Random(seed)
        texts = list(self.texts)
        for i in rng.sample(range(len(texts)), round(fraction * len(texts))):
            texts[i] = f"{self.texts[i]} {self.texts[rng.randrange(len(self.texts))]}"
        return Texts(texts)


class Images(Dataset):
    """Unlabelled image files; an item is the preprocessed image, or None when it cannot be read."""

    def __init__(self, paths: Sequence[Path], transform: Callable, strict: bool = False, source: str = "data"):
        if not paths:
            raise ValueError(f"--data: {source} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = list(paths)
        self.transform = transform
        self.strict = strict

    @classmethod
    def from_folder(cls, root, transform: Callable, strict: bool = False) -> "Images":
        """Every image under `root`, sub-folders included, in sorted order."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data: {root} is not a folder")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file())
        return cls(paths, transform, strict, str(root))

    @classmethod
    def from_csv(cls, csv_path, transform: Callable, column: str = "image", strict: bool = False) -> "Images":
        """Relative paths are read from the CSV's folder; a missing image is a bad image."""
        csv_path = Path(csv_path)
        rows = read_csv_columns(csv_path, {"--image-column": column})
        paths = [Path(row[0]) if Path(row[0]).is_absolute() else csv_path.parent / row[0] for row in rows if row[0]]
        return cls(paths, transform, strict, f"column {column!r} of {csv_path.name}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        return read_image(path, self.transform, str(path), self.strict)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start one epoch part-way (`start_at`), so a resumed run reads
    no image it has already trained on in that epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._start = 0

    def start_at(self, index: int) -> None:
        """The next __iter__ begins at this rank's index-th sample (once; later epochs start at 0)."""
        self._start = index

    def __iter__(self):
        indices = list(super().__iter__())[self._start:]
        self._start = 0
        return iter(indices)


class LengthGroupedSampler(ResumableDistributedSampler):
    """A shuffled epoch whose global batches each hold examples of similar length, so that batches
    padded to their longest text carry little padding (one random batch of 16 of the distillation
    benchmark's training texts is 35% padding tokens).

    The epoch's shuffled order is cut into pools of `pool_batches` global batches; each pool is
    sorted by length and cut into global batches, and the epoch's batches are shuffled. Rank r
    reads the r-th slice of each global batch. Like the DistributedSampler it extends, the order
    depends only on (seed, epoch), and `start_at` resumes part-way through an epoch.
    """

    def __init__(self, lengths: Sequence[int], global_batch: int, *, num_replicas: int, rank: int, seed: int = 0,
                 pool_batches: int = 64):
        if global_batch < 1 or global_batch % num_replicas:
            raise ValueError(f"global_batch must be a positive multiple of num_replicas ({num_replicas}), got {global_batch}")
        if pool_batches < 1:
            raise ValueError(f"pool_batches must be >= 1, got {pool_batches}")
        if len(lengths) < global_batch:
            raise ValueError(f"lengths: {len(lengths)} examples, fewer than one global batch of {global_batch}")
        super().__init__(lengths, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.lengths = [int(n) for n in lengths]
        self.global_batch = global_batch
        self.local_batch = global_batch // num_replicas
        self.pool_batches = pool_batches

    def __len__(self) -> int:
        return len(self.lengths) // self.global_batch * self.local_batch

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches, in training order."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        usable = len(self.lengths) // self.global_batch * self.global_batch
        order = torch.randperm(len(self.lengths), generator=generator).tolist()[:usable]
        pool = self.pool_batches * self.global_batch
        batches = []
        for start in range(0, usable, pool):
            by_length = sorted(order[start:start + pool], key=self.lengths.__getitem__)
            batches += [by_length[i:i + self.global_batch] for i in range(0, len(by_length), self.global_batch)]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        first = self.rank * self.local_batch
        indices = [i for batch in self.global_batches() for i in batch[first:first + self.local_batch]][self._start:]
        self._start = 0
        return iter(indices)


def per_rank_batch(global_batch: int, argument: str = "--batch-size") -> int:
    """A global batch split evenly over the ranks (the contrastive loss sees the global batch)."""
    _, size = world()
    if global_batch < 1 or global_batch % size:
        raise ValueError(f"{argument}: the global batch ({global_batch}) must be a positive multiple of the "
                         f"number of processes ({size})")
    return global_batch // size


def train_loader(dataset: Dataset, global_batch: int, collate: Callable, *, workers: int = 0, seed: int = 0,
                 pin_memory: bool = False, lengths: Sequence[int] | None = None) -> DataLoader:
    """Shuffled batches of this rank's slice of `dataset`; the last partial global batch of an epoch is dropped.
    lengths: one per example: batch examples of similar length together (LengthGroupedSampler)."""
    rank, size = world()
    local = per_rank_batch(global_batch)
    if len(dataset) < global_batch:
        raise ValueError(f"--batch-size: the dataset has {len(dataset)} examples, fewer than one global batch of {global_batch}")
    if lengths is None:
        sampler = ResumableDistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    elif len(lengths) != len(dataset):
        raise ValueError(f"lengths: {len(lengths)} lengths for a dataset of {len(dataset)} examples")
    else:
        sampler = LengthGroupedSampler(lengths, global_batch, num_replicas=size, rank=rank, seed=seed)
    return DataLoader(dataset, batch_size=local, sampler=sampler, collate_fn=collate, num_workers=workers,
                      drop_last=True, pin_memory=pin_memory, persistent_workers=False)


# ---------------------------------------------------------------- webdataset


def epoch_seed() -> int:
    """The torch seed of this epoch, the same in the main process and in every DataLoader worker of a rank."""
    info = torch.utils.data.get_worker_info()
    return info.seed - info.id if info is not None else torch.initial_seed()


def _shuffle_shards(shards):
    # The same permutation on every rank and worker (it precedes split_by_node / split_by_worker),
    # a new one each epoch: the trainer seeds torch per epoch.
    shards = list(shards)
    random.Random(epoch_seed()).shuffle(shards)
    yield from shards


class _ShuffleSamples:
    def __init__(self, buffer: int):
        self.buffer = buffer

    def __call__(self, samples):
        import webdataset as wds

        rank, _ = world()
        info = torch.utils.data.get_worker_info()
        rng = random.Random(epoch_seed() * 7919 + rank * 131 + (info.id if info is not None else 0))
        yield from wds.filters.shuffle(self.buffer, initial=min(self.buffer, 100), rng=rng)(samples)


class _DecodePairs:
    """webdataset samples -> (image, caption, bad samples skipped since the previous good one).

    The last good sample is held back until the stream ends, so bad samples at the very end of
    a worker's stream are counted on it rather than lost (unless it falls in the partial batch
    that is dropped at the end of the stream).
    """

    def __init__(self, transform: Callable, strict: bool, captions: bool = True):
        self.transform = transform
        self.strict = strict
        self.captions = captions  # False: images alone, yielded as (image, skipped)

    def __call__(self, samples):
        skipped, held = 0, None
        needs = f"an image ({'/'.join(IMAGE_EXTENSIONS)})" + (" and a .txt caption" if self.captions else "")
        for sample in samples:
            key = f"{Path(sample.get('__url__', '?')).name}/{sample.get('__key__')}"
            encoded = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            caption = sample.get("txt") if self.captions else ""
            if encoded is None or caption is None:
                if self.strict:
                    raise BadImageError(f"sample {key}: needs {needs}")
                warnings.warn(f"skipping sample {key}: it lacks {needs}", stacklevel=2)
                skipped += 1
                continue
            image = read_image(encoded, self.transform, key, self.strict)
            if image is None:
                skipped += 1
                continue
            if held is not None:
                yield self._item(*held)
            held = (image, caption.decode("utf-8") if isinstance(caption, bytes) else caption, skipped)
            skipped = 0
        if held is not None:
            yield self._item(held[0], held[1], held[2] + skipped)

    def _item(self, image, caption, skipped):
        return (image, caption, skipped) if self.captions else (image, skipped)


def _webdataset_loader(shards, decode: Callable, collate: Callable, global_batch: int, *, workers: int,
                       shuffle_buffer: int, strict: bool) -> DataLoader:
    import webdataset as wds

    urls = shard_urls(shards) if isinstance(shards, str) else list(shards)
    if not urls:
        raise ValueError("--data: no webdataset shards")
    _, size = world()
    local = per_rank_batch(global_batch)
    if len(urls) < size * max(1, workers):
        raise ValueError(f"--data: {len(urls)} shards cannot feed {size} processes x {max(1, workers)} workers; "
                         "write more (smaller) shards or use fewer --workers")
    handler = wds.reraise_exception if strict else wds.warn_and_continue
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        _shuffle_shards,
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=handler),
        _ShuffleSamples(shuffle_buffer),
        decode,
        wds.batched(local, collation_fn=collate, partial=False),
    )
    return DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=False)


def webdataset_pairs(shards: str | Sequence[str], transform: Callable, tokenizer: Callable, global_batch: int, *,
                     workers: int = 0, shuffle_buffer: int = 1000, strict: bool = False) -> DataLoader:
    """Batches of image-caption pairs from tar shards, this rank's and this worker's shards only.

    Shards are reshuffled every epoch, then split by node (rank) and by worker (webdataset's
    splitters); samples are shuffled in a buffer. Every batch is full (a partial one at the end
    of a worker's stream is dropped), so ranks always gather equal batches. One epoch is one
    pass over this rank's shards: give at least (processes x workers) shards, ideally many more.
    Needs webdataset (pip install 'pyclipq[data]').
    """
    return _webdataset_loader(shards, _DecodePairs(transform, strict), PairCollate(tokenizer), global_batch,
                              workers=workers, shuffle_buffer=shuffle_buffer, strict=strict)


def webdataset_images(shards: str | Sequence[str], transform: Callable, global_batch: int, *, workers: int = 0,
                      shuffle_buffer: int = 1000, strict: bool = False) -> DataLoader:
    """Batches {"images", "skipped"} of the images of tar shards (captions, if any, are not read);
    sharded, shuffled and counted as `webdataset_pairs`."""
    return _webdataset_loader(shards, _DecodePairs(transform, strict, captions=False), ImageCollate(), global_batch,
                              workers=workers, shuffle_buffer=shuffle_buffer, strict=strict)


# ---------------------------------------------------------------- unlabelled sources, zipped


class _Samplers:
    """set_epoch on every source's sampler (the distributed trainer reshuffles each epoch through it)."""

    def __init__(self, samplers):
        self.samplers = [s for s in samplers if hasattr(s, "set_epoch")]

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)


class ZippedBatches:
    """Several re-iterable batch sources as one: each batch merges one batch of every source
    ({"images"} from one, {"tokens"} from another; "skipped" counts are summed). An epoch ends
    with the shortest source."""

    def __init__(self, sources: Sequence):
        if not sources:
            raise ValueError("--data: no data source")
        self.sources = list(sources)
        self.sampler = _Samplers(getattr(s, "sampler", None) for s in self.sources)

    def __len__(self) -> int:
        return min(len(s) for s in self.sources)

    def __iter__(self):
        for batches in zip(*self.sources):
            merged: dict = {}
            for batch in batches:
                for key, value in batch.items():
                    if key in merged and key != "skipped":
                        raise ValueError(f"--data: two sources both give {key!r}; give one source of images "
                                         "and one of texts (or one CSV with both columns)")
                    merged[key] = merged[key] + value if key in merged else value
            yield merged


def unlabelled_batches(specs: Sequence[str], *, tokenizer: Callable | None, transform: Callable | None,
                       global_batch: int, text_column: str | None = None, image_column: str | None = None,
                       workers: int = 0, seed: int = 0, strict: bool = False, shuffle_buffer: int = 1000,
                       group_by_length: bool = True, join_texts: float = 0.0):
    """Batches {"tokens"} / {"images", "skipped"} / both, from every source in `specs` (see
    `parse_data_spec`): a .txt file gives texts; a CSV gives the text column, the image column,
    or both as pairs (the columns named; at least one); a folder or ImageFolder gives its images
    (recursively); webdataset shards give their images. A model without a text tower
    (tokenizer None) or an image tower (transform None) cannot take that kind of source.
    group_by_length: batch texts of similar length (in characters) together, so that a tokenizer
    that pads to the batch's longest text pads little (LengthGroupedSampler).
    join_texts: the fraction of each text source's texts followed by a second one (`Texts.joined`)."""
    if not specs:
        raise ValueError("--data: give at least one source (a .txt file, a CSV, a folder of images, wds shards)")

    def texts_of(dataset: Texts):
        if tokenizer is None:
            raise ValueError("--data: the model has no text tower (no tokenizer), but a text source was given")
        dataset = dataset.joined(join_texts, seed) if join_texts else dataset
        lengths = [len(text) for text in dataset.texts] if group_by_length else None
        return train_loader(dataset, global_batch, TextCollate(tokenizer), workers=workers, seed=seed, lengths=lengths)

    def images_of(dataset: Images):
        if transform is None:
            raise ValueError("--data: the model has no image tower (no image preprocessing), but an image source was given")
        return train_loader(dataset, global_batch, ImageCollate(), workers=workers, seed=seed)

    sources = []
    for spec in specs:
        kind, path = parse_data_spec(spec)
        if kind == "txt":
            sources.append(texts_of(Texts.from_file(path)))
        elif kind == "csv":
            if text_column is None and image_column is None:
                raise ValueError(f"--data {spec}: name the CSV's --text-column, --image-column or both")
            if text_column is not None and image_column is not None:
                if tokenizer is None or transform is None:
                    raise ValueError(f"--data {spec}: pairs need a model with both towers")
                pairs = CaptionPairs.from_csv(path, transform, image_column=image_column, caption_column=text_column,
                                              strict=strict)
                sources.append(train_loader(pairs, global_batch, PairCollate(tokenizer), workers=workers, seed=seed))
            elif text_column is not None:
                sources.append(texts_of(Texts.from_csv(path, text_column)))
            else:
                sources.append(images_of(Images.from_csv(path, transform, image_column, strict)))
        elif kind in ("folder", "imagefolder"):
            sources.append(images_of(Images.from_folder(path, transform, strict)))
        else:  # wds
            if transform is None:
                raise ValueError("--data: the model has no image tower, but webdataset shards were given")
            sources.append(webdataset_images(path, transform, global_batch, workers=workers,
                                             shuffle_buffer=shuffle_buffer, strict=strict))
    return sources[0] if len(sources) == 1 else ZippedBatches(sources)
