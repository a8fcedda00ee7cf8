"""Batch embedding of images or texts with a (converted) CLIP, in resumable shards, on one or many ranks.

Input: a folder of images (or of .txt files), a CSV/TSV column, or webdataset tar shards. The
input is cut into *units* in a fixed global order: one unit per ``shard_size`` rows of a folder
or CSV, one unit per tar shard. Unit j becomes output shard j:

    part-0000j.npy (or .safetensors)   float32/float16 [rows, dim] embeddings
    part-0000j.json                    {"keys": [...], "skipped": [...]}: row -> source key

Each file is written to a temporary name and renamed, the JSON last, so a shard whose JSON exists
is complete and a killed run leaves no partial shard; a restart skips complete shards. Unit j is
embedded by rank j % world_size, so the output does not depend on the number of ranks. When every
shard is there, rank 0 writes ``index.csv`` (global row, shard, offset, key) and
``metadata.json`` (model, format, pyclipq version, dim, counts). ``run.json`` pins the settings
that decide the rows: a restart with other ones is refused.
"""
from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from ._version import __version__
from .eval.datasets import read_csv_columns
from .eval.encode import as_clip_like
from .models import pooled_only
from .data import IMAGE_EXTENSIONS, parse_data_spec, read_image, shard_urls
from .distributed import barrier, init_distributed

MODALITIES = ("image", "text")
OUTPUT_FORMATS = ("npy", "safetensors")
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Unit:
    """One output shard: explicit (key, path or text) items, or one tar shard's samples."""

    id: int
    modality: str
    items: list[tuple[str, str]] = field(default_factory=list)
    url: str | None = None


def plan_units(spec: str, modality: str, shard_size: int, *, image_column: str = "image",
               text_column: str = "caption") -> list[Unit]:
    """The input cut into output shards, in the global order every rank agrees on."""
    if modality not in MODALITIES:
        raise ValueError(f"--modality must be one of {list(MODALITIES)}, got {modality!r}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    kind, path = parse_data_spec(spec, "--input")
    if kind == "wds":
        return [Unit(i, modality, url=url) for i, url in enumerate(shard_urls(path, "--input"))]
    if kind == "csv":
        column = image_column if modality == "image" else text_column
        argument = "--image-column" if modality == "image" else "--text-column"
        rows = [row[0] for row in read_csv_columns(path, {argument: column})]
        root = Path(path).parent
        if modality == "image":
            items = [(name, str(Path(name) if Path(name).is_absolute() else root / name)) for name in rows]
        else:
            items = [(str(i), text) for i, text in enumerate(rows)]  # key: the CSV's data row
    else:  # a folder, or an ImageFolder read as a folder: every file below it, sorted by relative path
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"--input: {path} is not a folder")
        suffixes = {f".{ext}" for ext in IMAGE_EXTENSIONS} if modality == "image" else {".txt"}
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        items = [(p.relative_to(root).as_posix(), str(p) if modality == "image" else p.read_text(encoding="utf-8").strip())
                 for p in files]
    if not items:
        raise ValueError(f"--input: {spec} holds no {'images' if modality == 'image' else 'texts'}")
    return [Unit(j, modality, items=items[start:start + shard_size]) for j, start in enumerate(range(0, len(items), shard_size))]


class UnitBatches(torch.utils.data.IterableDataset):
    """Batches of the given units, each unit read whole by one DataLoader worker (units split over workers).

    Yields {"unit", "keys", "inputs" (tensor or None), "skipped", "last"}; the last batch of a unit has last=True.
    """

    def __init__(self, units: list[Unit], transform: Callable | None, tokenizer: Callable | None,
                 batch_size: int, strict: bool = False):
        self.units, self.transform, self.tokenizer = units, transform, tokenizer
        self.modality = units[0].modality if units else "image"
        self.batch_size, self.strict = batch_size, strict

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            yield from self._unit_batches(unit)

    def _samples(self, unit: Unit):
        """(key, decoded input or None) in the unit's order."""
        if unit.url is None:
            for key, source in unit.items:
                if self.modality == "text":
                    yield key, source
                else:
                    yield key, read_image(source, self.transform, key, self.strict)
            return
        import webdataset as wds

        name = Path(unit.url).name
        handler = wds.reraise_exception if self.strict else wds.warn_and_continue
        for sample in wds.tarfile_samples([{"url": unit.url}], handler=handler):
            key = f"{name}/{sample['__key__']}"
            if self.modality == "text":
                text = sample.get("txt")
                yield key, text.decode("utf-8") if isinstance(text, bytes) else text
                continue
            encoded = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
            yield key, read_image(encoded, self.transform, key, self.strict) if encoded is not None else None

    def _unit_batches(self, unit: Unit):
        keys, inputs, skipped = [], [], []
        for key, value in self._samples(unit):
            if value is None:
                skipped.append(key)
                continue
            keys.append(key)
            inputs.append(value)
            if len(keys) == self.batch_size:
                yield self._batch(unit, keys, inputs, skipped, last=False)
                keys, inputs, skipped = [], [], []
        yield self._batch(unit, keys, inputs, skipped, last=True)

    def _batch(self, unit, keys, inputs, skipped, last):
        if not inputs:
            tensor = None
        elif self.modality == "image":
            tensor = torch.stack(inputs)
        else:
            tensor = self.tokenizer(inputs)
        return {"unit": unit.id, "keys": keys, "inputs": tensor, "skipped": skipped, "last": last}


