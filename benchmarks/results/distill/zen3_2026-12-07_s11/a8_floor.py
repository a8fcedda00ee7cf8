"""The activation side's share of int4 W4A8's error on all-MiniLM-L6-v2: the evaluation cosine of
W8A8 (int8 weights, per-channel, are near-lossless) with and without the 128-block rotation, of
the weights alone at int4 g128 (activations float), and of the fake-quant A8 alone (weights fp32).
Run from the repository root: python benchmarks/results/distill/zen3_2026-12-07_s11/a8_floor.py"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import pyclipq  # noqa: E402
from pyclipq.configs import QuantConfig  # noqa: E402
from bench_distill_real import Evaluation, load_model, minilm_path  # noqa: E402

torch.set_num_threads(1)
loaded = load_model(f"hf:{minilm_path()}")
evaluation = Evaluation(loaded)
for label, preset, kwargs in [("int8 W8A8", "int8", {}), ("int8 W8A8, rotation 128", "int8", {"rotation": 128}),
                              ("int4 g128 weight-only (activations float)", "int4", {"activation": "none"}),
                              ("int4 g128 W4A8", "int4", {}), ("int4 g128 W4A8, rotation 128", "int4", {"rotation": 128})]:
    try:
        config = QuantConfig.preset(preset, **kwargs)
        model = pyclipq.convert(copy.deepcopy(loaded.model), config)
    except (ValueError, TypeError) as error:
        print(f"{label}: {error}")
        continue
    record = evaluation(model)
    print(f"{label}: cos {record['cos']:.4f}  R@1 drop {record['r1_drop']:+.1f}", flush=True)
