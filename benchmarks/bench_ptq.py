"""PTQ calibration table in the style of P4Q's Table 1 (shared/seeds/p4q.txt): methods x bits.

Rows: MinMax / EMA / Percentile / OMSE observers (P4Q's PTQ comparisons; OMSE is its
baseline), round-to-nearest with the format's own scale rule, and GPTQ error-compensating
rounding on top of either, at int8 / int4 / int2 / ternary weights with static per-tensor
int8 activations (W-A = 8-8, 4-8, 2-8, 1.58-8; pyclipq's activations are always int8).

Columns:
- on the test bed (pyclipq.testbed, a small CLIP trained in-repo): zero-shot top-1 / top-5 on
  the test split and fidelity = mean cosine of image and text embeddings to the fp32 model;
- on a text transformer built from a transformers config (random weights): fidelity only.

The method names the observer of both the activations and the weight scales:
  minmax      A: MinMax,      W: MinMax (absmax / qmax; for ternary the scale is absmax)
  ema         A: EMA(0.9),    W: MinMax (EMA over one weight tensor is MinMax)
  percentile  A: Percentile,  W: Percentile (per channel / group)
  omse        A: OMSE,        W: OMSE-clipped scales, round to nearest   (P4Q's baseline)
  omse+gptq   A: OMSE,        W: OMSE-clipped scales, GPTQ rounding
  rtn         A: OMSE,        W: the format's rule (absmax / qmax; ternary absmean), round to nearest
  gptq        A: OMSE,        W: the format's rule, GPTQ rounding
  smooth+rtn              SmoothQuant (alpha searched per layer; folded into pre-LN norms), then as rtn
  rotate+rtn              online block-Hadamard rotation (block 64) of every linear's input, then as rtn
  clip_search             A: OMSE, W: scales with the least output error on the calibration inputs, RTN
  gptq+clip_search        the same scales search inside GPTQ
  rotate+gptq+clip_search rotation + GPTQ + output-aware scales

Kernels: by default every quantized model runs the real fused ops (pyclipq's CPU kernels).
`--emulate` instead runs a float emulation (`emulate_kernels`: fake-quantized activations @
dequantized weights, equal to the integer kernels up to fp32 rounding) for machines where
only the slow scalar fallback is built; `--verify N` then compares it with the real ops on
N images / prompts per format.

Usage (from the repo root):
  PYTHONPATH=. nice -n 19 python benchmarks/bench_ptq.py --out benchmarks/results/ptq
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import types

import torch
import torch.nn.functional as F

import pyclipq
from pyclipq.calibrate import calibrate
from pyclipq.configs import QuantConfig
from pyclipq.nn import QuantLinear

FORMATS = ("int8", "int4", "int2", "ternary")
WEIGHT_BITS = {"int8": "8", "int4": "4", "int2": "2", "ternary": "1.58"}
METHODS = {
    # name: (activation observer, weight observer or None = format rule, gptq)
    "minmax": ("minmax", "minmax", False),
    "ema": ("ema", "minmax", False),
    "percentile": ("percentile", "percentile", False),
    "omse": ("omse", "omse", False),
    "omse+gptq": ("omse", "omse", True),
    "rtn": ("omse", None, False),
    "gptq": ("omse", None, True),
}
# Outlier and output-aware methods (issue 15): extra QuantConfig fields / calibrate arguments.
EXTRA = {
    "smooth+rtn": ("omse", None, False, {"smooth": True}),
    "rotate+rtn": ("omse", None, False, {"rotation": 64}),
    "clip_search": ("omse", None, False, {"clip_search": True}),
    "gptq+clip_search": ("omse", None, True, {"clip_search": True}),
    "rotate+gptq+clip_search": ("omse", None, True, {"rotation": 64, "clip_search": True}),
}
METHODS.update({name: spec[:3] for name, spec in EXTRA.items()})


# ------------------------------------------------------------------ kernel emulation


def _emulated_forward(self: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The fused op's numerics in float: docs/FORMATS.md "Activations" then x_hat @ W_hat^T + b."""
    weight = self.dequantize_weight(torch.float32)
    bias = self.bias.float() if self.bias is not None else None
    xf = self.transform_input(x.float())  # smoothing / rotation, as the layer runs them
    if self.layer.activation == "none":
        return F.linear(xf, weight, bias).to(x.dtype)
    if self.layer.activation == "static":
        scale = self._static_act_scale().float()
        inv = 1.0 / scale
        x_hat = torch.clamp(torch.round(xf * inv), -127, 127) * scale
    else:  # dynamic per-token
        absmax = xf.abs().amax(dim=-1, keepdim=True)
        qmax = torch.full_like(absmax, 127.0)
        inv = torch.where(absmax > 0, qmax / torch.where(absmax > 0, absmax, qmax), torch.zeros_like(absmax))
        x_hat = torch.clamp(torch.round(xf * inv), -127, 127) * (absmax / qmax)
    return F.linear(x_hat, weight, bias).to(x.dtype)