# ---------------------------------------------------------------- output shards


def shard_name(unit: int, output_format: str) -> str:
    return f"part-{unit:05d}.{output_format}"


def index_name(unit: int) -> str:
    return f"part-{unit:05d}.json"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_shard(out: Path, unit: int, embeddings: np.ndarray, keys: list[str], skipped: list[str], output_format: str) -> None:
    """The embeddings, then the JSON that marks the shard complete; each renamed into place."""
    def embeddings_to(tmp: Path) -> None:
        if output_format == "npy":
            with open(tmp, "wb") as handle:
                np.save(handle, embeddings)
        else:
            save_file({"embeddings": embeddings}, str(tmp))

    _atomic_write(out / shard_name(unit, output_format), embeddings_to)
    _atomic_write(out / index_name(unit), lambda tmp: tmp.write_text(json.dumps({"keys": keys, "skipped": skipped})))


def read_shard(out: Path, unit: int, output_format: str) -> tuple[np.ndarray, dict]:
    path = out / shard_name(unit, output_format)
    if output_format == "npy":
        embeddings = np.load(path)
    else:
        embeddings = load_file(str(path))["embeddings"]
    return embeddings, json.loads((out / index_name(unit)).read_text())


def read_embeddings(out) -> tuple[np.ndarray, list[str]]:
    """Every row of a finished run, in global order, with its source key (from metadata.json and the shards)."""
    out = Path(out)
    meta = json.loads((out / "metadata.json").read_text())
    arrays, keys = [], []
    for unit in range(meta["shards"]):
        embeddings, index = read_shard(out, unit, meta["output_format"])
        arrays.append(embeddings)
        keys += index["keys"]
    return np.concatenate(arrays), keys


# ---------------------------------------------------------------- the run


