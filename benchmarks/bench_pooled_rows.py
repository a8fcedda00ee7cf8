"""pyclipq.pooled_only against the whole final block: the same converted model, calls alternating.

    python benchmarks/bench_pooled_rows.py [--model ViT-B-32] [--format int8] [--batches 1 2 8] [--calls 15]

For each tower and batch, encode_image / encode_text run --calls times as converted and --calls
times inside `pyclipq.pooled_only`, one call of each in turn (a slow spell of the machine hits
both alike); prints both medians, their ratio, and whether the embeddings are equal bit for bit.
Random weights and inputs (open_clip builds the model from its config): speed needs no real data.
"""
from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch

import pyclipq


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--format", default="int8")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = pyclipq.convert(open_clip.create_model(args.model).eval(), args.format).eval()
    g = torch.Generator().manual_seed(0)
    size, context = model.visual.image_size[0], model.context_length
    print(f"{args.model} {args.format}, {args.threads} threads, {pyclipq.build_info()['cpu_isa']} table")
    with torch.inference_mode():
        for b in args.batches:
            images = torch.randn(b, 3, size, size, generator=g)
            tokens = torch.randint(1, model.vocab_size - 1, (b, context), generator=g)
            tokens[:, -1] = model.vocab_size - 1  # end of text at the last position: every token is used
            for tower, inputs, encode in (("image", {"images": images}, lambda: model.encode_image(images)),
                                          ("text", {"tokens": tokens}, lambda: model.encode_text(tokens))):
                times = {"whole": [], "pooled": []}
                for _ in range(args.calls + 2):
                    for mode in times:
                        t0 = time.perf_counter()
                        if mode == "whole":
                            out = encode()
                        else:
                            with pyclipq.pooled_only(model, **inputs):
                                pooled = encode()
                        times[mode].append(time.perf_counter() - t0)
                whole, fast = (statistics.median(t[2:]) * 1e3 for t in times.values())
                print(f"{tower}@{b}: whole {whole:.1f} ms, pooled {fast:.1f} ms, {whole / fast:.3f}x, "
                      f"equal: {torch.equal(out, pooled)}")


if __name__ == "__main__":
    main()