def emulate_kernels(model: torch.nn.Module, on: bool = True) -> None:
    """Route every QuantLinear through `_emulated_forward` (on=True) or back to its own forward."""
    for module in model.modules():
        if isinstance(module, QuantLinear) and not module.layer.is_float:
            if on:
                module.forward = types.MethodType(_emulated_forward, module)
            elif "forward" in module.__dict__:
                del module.forward


# ------------------------------------------------------------------ machine


def machine_info() -> dict:
    from pyclipq.cli.bench import machine_info as base

    return base(torch.get_num_threads()) | {
        "cpus": os.cpu_count(),
        "command": " ".join(["python"] + sys.argv),
    }


# ------------------------------------------------------------------ test bed


class TestbedEval:
    """fp32 reference features once; then each candidate model's accuracy and fidelity."""

    def __init__(self, test_scenes: int, calib_batches: int, calib_batch_size: int, progress: bool, directory=None):
        from pyclipq.eval import encode_images, encode_texts, topk_accuracy
        from pyclipq.testbed import load_testbed, make_split

        self._encode_images, self._encode_texts = encode_images, encode_texts
        self._topk = topk_accuracy
        self.bed = load_testbed(directory)
        self.fp32 = self.bed.model.eval()
        self.progress = progress
        test = make_split("test", test_scenes)
        self.loader = test.loader(batch_size=256)
        self.labels = test.labels
        train = make_split("train", calib_batches * calib_batch_size)  # P4Q §4.1: calibration from training images
        self.calibration = [
            (
                train.images[i : i + calib_batch_size],
                self.bed.tokenizer(train.captions[i : i + calib_batch_size]),
            )
            for i in range(0, calib_batches * calib_batch_size, calib_batch_size)
        ]
        self.prompts = [t.format(c) for c in self.bed.classnames for t in self.bed.templates]
        self.reference = self.features(self.fp32)

    def features(self, model) -> dict:
        images = self._encode_images(model, self.loader, progress=self.progress).features
        texts = self._encode_texts(model, self.bed.tokenizer, self.prompts, progress=self.progress)
        # The zero-shot classifier from the same prompt features (pyclipq.eval.zero_shot_classifier's
        # rule: normalized mean over templates of normalized prompt embeddings), encoded once.
        per_class = texts.view(len(self.bed.classnames), len(self.bed.templates), -1)
        classifier = F.normalize(per_class.mean(dim=1), dim=-1)
        accuracy = self._topk(images @ classifier.T, self.labels, (1, 5))
        return {"images": images, "texts": texts, "top1": accuracy["top1"], "top5": accuracy["top5"]}

    def score(self, model) -> dict:
        f = self.features(model)
        return {
            "top1": 100 * f["top1"],
            "top5": 100 * f["top5"],
            "image_cos": F.cosine_similarity(f["images"].double(), self.reference["images"].double()).mean().item(),
            "text_cos": F.cosine_similarity(f["texts"].double(), self.reference["texts"].double()).mean().item(),
        }


def quantize(fp32, fmt: str, method: str, batches, emulate: bool = False, activation: str = "static"):
    """Convert a copy of fp32 and calibrate it with `method`; returns (model, report, seconds)."""
    act_observer, weight_observer, gptq = METHODS[method]
    extra = dict(EXTRA[method][3]) if method in EXTRA else {}
    rotation = extra.pop("rotation", 0)
    model = pyclipq.convert(copy.deepcopy(fp32), QuantConfig(fmt, activation=activation, rotation=rotation))
    if emulate:
        emulate_kernels(model)
    started = time.perf_counter()
    report = None
    if activation == "static":
        report = calibrate(
            model, batches, observer=act_observer, num_batches=len(batches), weight_observer=weight_observer, gptq=gptq,
            float_model=fp32 if (weight_observer or gptq or extra) else None, progress=False, **extra,
        )
    return model, report, time.perf_counter() - started


