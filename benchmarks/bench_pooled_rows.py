"""pyclipq.pooled_only against the whole final block: the same converted model, calls alternating.

    python benchmarks/bench_pooled_rows.py [--model ViT-B-32] [--format int8] [--batches 1 2 8] [--calls 15]
    python benchmarks/bench_pooled_rows.py --family hf     # a transformers CLIPModel of CLIPConfig()'s shapes (ViT-B/32)

For each tower and batch, encode_image / encode_text run --calls times as converted and --calls
times inside `pyclipq.pooled_only`, one call of each in turn (a slow spell of the machine hits
both alike); prints both medians, their ratio, and whether the embeddings are equal bit for bit.
Random weights and inputs (open_clip builds the model from its config; transformers from
CLIPConfig()'s defaults, the ViT-B/32 shapes): speed needs no real data.
"""
from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch

import pyclipq


def build(family: str, name: str):
    """(float model, image size, context length, vocabulary size, encode_image, encode_text)."""
    if family == "open_clip":
        model = open_clip.create_model(name).eval()
        return (model, model.visual.image_size[0], model.context_length, model.vocab_size,
                lambda m, images: m.encode_image(images), lambda m, tokens: m.encode_text(tokens))
    from transformers import CLIPConfig, CLIPModel

    model = CLIPModel(CLIPConfig()).eval()
    # the projected embeddings (transformers 5 returns model outputs holding them as pooler_output)
    return (model, model.config.vision_config.image_size, model.config.text_config.max_position_embeddings,
            model.config.text_config.vocab_size,
            lambda m, images: getattr(out := m.get_image_features(pixel_values=images), "pooler_output", out),
            lambda m, tokens: getattr(out := m.get_text_features(input_ids=tokens), "pooler_output", out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("open_clip", "hf"), default="open_clip")
    parser.add_argument("--model", default="ViT-B-32", help="an open_clip model name (--family open_clip)")
    parser.add_argument("--format", default="int8")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, size, context, vocab, encode_image, encode_text = build(args.family, args.model)
    model = pyclipq.convert(model, args.format).eval()
    g = torch.Generator().manual_seed(0)
    print(f"{args.model if args.family == 'open_clip' else 'transformers CLIPModel(CLIPConfig())'} {args.format}, {args.threads} threads, {pyclipq.build_info()['cpu_isa']} table")
    with torch.inference_mode():
        for b in args.batches:
            images = torch.randn(b, 3, size, size, generator=g)
            tokens = torch.randint(1, vocab - 1, (b, context), generator=g)
            # end of text at the last position, every token used: the largest id (open_clip, OpenAI,
            # transformers' legacy rule) and transformers' eos_token_id
            tokens[:, -1] = vocab - 1 if args.family == "open_clip" else model.text_model.eos_token_id
            for tower, inputs, encode in (("image", {"images": images}, lambda: encode_image(model, images)),
                                          ("text", {"tokens": tokens}, lambda: encode_text(model, tokens))):
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
