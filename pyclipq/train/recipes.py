"""One-call recipes: TernaryCLIP QAT + self-distillation (``ternary_clip``) and P4Q (``p4q``), on
any open_clip model and any data, with the test-bed helpers their commands use. The commands
(`pyclipq train ternary|p4q`, the user's data or the test bed) are in pyclipq.cli.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..calibrate import calibrate
from ..configs import LayerConfig, QuantConfig, resolve_config
from ..convert import convert as pyclipq_convert
from ..eval.zero_shot import zero_shot_accuracy, zero_shot_classifier
from ..models.base import attention_projections, repeated_blocks
from ..nn import QuantLinear
from ..testbed import make_split
from ..testbed.scenes import SceneAttributes
from ..testbed.splits import TestbedSplit
from .distill import DistillationLoss, EncoderDistillationLoss
from ..distributed import DistributedContext
from .distributed import DistributedTrainer
from .p4q import ExportedP4Q, FeatureBatches, P4QModel, P4QObjective, QAdapter, p4q_optimizers
from .prompt import PromptLearner
from .qat import (clip_latent_weights_, convert_qat, deepcopy_model, grid_distance, latent_from_packed, prepare_qat,
                  quantized_weights)
from .trainer import CHECKPOINT_FILE, CLIPDistillation, EncoderDistillation, TrainConfig, Trainer, encoder_outputs

TERNARY_PRESETS = {"qall": "ternary-qall", "qffn": "ternary-qffn"}


# ---------------------------------------------------------------- TernaryCLIP


def _trainer(student, data, train: TrainConfig, distributed: DistributedContext | None, **kwargs) -> Trainer:
    if distributed is None:
        return Trainer(student, data, train, **kwargs)
    return DistributedTrainer(student, data, train, context=distributed, **kwargs)


@dataclass
class TernaryResult:
    student: nn.Module  # the fake-quant model (latent float weights)
    quantized: nn.Module  # the packed model: QuantLinear / QuantMultiheadAttention / packed parameters
    history: list[dict]
    trainer: Trainer


def ternary_config(preset: str = "qall", threshold_rule: str = "absmean") -> QuantConfig:
    """TernaryCLIP's Q-ALL (every linear, attention and projections) or Q-FFN (MLPs only)."""
    if preset not in TERNARY_PRESETS:
        raise ValueError(f"preset must be one of {sorted(TERNARY_PRESETS)}, got {preset!r}")
    return QuantConfig.preset(TERNARY_PRESETS[preset], threshold_rule=threshold_rule)


def ternary_clip(
    model: nn.Module,
    data,
    *,
    preset: str = "qall",
    threshold_rule: str = "absmean",
    train: TrainConfig | None = None,
    loss: DistillationLoss | None = None,
    teacher: nn.Module | None = None,
    exact: bool = True,
    resume: bool = False,
    distributed: DistributedContext | None = None,
) -> TernaryResult:
    """Ternary QAT with self-distillation, in one call.

    model: a float CLIP (left untouched; the default teacher is a frozen fp32 copy of it).
    data: re-iterable (images, token ids[, positives]) batches.
    resume: continue from train.output_dir's checkpoint when there is one.
    distributed: this process's rank (pyclipq.train.distributed.init_distributed()); `data`
    then holds this rank's batches and the loss sees the global batch.
    """
    train = train if train is not None else TrainConfig()
    loss = loss if loss is not None else DistillationLoss(contrastive_weight=1.0, kd_weight=1.0, feature_weight=1.0)
    teacher = teacher if teacher is not None else deepcopy_model(model)
    student = prepare_qat(model, ternary_config(preset, threshold_rule), exact=exact)
    trainer = _trainer(student, data, train, distributed, teacher=teacher, objective=CLIPDistillation(loss))
    checkpoint = trainer.checkpoint_path()
    if resume and checkpoint is not None and checkpoint.is_file():
        trainer.load_checkpoint()
    history = trainer.fit()
    # Packing runs on the CPU, which every pyclipq build has kernels for; move the result after.
    quantized = convert_qat(student.cpu()).eval()
    return TernaryResult(student.eval(), quantized, history, trainer)


# ---------------------------------------------------------------- label-free distillation QAT


@dataclass
class DistillResult:
    student: nn.Module  # the fake-quant model (latent float weights)
    quantized: nn.Module  # the packed model, what pyclipq.save stores
    history: list[dict]
    trainer: Trainer
    evaluations: list[dict] = dataclasses.field(default_factory=list)  # evaluate()'s records, with step and seconds
    init_seconds: float = 0.0  # the PTQ start's calibration (GPTQ, scale search)


