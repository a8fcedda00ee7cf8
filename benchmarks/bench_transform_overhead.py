"""Run-time cost of the PTQ input transforms on the ViT-B/32 image tower (open_clip, random weights).

Times encode_image for int8 with dynamic activations, with the online block-Hadamard
rotation (each block size in --rotations), and with online smoothing on every layer (the worst case: no
LayerNorm fold), against fp32, in one process, alternating the models per round.

Usage: PYTHONPATH=. python benchmarks/bench_transform_overhead.py [--batches 1 8] [--rounds 5] [--rotations 32 128]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch

import pyclipq
from pyclipq.configs import QuantConfig
from pyclipq.nn import QuantLinear


def online_smoothing(model):
    """Every quantized linear with smoothing='online' and random factors (same cost as calibrated ones)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear) and not module.layer.is_float:
            layer = dataclasses.replace(module.layer, smoothing="online")
            new = QuantLinear(module.in_features, module.out_features, module.bias is not None, layer=layer)
            new.packed_weight.copy_(module.packed_weight)
            new.weight_scale.copy_(module.weight_scale)
            if module.bias is not None:
                new.bias.copy_(module.bias)
            new.smooth_scale.uniform_(0.5, 2.0)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, new)
    return model


def main(argv=None):
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rotations", type=int, nargs="+", default=[32, 128], help="rotation block sizes to time")
    args = parser.parse_args(argv)
    fp32 = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    models = {"fp32": fp32, "int8": pyclipq.convert(copy.deepcopy(fp32), "int8")}
    for block in args.rotations:
        models[f"int8 + rotation {block}"] = pyclipq.convert(copy.deepcopy(fp32), QuantConfig("int8", rotation=block))
    models["int8 + online smoothing"] = online_smoothing(pyclipq.convert(copy.deepcopy(fp32), "int8"))
    transformed = [n for n in models if n.startswith("int8 +")]
    print(f"ViT-B/32 image tower, {torch.get_num_threads()} threads; median ms over {args.rounds} rounds")
    print("| batch | " + " | ".join(models) + " | " + " | ".join(f"{n[7:]}: cost vs int8" for n in transformed) + " |")
    print("|---" * (len(models) + len(transformed) + 1) + "|")
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        times = {name: [] for name in models}
        with torch.inference_mode():
            for m in models.values():
                m.encode_image(x)
            for _ in range(args.rounds):
                for name, m in models.items():
                    start = time.perf_counter()
                    m.encode_image(x)
                    times[name].append(1e3 * (time.perf_counter() - start))
        med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
        print(f"| {batch} | " + " | ".join(f"{med[n]:.1f}" for n in models) + " | "
              + " | ".join(f"{med[n] / med['int8']:.2f}x" for n in transformed) + " |")


if __name__ == "__main__":
    main()
