"""`pyclipq embed`: a model (fp32, converted now, or a saved pyclipq checkpoint) over a folder, a CSV or
webdataset shards, into resumable embedding shards; under torchrun each rank takes its own shards
(pyclipq.embed does the work)."""
from __future__ import annotations

import argparse
import os

import torch

from .. import embed as embedding
from ..distributed import DistributedContext, init_distributed, shutdown_distributed
from .eval_command import quantized_model
from .loading import load_model


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("model", help="open_clip name, hf:<id|dir>, openai:<file>, testbed")
    sp.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")
    sp.add_argument("--format", default=None, help="convert to this format first (int8, int4, int2, ternary, a preset)")
    sp.add_argument("--quantized", default=None, help="a pyclipq checkpoint (pyclipq convert / train) to embed with")
    sp.add_argument("--input", required=True,
                    help="folder:DIR | csv:FILE | wds:SHARDS (a folder of .tar, a brace pattern or one .tar); "
                         "a bare path is recognised by its suffix")
    sp.add_argument("--modality", choices=embedding.MODALITIES, default="image")
    sp.add_argument("--image-column", default="image", help="CSV column of image paths (relative to the CSV)")
    sp.add_argument("--text-column", default="caption", help="CSV column of texts")
    sp.add_argument("--out", required=True, help="output folder (shards, index.csv, metadata.json)")
    sp.add_argument("--shard-size", type=int, default=10000, help="rows per output shard (folder and CSV inputs)")
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--workers", type=int, default=2, help="DataLoader workers per process (decode + preprocess)")
    sp.add_argument("--threads", type=int, default=None,
                    help="intra-op threads per process; default: this machine's CPUs / processes on it")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's own GPU)")
    sp.add_argument("--dtype", choices=sorted(embedding.DTYPES), default="float32")
    sp.add_argument("--output-format", choices=embedding.OUTPUT_FORMATS, default="npy")
    sp.add_argument("--no-normalize", action="store_true", help="keep raw features (default: L2-normalized)")
    sp.add_argument("--strict-images", action="store_true", help="stop at a bad image instead of skipping it")
    sp.add_argument("--no-progress", action="store_true")


def run_embed(args) -> dict:
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    units = embedding.plan_units(args.input, args.modality, args.shard_size, image_column=args.image_column,
                                 text_column=args.text_column)
    context: DistributedContext = init_distributed(args.device)
    try:
        threads = args.threads or embedding.cpu_threads_per_process(context.local_world_size)
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        loaded = load_model(args.model, args.pretrained)
        candidate = quantized_model(loaded, args.format, args.quantized)
        model = candidate if candidate is not None else loaded.model
        if args.modality == "image" and loaded.preprocess is None:
            raise ValueError(f"model {loaded.label} has no image preprocessing")
        describe = {"model": args.model, "pretrained": args.pretrained,
                    "format": args.format or ("checkpoint" if args.quantized else "fp32"),
                    "quantized_checkpoint": os.path.abspath(args.quantized) if args.quantized else None,
                    "input": args.input}
        report = embedding.embed(model, units, args.out, transform=loaded.preprocess,
                                 tokenizer=loaded.tokenize, batch_size=args.batch_size, workers=args.workers,
                                 device=args.device, normalize=not args.no_normalize, dtype=args.dtype,
                                 output_format=args.output_format, strict=args.strict_images, describe=describe,
                                 progress=not args.no_progress and not args.json)
    finally:
        shutdown_distributed()
    unit = f"{args.modality}s_per_s"
    payload = {"out": args.out, "rank": context.rank, "world_size": context.world_size, "threads": threads,
               "rows_this_process": report.rows, "seconds": round(report.seconds, 3),
               unit: round(report.rows_per_second, 2), "shards_written": report.shards_written,
               "shards_already_complete": report.shards_skipped, "rows": report.total_rows,
               "skipped_inputs": report.skipped_inputs}
    payload["_text"] = (f"{loaded.label} ({describe['format']}): {report.rows} {args.modality}s in {report.seconds:.1f} s "
                        f"= {report.rows_per_second:.1f} {args.modality}s/s on rank {context.rank}/{context.world_size}, "
                        f"{report.shards_written} shards written, {report.shards_skipped} already complete -> {args.out}")
    return payload