def fast_fake_quant_default(config: QuantConfig) -> bool:
    """Whether QAT of `config` should use the non-exact fake-quant (F.linear on dequantized operands).

    Exactness at export does not depend on it: the packed codes are the format rule's codes of
    the latent weights either way. The exact path reproduces the kernels' integer math with
    per-group partial sums, which makes a grouped format's step several times slower; for the
    per-channel formats it forms float64 accumulators. Measured on all-MiniLM-L6-v2 (Zen 4, 2
    threads, benchmarks/README.md "Distillation QAT"): a ternary step costs 0.267 s fast against
    0.276 s exact (`--step-times`), and 600 steps reach the same cosine (0.9058 fast, 0.9067 exact). So: the fast
    path for every quantized format.
    """
    return config.layer.spec is not None


INITS = ("auto", "clip", "ptq", "rtn")


def default_init(config: QuantConfig) -> str:
    """Measured on all-MiniLM-L6-v2 (benchmarks/README.md, "Distillation QAT"): ternary learns most
    from round-to-nearest of the float weights; int2 from weight-MSE-clipped latents (after 150 s:
    0.870 cosine, against 0.779 from GPTQ and 0.331 from RTN); int4 from its GPTQ + clip-search PTQ
    (0.973 before training and 0.985 after 300 steps, against 0.943 and 0.976 from the clip start)."""
    spec = config.layer.spec
    if spec is None or spec.threshold_rule:
        return "rtn"
    return "ptq" if spec.bits == 4 else "clip"


def default_learn_scales(config: QuantConfig) -> bool:
    """Measured on all-MiniLM-L6-v2 (benchmarks/README.md, "Distillation QAT"): int2 g64 with
    learned scales (LSQ) reaches 0.898 cosine at 300 steps where the rule's absmax scales reach
    0.881; int4 g128 W4A8 ends a full schedule higher with them (1500 steps: 0.9936 against 0.9929;
    3000 steps: 0.9941, its best), though at 300 steps the two were equal (0.985); for ternary
    the absmean rule does as well at 300 steps (0.841 vs 0.840) and better over a 500-step
    schedule (0.9233 vs 0.9198, batch 64). So: learned for the grouped max-scaled formats (int2,
    int4), the rule for ternary and per-channel int8."""
    spec = config.layer.spec
    return spec is not None and spec.grouped and spec.bits <= 4


def default_rotation(config: QuantConfig) -> int:
    """The input rotation (QuantConfig.rotation) distillation should use. Measured on all-MiniLM-L6-v2
    (benchmarks/README.md, "Distillation QAT"): a 128-block Hadamard rotation lifts int4 g128 W4A8
    from 0.9853 to 0.9898 cosine at 300 steps (its PTQ start from 0.973 to 0.981: the rotation
    spreads the outlier channels that cost the per-token int8 activations most) and to 0.9929 after
    30 minutes (0.990 without); ternary gains 0.002 at 300 steps and R@1 (drop 6.5 -> 3.5 points),
    and its 30-minute run (0.934) had it; int2 g64 loses 0.04 (0.858 against 0.898 at 300 steps).
    So: 128 for int4 and ternary, none otherwise. The packed model then runs the rotation too (one
    fast Walsh-Hadamard pass per linear input)."""
    spec = config.layer.spec
    if spec is None:
        return 0
    return 128 if spec.threshold_rule or (spec.grouped and spec.bits == 4) else 0


# Measured on all-MiniLM-L6-v2 (benchmarks/README.md, "Distillation QAT"): int4's GPTQ + clip-search
# start on 128 training texts (8 batches of 16) gives 0.9816 cosine, on 512 texts 0.9848, on 1024 0.9849.
DEFAULT_CALIBRATION_BATCHES = 32


def ptq_start(model: nn.Module, config: QuantConfig, batches, num_batches: int = DEFAULT_CALIBRATION_BATCHES) -> nn.Module:
    """A copy of `model` holding the latent weights of its best PTQ for `config`: GPTQ rounding and
    clip-searched scales, calibrated on the first `num_batches` of `batches` (unlabelled
    {"images"} / {"tokens"} batches). QAT from it starts where PTQ ends, not at round-to-nearest."""
    packed = pyclipq_convert(deepcopy_model(model), config)
    calibrate(packed, batches, float_model=model, gptq=True, clip_search=True, num_batches=num_batches,
              forward=lambda m, batch: encoder_outputs(m, batch, None), progress=False)
    return latent_from_packed(model, packed)


