"""Embedding throughput of `pyclipq embed` (pyclipq.embed): images/s, fp32 vs each pyclipq format.

ViT-B-32 (open_clip, random weights: speed does not depend on the values), N generated JPEGs
(256x256, so the model's own resize + centre crop + normalisation runs), the whole embed path:
DataLoader worker decoding, the image tower, L2-normalisation, shards written to disk. Each
contender runs into a fresh output folder after one warm-up batch through its tower; the
contenders take turns round by round, and the report keeps each one's best round (the least
disturbed by other load on a shared machine) and the median.

Then the image tower alone on one preprocessed batch, pyclipq's contenders against a runtime
peer of `pyclipq bench` (default ONNX Runtime int8, `quantize_dynamic`) timed in its own process.

Usage (from the repo root):
  PYTHONPATH=. python benchmarks/bench_embed.py --images 192 --rounds 2 --out benchmarks/results/zen4/embed_bench.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

import pyclipq
from pyclipq import embed as embedding
from pyclipq.cli.bench import machine_info
from pyclipq.cli.loading import load_model
from pyclipq.cli.peers.runtimes import RuntimePeerError, RuntimePeerWorkspace, TowerInputs

FORMATS = ("int8", "int4", "int2", "ternary")


def write_images(folder: Path, n: int, size: int = 256) -> None:
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # smooth colour fields plus noise: JPEG sizes like photos', not like white noise's
        base = torch.rand(3, 1, 1, generator=g) * 200
        ramp = torch.linspace(0, 55, size).view(1, 1, size)
        pixels = (base + ramp + torch.rand(3, size, size, generator=g) * 20).clamp(0, 255).to(torch.uint8)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.jpg", quality=90)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--out", default=None, help="JSON report path")
    parser.add_argument("--tower-peer", default="ort_int8", help="runtime peer timed on the image tower alone "
                        "(ort_int8, openvino_int8, ...; 'none' to skip)")
    parser.add_argument("--tower-reps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    contenders = {"fp32": loaded.model.eval()}
    contenders.update({fmt: pyclipq.convert(copy.deepcopy(loaded.model), fmt).eval() for fmt in args.formats})
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        write_images(images, args.images)
        units = embedding.plan_units(str(images), "image", shard_size=max(1, args.images // 4))
        warm = torch.stack([loaded.preprocess(Image.open(images / "00000.jpg").convert("RGB"))] * args.batch_size)
        for r in range(args.rounds):
            for name, model in contenders.items():
                with torch.inference_mode():
                    model.encode_image(warm)
                report = embedding.embed(model, units, Path(tmp) / f"{name}-{r}", transform=loaded.preprocess,
                                         batch_size=args.batch_size, workers=args.workers, progress=False,
                                         describe={"model": args.model, "format": name})
                assert report.total_rows == args.images
                seconds[name].append(report.seconds)
                print(f"round {r} {name:8s} {args.images / report.seconds:7.1f} images/s", flush=True)
    best = {name: args.images / min(s) for name, s in seconds.items()}
    median = {name: args.images / statistics.median(s) for name, s in seconds.items()}
    rows = [{"contender": name, "images_per_s_best": round(best[name], 2), "images_per_s_median": round(median[name], 2),
             "vs_fp32": round(best[name] / best["fp32"], 2)} for name in contenders]
    print(f"\n{args.model}, {args.images} JPEGs 256x256, batch {args.batch_size}, {args.threads} threads, "
          f"{args.workers} decode worker(s)")
    print("| contender | images/s (best) | images/s (median) | vs fp32 |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['contender']} | {row['images_per_s_best']:.1f} | {row['images_per_s_median']:.1f} | {row['vs_fp32']:.2f}x |")
    result = {"machine": machine_info(args.threads), "settings": vars(args), "results": rows}
    if args.tower_peer != "none":
        result["tower_only"] = tower_only(contenders, warm, args)
    
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _median_ms(model, x, reps: int) -> float:
    with torch.inference_mode():
        model.encode_image(x)
        samples = []
        for _ in range(reps):
            started = time.perf_counter()
            model.encode_image(x)
            samples.append(1e3 * (time.perf_counter() - started))
    return statistics.median(samples)


def tower_only(contenders: dict, batch: torch.Tensor, args) -> list[dict]:
    """The image tower alone on one preprocessed batch: pyclipq's contenders here, the runtime peer in
    its own process (pyclipq.cli.peers, as `pyclipq bench` times it): what embedding would gain
    from each engine without the JPEG decoding every contender pays alike."""
    ms = {name: _median_ms(model, batch, args.tower_reps) for name, model in contenders.items()}
    key = f"image@{len(batch)}"
    inputs = {"image": TowerInputs(timed={key: batch}, fidelity=batch[:2], calibration=batch[: min(8, len(batch))])}
    try:
        with RuntimePeerWorkspace(contenders["fp32"], inputs, args.threads, args.tower_reps, 1) as workspace:
            ms[args.tower_peer] = workspace.run(args.tower_peer).latency_ms[key]
    except RuntimePeerError as e:
        print(f"tower peer {args.tower_peer} skipped: {e}")
    peer = ms.get(args.tower_peer)
    rows = [{"contender": name, "images_per_s": round(1e3 * len(batch) / t, 2),
             f"vs_{args.tower_peer}": round(peer / t, 2) if peer else None} for name, t in ms.items()]
    print(f"\nimage tower alone, batch {len(batch)}, median of {args.tower_reps}")
    print(f"| contender | images/s | vs {args.tower_peer} |\n|---|---:|---:|")
    for row in rows:
        ratio = row[f"vs_{args.tower_peer}"]
        print(f"| {row['contender']} | {row['images_per_s']:.1f} | {f'{ratio:.2f}x' if ratio else '-'} |")
    return rows


if __name__ == "__main__":
    main()