def verify_kernels(bed: TestbedEval, fmt: str, model, n: int) -> dict:
    """Largest embedding difference between the emulation and the real fused ops on n images / prompts."""
    images = bed.loader.dataset.tensors[0][:n]
    tokens = bed.bed.tokenizer(bed.prompts[:n])
    with torch.inference_mode():
        emulate_kernels(model, True)
        emulated = (model.encode_image(images), model.encode_text(tokens))
        emulate_kernels(model, False)
        real = (model.encode_image(images), model.encode_text(tokens))
        emulate_kernels(model, True)
    out = {}
    for name, e, r in (("image", emulated[0], real[0]), ("text", emulated[1], real[1])):
        out[f"{name}_max_rel_diff"] = ((e - r).norm(dim=-1) / r.norm(dim=-1)).max().item()
        out[f"{name}_min_cos"] = F.cosine_similarity(e.double(), r.double()).min().item()
    return out


# ------------------------------------------------------------------ text transformer


class TextTransformerEval:
    """A CLIP text tower from a transformers config, random weights: fidelity of text_embeds only."""

    def __init__(self, calib_batches: int, batch: int, seq: int, eval_rows: int):
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        torch.manual_seed(0)
        self.config = CLIPTextConfig(
            vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=seq, projection_dim=256, pad_token_id=0, bos_token_id=4094, eos_token_id=4095,
        )
        self.fp32 = CLIPTextModelWithProjection(self.config).eval()
        g = torch.Generator().manual_seed(1)
        self.calibration = [self.tokens(batch, seq, g) for _ in range(calib_batches)]
        self.eval_tokens = self.tokens(eval_rows, seq, g)
        self.reference = self.embed(self.fp32)

    def tokens(self, rows: int, seq: int, g: torch.Generator) -> torch.Tensor:
        # BOS, random words, EOS last: the embedding is pooled at EOS, which attends to every token.
        t = torch.randint(1, 4094, (rows, seq), generator=g)
        t[:, 0], t[:, -1] = self.config.bos_token_id, self.config.eos_token_id
        return t

    def embed(self, model) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(input_ids=t).text_embeds for t in self.eval_tokens.split(64)]).float()

    def score(self, model) -> dict:
        e = self.embed(model)
        return {"text_cos": F.cosine_similarity(e.double(), self.reference.double()).mean().item()}

    def describe(self) -> str:
        c = self.config
        return (f"CLIPTextModelWithProjection(hidden={c.hidden_size}, mlp={c.intermediate_size}, layers={c.num_hidden_layers}, "
                f"heads={c.num_attention_heads}, seq={c.max_position_embeddings}), random init (seed 0)")


# ------------------------------------------------------------------ main


def format_table(rows: list[dict], reference: dict, text_reference: bool) -> str:
    head = "| method | W-A bits | top-1 | top-5 | image cos | text cos |" + (" HF text cos |" if text_reference else "")
    sep = "|---|---|---:|---:|---:|---:|" + ("---:|" if text_reference else "")
    lines = [head, sep]
    fp = f"| fp32 | 32-32 | {reference['top1']:.2f} | {reference['top5']:.2f} | 1.0000 | 1.0000 |" + (" 1.0000 |" if text_reference else "")
    lines.append(fp)
    for r in rows:
        tb = r.get("testbed")
        hf = r.get("text_transformer")
        cells = (
            f"{tb['top1']:.2f} | {tb['top5']:.2f} | {tb['image_cos']:.4f} | {tb['text_cos']:.4f} |" if tb else " - | - | - | - |"
        )
        if text_reference:
            cells += f" {hf['text_cos']:.4f} |" if hf else " - |"
        lines.append(f"| {r['method']} | {WEIGHT_BITS[r['format']]}-8 | {cells}")
    return "\n".join(lines)