# Measured on all-MiniLM-L6-v2 (benchmarks/README.md, "Distillation QAT"): weighting the block outputs
# 3x the embedding, and adding the attention maps, lifted ternary at 300 steps (0.8688 -> 0.8750 and
# -> 0.8725; with the rotation, all three 0.8828) and after 30 minutes (0.922 -> 0.934).
DEFAULT_HIDDEN_WEIGHT = 3.0
DEFAULT_ATTENTION_WEIGHT = 1.0


def attention_maps_visible(model: nn.Module) -> bool:
    """Whether distillation can read `model`'s attention maps: every transformer block has one
    attention module with query and key projections of its own (transformers' BERT-like and CLIP
    attention), not nn.MultiheadAttention's packed in-projection (open_clip, OpenAI)."""
    blocks = repeated_blocks(model)
    if not blocks:
        return False
    try:
        attention_projections(model, blocks)
    except ValueError:
        return False
    return True


def default_loss(model: nn.Module) -> EncoderDistillationLoss:
    """The distillation loss `distill` uses when given none: the embedding's cosine, every block's
    output at DEFAULT_HIDDEN_WEIGHT, and every block's attention map at DEFAULT_ATTENTION_WEIGHT
    where `attention_maps_visible(model)` (otherwise without them)."""
    return EncoderDistillationLoss(hidden_weight=DEFAULT_HIDDEN_WEIGHT,
                                   attention_weight=DEFAULT_ATTENTION_WEIGHT if attention_maps_visible(model) else 0.0)


def default_lr(config: QuantConfig) -> float:
    """Measured on all-MiniLM-L6-v2 (benchmarks/README.md, "Distillation QAT"): 1e-3 for the formats
    far from fp32 (ternary, int2); 2e-4 for int4 and int8, which start near fp32 and which 1e-3
    pulls away from it (int4 W4A8: 0.943 -> 0.87 after 150 steps at 1e-3)."""
    spec = config.layer.spec
    return 1e-3 if spec is not None and (spec.threshold_rule or spec.bits <= 2) else 2e-4


def freeze_float_embeddings_(model: nn.Module) -> int:
    """Stop training `model`'s float embedding tables (nn.Embedding, not a quantized one): the
    student then looks its tokens up in the teacher's own table. Returns how many it froze."""
    frozen = [m for m in model.modules() if type(m) is nn.Embedding]
    for table in frozen:
        table.weight.requires_grad_(False)
    return len(frozen)


# Steps a `minutes` budget times before it first sets the step count: batches of many lengths,
# and the first steps' one-off costs (allocator, oneDNN primitive creation) spread over them.
# It is also the shortest stretch between two later re-reckonings of the count.
BUDGET_PROBE_STEPS = 30