def cpu_threads_per_process(local_world_size: int) -> int:
    """This machine's CPUs (the ones this process may use) shared evenly by the processes on it."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, available // max(1, local_world_size))


@dataclass
class EmbedReport:
    rows: int  # rows this process embedded in this run
    seconds: float
    shards_written: int
    shards_skipped: int  # complete before the run started
    total_rows: int | None = None  # rank 0, when the run completed every shard
    skipped_inputs: int | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def _check_run(out: Path, run: dict) -> None:
    path = out / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != run:
            changed = sorted(k for k in set(run) | set(previous) if run.get(k) != previous.get(k))
            raise ValueError(f"--out: {out} holds embeddings of another run (different {', '.join(changed)}); "
                             "use a new --out folder or delete it")


@torch.inference_mode()
def embed(model, units: list[Unit], out, *, transform: Callable | None = None,
          tokenizer: Callable | None = None, batch_size: int = 64, workers: int = 2, device="cpu",
          normalize: bool = True, dtype: str = "float32", output_format: str = "npy", strict: bool = False,
          describe: dict | None = None, progress: bool = True, on_shard: Callable[[int], None] | None = None,
          init_method: str | None = None) -> EmbedReport:
    """Embed `units` into `out` (see the module doc); every rank of a torchrun job calls it.

    describe: what metadata.json should say of the model (name, pretrained, format, ...).
    units: plan_units(...), which fixes the modality (images or texts) and the rows of every shard.
    on_shard: called with each unit id after its shard is written (progress hooks, tests).
    """
    if not units:
        raise ValueError("units: nothing to embed")
    modality = units[0].modality
    if any(u.modality != modality for u in units):
        raise ValueError("units: mixes image and text units")
    if modality == "image" and transform is None:
        raise ValueError("transform: image embedding needs the model's preprocessing")
    if modality == "text" and tokenizer is None:
        raise ValueError("tokenizer: text embedding needs the model's tokenizer")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"--output-format must be one of {list(OUTPUT_FORMATS)}, got {output_format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    context = init_distributed("cuda" if str(device).startswith("cuda") else "cpu", init_method=init_method)
    device = context.device
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = [u.items[0][0] if u.items else u.url for u in units]
    run = {"units": len(units), "first": keys[0] if keys else None, "last": keys[-1] if keys else None,
           "shard_size": max((len(u.items) for u in units), default=0), "modality": modality, "normalize": normalize,
           "dtype": dtype, "output_format": output_format, "model": describe or {}}
    _check_run(out, run)
    barrier()
    if context.is_main and not (out / "run.json").is_file():
        _atomic_write(out / "run.json", lambda tmp: tmp.write_text(json.dumps(run, indent=2)))

    mine = [u for u in units if u.id % context.world_size == context.rank]
    done = [u for u in mine if (out / index_name(u.id)).is_file()]
    todo = [u for u in mine if not (out / index_name(u.id)).is_file()]
    converted = model
    model = as_clip_like(model)
    if isinstance(model, torch.nn.Module):
        model.to(device).eval()
    family_encode = model.encode_image if modality == "image" else model.encode_text

    def encode(inputs):  # the final block at the pooled rows only, where the adapter knows them
        with pooled_only(converted, **{"images" if modality == "image" else "tokens": inputs}):
            return family_encode(inputs)
    loader = torch.utils.data.DataLoader(UnitBatches(todo, transform, tokenizer, batch_size, strict),
                                         batch_size=None, num_workers=min(workers, len(todo)))
    buffers: dict[int, list] = {}
    rows, started = 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"embed {modality}s", unit="shard", disable=not (progress and context.is_main),
               dynamic_ncols=True)
    for batch in loader if todo else ():
        parts = buffers.setdefault(batch["unit"], [])
        if batch["inputs"] is not None:
            features = encode(batch["inputs"].to(device)).float()
            features = F.normalize(features, dim=-1) if normalize else features
            parts.append((features.cpu().numpy().astype(DTYPES[dtype]), batch["keys"], batch["skipped"]))
            rows += len(batch["keys"])
        else:
            parts.append((None, [], batch["skipped"]))
        if batch["last"]:
            _finish_unit(out, batch["unit"], buffers.pop(batch["unit"]), output_format, dtype)
            bar.update(1)
            bar.set_postfix({f"{modality}s/s": f"{rows / (time.perf_counter() - started):.1f}"})
            if on_shard is not None:
                on_shard(batch["unit"])
    bar.close()
    report = EmbedReport(rows, time.perf_counter() - started, len(todo), len(done))
    barrier()
    if context.is_main:
        _write_index(out, units, run, describe or {}, report)
    barrier()
    return report


def _finish_unit(out: Path, unit: int, parts: list, output_format: str, dtype: str) -> None:
    arrays = [a for a, _, _ in parts if a is not None]
    width = arrays[0].shape[1] if arrays else 0
    embeddings = np.concatenate(arrays) if arrays else np.zeros((0, width), DTYPES[dtype])
    keys = [k for _, ks, _ in parts for k in ks]
    skipped = [k for _, _, ss in parts for k in ss]
    write_shard(out, unit, embeddings, keys, skipped, output_format)


def _write_index(out: Path, units: list[Unit], run: dict, describe: dict, report: EmbedReport) -> None:
    """index.csv and metadata.json over every shard; nothing when a shard is still missing (a rank failed)."""
    if any(not (out / index_name(u.id)).is_file() for u in units):
        return
    rows, skipped, dim = 0, 0, None

    def write_index(tmp: Path) -> None:
        nonlocal rows, skipped, dim
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["row", "shard", "offset", "key"])
            for unit in units:
                embeddings, index = read_shard(out, unit.id, run["output_format"])
                if embeddings.shape[0] != len(index["keys"]):
                    raise ValueError(f"--out: shard {unit.id} has {embeddings.shape[0]} rows but {len(index['keys'])} keys")
                if embeddings.shape[0]:
                    dim = int(embeddings.shape[1])
                for offset, key in enumerate(index["keys"]):
                    writer.writerow([rows, unit.id, offset, key])
                    rows += 1
                skipped += len(index["skipped"])

    _atomic_write(out / "index.csv", write_index)
    metadata = {
        "pyclipq_version": __version__, **describe, "modality": run["modality"], "rows": rows, "dim": dim,
        "dtype": run["dtype"], "normalized": run["normalize"], "output_format": run["output_format"],
        "shards": len(units), "shard_files": "part-NNNNN." + run["output_format"], "skipped_inputs": skipped,
    }
    _atomic_write(out / "metadata.json", lambda tmp: tmp.write_text(json.dumps(metadata, indent=2) + "\n"))
    report.total_rows, report.skipped_inputs = rows, skipped