def gptq_margins(rows: list[dict]) -> list[dict]:
    """GPTQ minus round-to-nearest with the same scales, per format (top-1 points, image-cosine)."""
    by = {(r["format"], r["method"]): r for r in rows if r.get("testbed")}
    out = []
    for fmt in FORMATS:
        for base, improved in (("omse", "omse+gptq"), ("rtn", "gptq")):
            if (fmt, base) in by and (fmt, improved) in by:
                a, b = by[(fmt, base)]["testbed"], by[(fmt, improved)]["testbed"]
                out.append({
                    "format": fmt, "rtn": base, "gptq": improved,
                    "top1_gain": b["top1"] - a["top1"],
                    "image_cos_gain": b["image_cos"] - a["image_cos"],
                    "text_cos_gain": b["text_cos"] - a["text_cos"],
                })
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--test-scenes", type=int, default=2048)
    p.add_argument("--calib-batches", type=int, default=10, help="P4Q §4.1: 10 calibration iterations")
    p.add_argument("--calib-batch-size", type=int, default=128, help="P4Q §4.1: batch 128")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest on a busy 2-core machine)")
    p.add_argument("--emulate", action="store_true", help="float emulation of the fused ops instead of the kernels")
    p.add_argument("--verify", type=int, default=8, help="with --emulate: images / prompts per format checked against the real ops")
    p.add_argument("--skip-testbed", action="store_true")
    p.add_argument("--testbed-dir", default=None, help="test-bed weights folder (default: the shipped weights)")
    p.add_argument("--skip-text-transformer", action="store_true")
    p.add_argument("--dynamic", action="store_true", help="also evaluate dynamic per-token int8 activations (no calibration)")
    p.add_argument("--out", default="benchmarks/results/ptq", help="writes <out>.json and <out>.md")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    result = {"machine": machine_info(), "settings": vars(args), "rows": []}
    bed = None if args.skip_testbed else TestbedEval(
        args.test_scenes, args.calib_batches, args.calib_batch_size, args.progress, args.testbed_dir
    )
    text = None if args.skip_text_transformer else TextTransformerEval(args.calib_batches, 16, 32, 256)
    if bed:
        result["testbed_fp32"] = {"top1": 100 * bed.reference["top1"], "top5": 100 * bed.reference["top5"],
                                  "test_scenes": args.test_scenes, "model": bed.bed.config.__dict__ | {"vocabulary": "..."}}
    if text:
        result["text_transformer"] = text.describe()

    cases = [(f, m, "static") for f in args.formats for m in args.methods]
    if args.dynamic:
        cases += [(f, "rtn", "dynamic") for f in args.formats]
    verified = set()
    for fmt, method, activation in cases:
        row = {"format": fmt, "method": method if activation == "static" else "dynamic (no calibration)"}
        if bed:
            model, report, seconds = quantize(bed.fp32, fmt, method, bed.calibration, args.emulate, activation)
            row["testbed"] = bed.score(model) | {"calibrate_s": seconds}
            if report is not None:
                gptq_layers = [l for l in report.layers if l.proxy_error is not None]
                if gptq_layers:
                    row["testbed"]["layer_error_vs_rtn"] = sum(l.proxy_error / l.proxy_error_rtn for l in gptq_layers) / len(gptq_layers)
            if args.emulate and args.verify and fmt not in verified and activation == "static":
                row["testbed"]["verify"] = verify_kernels(bed, fmt, model, args.verify)
                verified.add(fmt)
        if text:
            model, _, seconds = quantize(text.fp32, fmt, method, text.calibration, args.emulate, activation)
            row["text_transformer"] = text.score(model) | {"calibrate_s": seconds}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)

    result["gptq_margins"] = gptq_margins(result["rows"])
    table = format_table(result["rows"], result.get("testbed_fp32", {"top1": float("nan"), "top5": float("nan")}), text is not None)
    result["table"] = table
    print(table)
    for m in result["gptq_margins"]:
        print(f"{m['format']}: {m['gptq']} vs {m['rtn']}: top-1 {m['top1_gain']:+.2f} pts, "
              f"image cos {m['image_cos_gain']:+.4f}, text cos {m['text_cos_gain']:+.4f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(table + "\n")
    return result


if __name__ == "__main__":
    main()