def budget_stretch(done: int, steps: int) -> int:
    """How many steps a `minutes` run trains before it re-reckons its step count: a quarter of what
    is left, at least BUDGET_PROBE_STEPS. The pace drifts over a run (measured on all-MiniLM-L6-v2,
    AMD EPYC Zen 3, 1 thread, 30 minutes: a count fixed once from the probe ran 33.7 and 34.1
    minutes), so the count follows the latest pace, and the last stretch, whose drift alone can
    still overrun, is short."""
    return max(BUDGET_PROBE_STEPS, (steps - done) // 4)


def budget_steps(budget_s: float, spent_s: float, pace_s: float, done: int,
                 distributed: DistributedContext | None = None) -> int:
    """The step count a `budget_s` training-time budget fits: the `done` steps that took `spent_s`,
    plus the rest of the budget at `pace_s` seconds a step. Under torchrun every rank takes the
    largest time spent and the slowest pace of all ranks, so that all of them stop at the same step
    (DistributedDataParallel would hang on a rank that stepped once more).

    Measured on all-MiniLM-L6-v2 (AMD EPYC Zen 4, 1 thread, ternary, batch 64): a step time taken
    ahead of the run on 8 batches said 2.26 s, the run itself then took 1.79 s a step and trained
    22.8 of its 30 minutes; its own probe sees the run's batch lengths and machine state."""
    if distributed is not None and distributed.is_distributed:
        slowest = torch.tensor([spent_s, pace_s], dtype=torch.float64)
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
        spent_s, pace_s = (float(v) for v in slowest)
    return max(done, done + int((budget_s - spent_s) / pace_s))


class ParameterAverage:
    """An exponential moving average of `params`, updated after each step of `optimizer` (the
    trainer's last, so after every optimizer of a step has stepped)."""

    def __init__(self, params, optimizer: torch.optim.Optimizer, decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.decay = decay
        self._hook = optimizer.register_step_post_hook(lambda *_: self.update())

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def _swap(self) -> None:
        for p, a in zip(self.params, self.average):
            held = p.detach().clone()
            p.copy_(a)
            a.copy_(held)

    @contextlib.contextmanager
    def swapped(self):
        """The parameters hold the average inside, the trained values again after."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def close(self, keep_average: bool) -> None:
        """Stop averaging; with `keep_average` the parameters take the average for good."""
        self._hook.remove()
        if keep_average:
            for p, a in zip(self.params, self.average):
                p.copy_(a)


class GridDampening:
    """`objective`'s loss plus strength x `qat.grid_distance(student)`: oscillation dampening (Nagel
    et al., 2022), each latent weight pulled toward the level it quantizes to. The strength rises
    from 0 to `weight` along half a cosine of the run's progress (`progress()`, 0 at the start and
    1 at the last step), so the early steps train as without it and the last ones settle the
    latents on their levels, where the plain straight-through estimator leaves them flipping across
    rounding boundaries until the learning rate has decayed."""

    def __init__(self, objective, student: nn.Module, weight: float, progress: Callable[[], float]):
        self.objective = objective
        self.student = student
        self.weight = weight
        self.progress = progress
        self.needs_teacher = getattr(objective, "needs_teacher", True)

    def strength(self) -> float:
        return self.weight * 0.5 * (1.0 - math.cos(math.pi * min(1.0, max(0.0, self.progress()))))

    def __call__(self, student, teacher, batch):
        loss, parts = self.objective(student, teacher, batch)
        strength = self.strength()
        if strength > 0:
            distance = grid_distance(self.student)
            loss = loss + strength * distance
            parts = {**parts, "grid_distance": distance.detach()}
        return loss, parts


PROGRESSIVE_ORDERS = ("together", "bottom-up", "top-down")


class ProgressiveQuantization:
    """`objective`, run with the student's quantization brought in progressively: before each step,
    every trainable fake-quant weight (`qat.quantized_weights`) applies the share `blend` of its
    quantization error (`FakeQuantLinear.set_blend`: w + blend x (q(w) - w), with the
    straight-through gradient), rising from 0 to 1 over the first `fraction` of the run; the rest
    of the run trains the quantized model as without it.

    order: "together": every weight's share rises linearly at once (the lambda warm-up of
    Hugging Face's 1.58-bit fine-tuning); "bottom-up" / "top-down": the weights come in one after
    the other in module order (input side first / output side first), each over its own 1/n of
    the phase, the others float or quantized. `progress()` is the run's progress, 0 at the start and
    1 at the last step. `quantize_all()` puts every weight back at blend 1, for evaluations and the
    export; the next step sets the schedule's shares again."""

    def __init__(self, objective, student: nn.Module, order: str, fraction: float, progress: Callable[[], float]):
        self.check(order, fraction)
        self.objective = objective
        self.weights = quantized_weights(student)
        if not self.weights:
            raise ValueError("student has no quantized weight whose latent trains: nothing to bring in progressively")
        if order == "top-down":
            self.weights.reverse()
        self.order = order
        self.fraction = float(fraction)
        self.progress = progress
        self.needs_teacher = getattr(objective, "needs_teacher", True)

    @staticmethod
    def check(order, fraction) -> None:
        """A ValueError naming `progressive` or `progressive_fraction` (recipes.distill's) where they are invalid."""
        if order not in PROGRESSIVE_ORDERS:
            raise ValueError(f"progressive must be one of {list(PROGRESSIVE_ORDERS)} or None, got {order!r}")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
            raise ValueError(f"progressive_fraction must be a number in (0, 1), got {fraction!r}")

    def blends(self, progress: float) -> list[float]:
        """Each weight's share of its quantization error at the run's `progress` (in self.weights' order)."""
        phase = min(1.0, max(0.0, progress / self.fraction))
        if self.order == "together":
            return [phase] * len(self.weights)
        n = len(self.weights)
        return [min(1.0, max(0.0, phase * n - i)) for i in range(n)]

    def quantize_all(self) -> None:
        for weight in self.weights:
            weight.set_blend(1.0)

    def __call__(self, student, teacher, batch):
        for weight, blend in zip(self.weights, self.blends(self.progress())):
            weight.set_blend(blend)
        return self.objective(student, teacher, batch)


