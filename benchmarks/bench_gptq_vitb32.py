"""Time and memory of pyclipq.calibrate(gptq=True) on a full-size open_clip ViT-B/32 on the CPU.

Random weights (nothing can be downloaded here): the point is the cost of GPTQ layer by
layer (every one of ViT-B/32's linears, both towers) and that memory stays bounded by the
Hessian budget, not the accuracy. Forwards run pyclipq's CPU kernels (``--emulate``: the
float emulation of bench_ptq.py instead).

Usage: PYTHONPATH=. nice -n 19 python benchmarks/bench_gptq_vitb32.py --out benchmarks/results/gptq_vitb32.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_ptq import emulate_kernels, machine_info  # noqa: E402

import pyclipq  # noqa: E402
from pyclipq.configs import QuantConfig  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="int4", choices=["int8", "int4", "int2", "ternary"])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-hessian-mib", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--emulate", action="store_true")
    p.add_argument("--out", default="benchmarks/results/gptq_vitb32.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import open_clip

    torch.manual_seed(0)
    fp32 = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        images = torch.randn(args.batch_size, 3, 224, 224, generator=g)
        tokens = torch.randint(1, 49406, (args.batch_size, 77), generator=g)
        tokens[:, 0], tokens[:, 40], tokens[:, 41:] = 49406, 49407, 0  # SOT, EOT (argmax pooling), padding
        batches.append((images, tokens))
    rss_model = peak_rss_mib()
    model = pyclipq.convert(copy.deepcopy(fp32), QuantConfig(args.format, activation="static"))
    if args.emulate:
        emulate_kernels(model)
    rss_before = peak_rss_mib()
    cpu_before = cpu_seconds()
    started = time.perf_counter()
    report = pyclipq.calibrate(model, batches, observer="omse", num_batches=args.batches, gptq=True, float_model=fp32,
                               max_hessian_bytes=args.max_hessian_mib * 2**20, progress=False)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_before
    gptq_layers = [l for l in report.layers if l.proxy_error is not None]
    result = {
        "machine": machine_info(),
        "settings": vars(args),
        "linears": len(report.layers),
        "gptq_layers": len(gptq_layers),
        "passes": report.passes,
        "seconds": seconds,
        "cpu_seconds": cpu,  # this process's CPU time: wall time on a shared machine also counts others' work
        "stage_seconds": report.stage_seconds,
        "peak_rss_mib": {"after_building_models": rss_model, "before_calibrate": rss_before, "after_calibrate": peak_rss_mib()},
        "layer_error_vs_rtn_mean": sum(l.proxy_error / l.proxy_error_rtn for l in gptq_layers) / len(gptq_layers),
        "layers_where_gptq_beats_rtn": sum(l.proxy_error < l.proxy_error_rtn for l in gptq_layers),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