def distill(
    model: nn.Module,
    data,
    config: "str | QuantConfig" = "ternary",
    *,
    init: str = "auto",
    calibration_batches: int = DEFAULT_CALIBRATION_BATCHES,
    train: TrainConfig | None = None,
    loss: EncoderDistillationLoss | None = None,
    teacher: nn.Module | None = None,
    exact: bool | None = None,
    learn_scales: bool | None = None,
    resume: bool = False,
    distributed: DistributedContext | None = None,
    evaluate: Callable[[nn.Module, int], dict] | None = None,
    evaluate_every: int = 0,
    freeze_embeddings: bool = True,
    minutes: float | None = None,
    average: float | None = None,
    dampen: float | None = None,
    progressive: str | None = None,
    progressive_fraction: float = 0.3,
) -> DistillResult:
    """Label-free distillation QAT, in one call: the fake-quant student of `model` learns to give the
    float teacher's embeddings and block outputs on unlabelled images and/or texts.

    model: a float model `pyclipq.convert` takes (a CLIP of any family, or a text encoder in a
    pyclipq.eval.encode.SentenceEncoder); left untouched, the default teacher is a frozen copy.
    data: re-iterable batches {"images"}, {"tokens"} or both (pyclipq.data.unlabelled_batches).
    config: a QuantConfig or preset name, as `pyclipq.convert` takes (`default_rotation` says which
    rotation the measurements favour: QAT trains through it).
    loss: None: `default_loss(model)` (embedding, block outputs x3, attention maps where visible).
    init: where the student starts. "rtn": the float weights (round-to-nearest by the format
    rule); "clip": the float weights clamped to their weight-MSE-optimal scales
    (`qat.clip_latent_weights_`, no data); "ptq": GPTQ + clip-searched scales calibrated on the
    first `calibration_batches` batches of `data` (`ptq_start`); "auto" (default):
    `default_init`.
    exact: the fake-quant path (None: `fast_fake_quant_default`, and the float path with learn_scales).
    learn_scales: the projections learn their weight scales too (LSQ; `prepare_qat`), started at
    the format rule's scales of the starting latent weights (None: `default_learn_scales`).
    resume: continue from train.output_dir's checkpoint when there is one.
    minutes: a training-time budget (evaluations and the PTQ start not counted) that sets the step
    count in place of train.steps: the run times its own first `BUDGET_PROBE_STEPS` steps (or its
    warm-up, if longer), then sets the trainer's config.steps (result.trainer) to what the rest of
    the budget fits, and the warm-up + cosine schedule ends there. It re-reckons the count from
    the latest pace after each `budget_stretch` (a quarter of the steps left, at least
    BUDGET_PROBE_STEPS), as the pace drifts over a run. A step time guessed ahead of the run missed
    by 25% (`budget_steps`). A resumed run keeps the step count its checkpoint holds.
    distributed: this process's rank (pyclipq.distributed.init_distributed()); `data` then
    holds this rank's batches.
    freeze_embeddings: the student keeps the teacher's float token-embedding tables
    (`freeze_float_embeddings_`). Measured on all-MiniLM-L6-v2 (benchmarks/README.md, "Distillation
    QAT"): ternary reaches the same cosine at 600 steps (0.9067 frozen, 0.9055 trained) and a step
    costs 14% less (an ad-hoc timing, Zen 4, 2 threads: AdamW and the dense gradient of the
    30522 x 384 table are gone).
    average: the decay of an exponential moving average of the trained parameters (latent weights,
    learned scales, float parameters), updated after every step; evaluations and the export see
    the average (None: the last step's parameters). A resumed run restarts the average.
    Measured on all-MiniLM-L6-v2 (benchmarks/README.md, "A moving average of the weights"): with
    the cosine schedule the average ends lower than the last step (int4 0.9921 at decay 0.995
    against 0.9943, ternary 0.9227 at 0.99 against 0.9326), as the schedule's low-lr tail already
    settles the weights; hence None by default.
    dampen: the final strength of the oscillation-dampening term (`GridDampening`: the mean squared
    distance of the latent weights from their levels, in units of their scales, added to the loss
    with a weight that rises from 0 to `dampen` over the run); None: no such term. Measured on
    all-MiniLM-L6-v2 (benchmarks/README.md, "Synonym replacement, frozen codes, oscillation
    dampening"): dampened runs lead at equal steps (ternary at step 500: 0.920-0.924 cosine against
    0.906) but do not end higher (ternary 0.924-0.926 against 0.930 in 30 minutes, its step 15%
    dearer; int4 0.9947 against 0.9943-0.9945); hence None by default.
    progressive: bring the quantization in over the first `progressive_fraction` of the steps
    (`ProgressiveQuantization`): "together", "bottom-up" or "top-down"; None: every weight
    quantized from the first step. Evaluations and the export see the fully quantized student.
    Under `minutes`, the phase is reckoned against the provisional step count until the run has
    timed its first steps. Measured on all-MiniLM-L6-v2 (benchmarks/README.md, "Progressive
    quantization"): ternary at batch 64, 664 steps, ends no higher than quantizing from the first
    step (fraction 0.3: together 0.9289, bottom-up 0.9253; fraction 0.1: together 0.9305; against
    0.9303), nor does int4 (0.9941 both); hence None by default.
    evaluate: called with the fake-quant student (in eval mode, under no_grad) and the steps it has
    trained, before training, every `evaluate_every` steps and at the end; its dicts, with "step" and "seconds" of
    training so far (evaluation excluded), are the result's `evaluations`.
    """
    if evaluate_every < 0 or (evaluate is not None and not callable(evaluate)):
        raise ValueError("evaluate must be a callable and evaluate_every an int >= 0")
    if init not in INITS:
        raise ValueError(f"init must be one of {list(INITS)}, got {init!r}")
    if average is not None and not (isinstance(average, float) and 0.0 < average < 1.0):
        raise ValueError(f"average must be a decay in (0, 1) or None, got {average!r}")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not (0 < minutes < math.inf)):
        raise ValueError(f"minutes must be a finite number > 0 or None, got {minutes!r}")
    if dampen is not None and (isinstance(dampen, bool) or not isinstance(dampen, (int, float))
                               or not (0 < dampen < math.inf)):
        raise ValueError(f"dampen must be a finite number > 0 or None, got {dampen!r}")
    if progressive is not None:
        ProgressiveQuantization.check(progressive, progressive_fraction)
    config = resolve_config(config)
    init = default_init(config) if init == "auto" else init
    learn_scales = default_learn_scales(config) if learn_scales is None else bool(learn_scales)
    train = train if train is not None else TrainConfig()
    probe = max(BUDGET_PROBE_STEPS, train.warmup_steps)
    if minutes is not None:  # the schedule's end, decided after the probe; until then, room for the probe
        train = dataclasses.replace(train, steps=max(train.steps, probe))
    if exact is None:
        exact = not (learn_scales or fast_fake_quant_default(config))
    teacher = teacher if teacher is not None else deepcopy_model(model)
    checkpoint = train.output_dir and Path(train.output_dir) / CHECKPOINT_FILE
    resuming = resume and checkpoint and checkpoint.is_file()
    # a resumed run reloads its latent weights from the checkpoint: no calibration to redo
    started = time.perf_counter()
    start = ptq_start(model, config, data, calibration_batches) if init == "ptq" and not resuming else model
    init_seconds = time.perf_counter() - started
    student = prepare_qat(start, config, exact=exact, learn_scales=learn_scales)
    if init == "clip" and not resuming:
        clip_latent_weights_(student)  # learned scales start at the clipped weights' rule scales
    if freeze_embeddings:
        freeze_float_embeddings_(student)
    # Parameters a batch does not reach (the logit scale; the image tower on texts alone) get no
    # gradient: DistributedDataParallel must be told to look for them.
    ddp = {"find_unused_parameters": True} if distributed is not None else {}
    loss = loss if loss is not None else default_loss(model)
    objective = EncoderDistillation(loss)

    def progress() -> float:  # the trainer and its schedule exist by the first step
        return trainer.position.step / schedule.steps

    if dampen is not None:
        objective = GridDampening(objective, student, float(dampen), progress)
    progressive_phase = None
    if progressive is not None:
        objective = progressive_phase = ProgressiveQuantization(objective, student, progressive, progressive_fraction,
                                                                progress)
    trainer = _trainer(student, data, train, distributed, teacher=teacher, objective=objective, **ddp)
    checkpoint = trainer.checkpoint_path()
    schedule = trainer.config  # under torchrun a copy of `train`: the step count the schedule reads
    rebudget = minutes is not None  # the count follows the pace; a resumed run keeps its checkpoint's
    if resume and checkpoint is not None and checkpoint.is_file():
        state = trainer.read_checkpoint()
        trainer.load_state_dict(state)
        if minutes is not None and trainer.position.step >= probe:  # the first run decided the count
            schedule.steps, rebudget = int(state["config"]["steps"]), False
    evaluations, seconds = [], 0.0
    # Under `minutes` the run stops at `reckon_at` to time its pace since `pace_mark` (a step and the
    # training seconds then). The probe's first third carries the one-off costs: timed apart, left out.
    start_step = trainer.position.step
    reckon_at = (probe // 3 if start_step < probe // 3 else probe) if rebudget else None
    pace_mark = (start_step, 0.0)
    averaged = ParameterAverage(trainer.params, trainer.optimizers[-1], average) if average is not None else None

    def evaluated():
        if progressive_phase is not None:
            progressive_phase.quantize_all()
        was_training = student.training
        with torch.no_grad(), (averaged.swapped() if averaged is not None else contextlib.nullcontext()):
            record = dict(evaluate(student.eval(), trainer.position.step))
        student.train(was_training)
        evaluations.append({"step": trainer.position.step, "seconds": round(seconds, 2), **record})

    if evaluate is not None:
        evaluated()
    while trainer.position.step < schedule.steps:
        every = evaluate_every if evaluate is not None and evaluate_every else schedule.steps
        until = min(schedule.steps, (trainer.position.step // every + 1) * every)
        if reckon_at is not None:
            until = min(until, reckon_at)
        started = time.perf_counter()
        trainer.fit(until=until)
        seconds += time.perf_counter() - started
        done = trainer.position.step
        if done == reckon_at:
            if done >= probe:
                pace = (seconds - pace_mark[1]) / (done - pace_mark[0])
                schedule.steps = budget_steps(minutes * 60.0, seconds, pace, done, distributed)
            pace_mark = (done, seconds)
            # the last stretch (at most BUDGET_PROBE_STEPS) runs to the end: no count moves after it
            reckon_at = probe if done < probe else done + budget_stretch(done, schedule.steps)
            if done >= probe and reckon_at >= schedule.steps:
                reckon_at = None
        if evaluate is not None and (trainer.position.step % every == 0 or trainer.position.step == schedule.steps):
            evaluated()
    history = trainer.history
    if progressive_phase is not None:
        progressive_phase.quantize_all()
    if averaged is not None:
        averaged.close(keep_average=True)
    quantized = convert_qat(student.cpu()).eval()  # packing runs on the CPU, which every build has kernels for
    return DistillResult(student.eval(), quantized, history, trainer, evaluations, init_seconds)


# ---------------------------------------------------------------- P4Q


@dataclass
class P4QResult:
    model: P4QModel  # training form (fake-quant adapter, differentiable text twin)
    exported: ExportedP4Q  # packed adapter + class embeddings from the packed text tower
    history: list[dict]
    trainer: Trainer


def p4q(
    ptq_model: nn.Module,
    teacher: nn.Module,
    tokenizer,
    classnames,
    data,
    *,
    templates=("a photo of a {}.",),
    n_ctx: int = 16,
    position: str = "end",
    ctx_init: str | None = None,
    alpha: float = 0.2,
    reduction: int = 4,
    adapter_layer: LayerConfig | str = "int8",
    lam: float = 1.0,
    temperature: float = 1.0,
    prompt_lr: float = 2e-3,
    adapter_lr: float = 1e-3,
    train: TrainConfig | None = None,
    resume: bool = False,
    cache_features: bool = True,
    distributed: DistributedContext | None = None,
) -> P4QResult:
    """P4Q on a frozen PTQ model, in one call.

    ptq_model: a converted (packed) open_clip CLIP; teacher: its fp32 original.
    data: re-iterable (images, class labels) batches. The teacher's class embeddings
    come from `templates` (a zero-shot classifier). Only the prompt (SGD) and the
    adapter (AdamW) train, both on the warm-up + cosine schedule of `train`.
    cache_features: encode the images with both frozen towers once (FeatureBatches);
    turn it off when `data` augments its images, which caching would freeze.
    distributed: as in ternary_clip; each rank caches and trains on its own slice of the data.
    """
    train = train if train is not None else TrainConfig()
    device = torch.device(train.device)
    teacher = teacher.to(device).float().eval()
    ptq_model = ptq_model.to(device).eval()
    teacher_classes = zero_shot_classifier(teacher, tokenizer, classnames, templates, device=device, progress=False)
    prompt = PromptLearner(ptq_model, tokenizer, classnames, n_ctx=n_ctx, position=position, ctx_init=ctx_init)
    width = teacher_classes.shape[1]
    adapter = QAdapter(width, reduction=reduction, alpha=alpha, layer=adapter_layer)
    model = P4QModel(ptq_model, prompt, adapter)
    if cache_features:
        data = FeatureBatches.from_batches(ptq_model, teacher, data, device)
    optimizers = p4q_optimizers(model, prompt_lr=prompt_lr, adapter_lr=adapter_lr)
    trainer = _trainer(model, data, train, distributed, teacher=teacher, objective=P4QObjective(teacher_classes, lam, temperature),
                       optimizers=optimizers)
    checkpoint = trainer.checkpoint_path()
    if resume and checkpoint is not None and checkpoint.is_file():
        trainer.load_checkpoint()
    history = trainer.fit()
    return P4QResult(model.eval(), model.export(), history, trainer)


# ---------------------------------------------------------------- test-bed data


class TestbedPairs:
    """Re-iterable, shuffled (images, token ids, positives) batches over the first n train scenes.

    positives marks every caption that truly describes an image (TestbedSplit.caption_matches):
    test-bed captions often leave out size and position, so one caption fits several scenes.
    """

    __test__ = False  # not a pytest class

    def __init__(self, n: int, batch_size: int, tokenizer, split: str = "train", labels: bool = False):
        if batch_size < 2 or batch_size > n:
            raise ValueError(f"batch_size must be in [2, n={n}], got {batch_size}")
        self.data = make_split(split, n)
        self.tokens = tokenizer(self.data.captions)
        self.batch_size = batch_size
        self.labels = labels

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def with_labels(self) -> "TestbedPairs":
        """The same scenes as (images, class labels) batches (P4Q's data), without rendering again."""
        view = copy.copy(self)
        view.labels = True
        return view

    def __iter__(self):
        order = torch.randperm(len(self.data))  # the trainer seeds each epoch: resumable
        d = self.data
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.labels:
                yield d.images[idx], d.labels[idx]
                continue
            part = TestbedSplit(
                images=d.images[idx], labels=d.labels[idx], captions=[d.captions[i] for i in idx.tolist()],
                mentions_size=d.mentions_size[idx], mentions_position=d.mentions_position[idx],
                attributes=SceneAttributes(**{k: v[idx] for k, v in vars(d.attributes).items()}),
            )
            yield d.images[idx], self.tokens[idx], part.caption_matches()


@torch.no_grad()
def zero_shot_top1(model, tokenizer, classnames, templates, loader, device="cpu") -> float:
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device=device, progress=False)
    return zero_shot_accuracy(model, classifier, loader, device=device, progress=False)["top1"]


@torch.no_grad()
def p4q_top1(exported: ExportedP4Q, loader, device="cpu") -> float:
    return zero_shot_accuracy(exported, exported.class_embeddings, loader, device=device, progress=False)["top1"]

def build_ptq_model(model: nn.Module, config: QuantConfig, calibration: str, calibration_data, float_model: nn.Module) -> nn.Module:
    """PTQ: dynamic per-token activations with absmax weights, or OMSE-calibrated (P4Q's baseline)."""
    if calibration == "none":
        return pyclipq_convert(deepcopy_model(model), config)

    static = pyclipq_convert(deepcopy_model(model), dataclasses.replace(config, activation="static"))
    calibrate(static, calibration_data, observer="omse", weight_observer="omse", float_model=float_model, progress=False)
    return static

def save_p4q_head(exported: ExportedP4Q, path) -> None:
    """The P4Q parts outside the PTQ model (packed adapter, class embeddings) as one safetensors file."""
    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in exported.adapter.state_dict().items() if v is not None}
    tensors["class_embeddings"] = exported.class_embeddings.detach().cpu().contiguous()
    layer = exported.adapter.fc1.layer
    metadata = {"pyclipq_p4q": json.dumps({
        "classnames": exported.classnames, "alpha": exported.adapter.alpha, "dim": exported.adapter.dim,
        "hidden": exported.adapter.hidden, "adapter_layer": layer.to_dict(),
    })}
    save_file(tensors, str(path), metadata=metadata)

def load_p4q_head(ptq_model: nn.Module, path) -> ExportedP4Q:
    """Rebuild an ExportedP4Q from a loaded PTQ model (pyclipq.load) and a save_p4q_head file."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("pyclipq_p4q")
    if raw is None:
        raise ValueError(f"path: {path} is not a P4Q head written by save_p4q_head (no 'pyclipq_p4q' metadata)")
    meta = json.loads(raw)
    tensors = load_file(str(path))
    layer = LayerConfig.from_dict(meta["adapter_layer"])
    adapter = QAdapter.__new__(QAdapter)
    nn.Module.__init__(adapter)
    adapter.dim, adapter.hidden, adapter.alpha = meta["dim"], meta["hidden"], meta["alpha"]
    adapter.fc1 = QuantLinear(meta["dim"], meta["hidden"], bias=False, layer=layer)
    adapter.fc2 = QuantLinear(meta["hidden"], meta["dim"], bias=False, layer=layer)
    adapter.load_state_dict({k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
    return ExportedP4Q(ptq_model, adapter, tensors["class_embeddings"], meta["classnames"])
