"""Label-free distillation QAT (pyclipq.train.recipes.distill, `pyclipq train distill`): the loss,
the block capture, the unlabelled data sources, text encoders, the command, resume and errors."""
import copy
import dataclasses
import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyclipq
from pyclipq import data as train_data
from pyclipq.cli.loading import load_model, sentence_transformers_settings
from pyclipq.eval.encode import SentenceEncoder
from pyclipq.models.base import attention_projections, repeated_blocks
from pyclipq.train import TrainConfig
from pyclipq.train.distill import EncoderDistillationLoss, attention_map_loss, hidden_state_loss
from pyclipq.train.qat import compare_layers
from pyclipq.configs import resolve_config
from pyclipq.train.recipes import (BUDGET_PROBE_STEPS, GridDampening, ParameterAverage, ProgressiveQuantization, budget_steps,
                                    budget_stretch, default_init, default_learn_scales, default_lr, distill, fast_fake_quant_default,
                                    freeze_float_embeddings_)
from pyclipq.train.trainer import Trainer, lr_factor
from pyclipq.train.trainer import EncoderDistillation, encoder_outputs

from train_helpers import tiny_batch, tiny_clip, tiny_tokenizer


def two_block_clip(seed: int = 0):
    return tiny_clip(seed, layers=2).eval()


def tiny_bert(tmp_path, pooling: str | None = None):
    """A 2-layer BERT with a 20-word vocabulary saved as a transformers directory (offline)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "the", "is",
             "big", "small", "green", "star", "on", "left", "right", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path)
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    if pooling is not None:
        (tmp_path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean"}))
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    return tmp_path


SENTENCES = ["a red circle", "the blue square is big", "a small green star on the left", "the star is right .",
             "a big red square", "blue circle", "the green circle is small", "a star on the right"]


def embedding_cosine(student, teacher, tokens=None, images=None) -> float:
    with torch.no_grad():
        if tokens is not None:
            s, t = student.encode_text(tokens), teacher.encode_text(tokens)
        else:
            s, t = student.encode_image(images), teacher.encode_image(images)
    return float(F.cosine_similarity(s, t, dim=-1).mean())


# ---------------------------------------------------------------- the loss and the capture


def test_hidden_state_loss_is_relative_per_block():
    t = [torch.ones(2, 3), 100 * torch.ones(2, 3)]
    s = [torch.ones(2, 3) * 1.1, 100 * torch.ones(2, 3) * 1.1]
    # both blocks are 10% off: the same relative error, whatever their scale
    assert torch.allclose(hidden_state_loss(s, t), torch.tensor(0.01))
    with pytest.raises(ValueError, match="same, non-zero number of hidden states"):
        hidden_state_loss(s[:1], t)
    with pytest.raises(ValueError, match="must have the same shape"):
        hidden_state_loss([torch.ones(2, 4), s[1]], t)


def test_hidden_state_loss_leaves_out_masked_tokens():
    torch.manual_seed(0)
    t = [torch.randn(2, 5, 4)]
    s = [t[0] * 1.1]
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    junk = [s[0].clone()]
    junk[0][~mask] = 1e3  # the padding positions' states: ignored under the mask
    assert torch.allclose(hidden_state_loss(junk, t, mask), torch.tensor(0.01), rtol=1e-5)
    assert hidden_state_loss(junk, t) > 1.0
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of the hidden states' \[batch, tokens\]"):
        hidden_state_loss(s, t, mask[:, :4])
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        hidden_state_loss(s, t, mask.long())


def test_encoder_loss_options_are_checked():
    with pytest.raises(ValueError, match="at least one of embedding_weight, hidden_weight"):
        EncoderDistillationLoss(0, 0)
    with pytest.raises(ValueError, match="embedding_kind must be one of"):
        EncoderDistillationLoss(embedding_kind="l1")
    with pytest.raises(ValueError, match="hidden_weight must be a number >= 0"):
        EncoderDistillationLoss(hidden_weight=-1)


def test_blocks_are_found_in_every_family(tmp_path):
    clip = two_block_clip()
    assert repeated_blocks(clip) == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1",
                                     "transformer.resblocks.0", "transformer.resblocks.1"]
    bert = load_model(f"hf:{tiny_bert(tmp_path)}").model
    assert repeated_blocks(bert) == ["model.encoder.layer.0", "model.encoder.layer.1"]


def test_encoder_outputs_capture_each_tower_blocks_in_order():
    clip = two_block_clip()
    images, tokens = tiny_batch(4)
    outputs = encoder_outputs(clip, {"images": images, "tokens": tokens}, repeated_blocks(clip))
    assert len(outputs["image"]["hidden"]) == 2 and len(outputs["text"]["hidden"]) == 2
    assert torch.equal(outputs["text"]["embedding"], clip.encode_text(tokens))
    # the last text block's output is what ln_final normalizes: [B, T, width]
    assert outputs["text"]["hidden"][1].shape[-1] == 32
    objective = EncoderDistillation()
    loss, parts = objective(clip, clip, {"tokens": tokens})
    assert float(loss.detach()) < 1e-6 and set(parts) == {"text_embedding", "text_hidden"}
    with pytest.raises(ValueError, match="batch must be a dict with 'images' and/or 'tokens'"):
        objective(clip, clip, (images, tokens))



def test_attention_map_loss_compares_the_distributions_over_real_keys():
    torch.manual_seed(0)
    t = torch.randn(2, 3, 5, 5)
    assert float(attention_map_loss([t], [t])) == 0.0
    # a row's scores shifted by a constant give the same distribution
    assert float(attention_map_loss([t + 3.0], [t])) < 1e-6
    s = torch.randn(2, 3, 5, 5)
    p_t, p_s = t.softmax(-1), s.softmax(-1)
    want = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert torch.allclose(attention_map_loss([s], [t]), want, rtol=1e-5)
    # padding keys and padding query rows: whatever their scores, they change nothing
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    junk = t.clone()
    junk[0, :, :, 3:] += 50.0
    junk[0, :, 3:, :] = torch.randn(3, 2, 5)
    assert float(attention_map_loss([junk], [t], mask)) < 1e-6
    assert float(attention_map_loss([junk], [t])) > 1.0
    with pytest.raises(ValueError, match="same, non-zero number of attention maps"):
        attention_map_loss([], [])
    with pytest.raises(ValueError, match=r"one shape \[batch, heads, tokens, tokens\]"):
        attention_map_loss([s[..., :4]], [t])
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of the scores' \[batch, tokens\]"):
        attention_map_loss([s], [t], mask[:, :4])
    with pytest.raises(ValueError, match="attention_weight must be a number >= 0"):
        EncoderDistillationLoss(attention_weight=-1)


def test_attention_scores_are_the_ones_the_encoder_uses(tmp_path):
    """The captured Q K^T * scale, softmaxed under the padding mask, equal BERT's own attention
    probabilities (transformers' eager attention, output_attentions=True)."""
    from transformers import BertModel

    path = tiny_bert(tmp_path)
    loaded = load_model(f"hf:{path}")
    encoder = loaded.model
    blocks = repeated_blocks(encoder)
    sources = attention_projections(encoder, blocks)
    assert [(p.query, p.key, p.heads, p.head_dim) for p in sources] == [
        (f"model.encoder.layer.{i}.attention.self.query", f"model.encoder.layer.{i}.attention.self.key", 2, 16)
        for i in range(2)]
    tokens = loaded.tokenize(SENTENCES[:4])
    with torch.no_grad():
        outputs = encoder_outputs(encoder, {"tokens": tokens}, blocks, sources)["text"]
    mask = outputs["mask"]
    bert = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        want = bert(input_ids=tokens, attention_mask=mask.long(), output_attentions=True).attentions
    assert len(outputs["attention"]) == 2
    for got, probs in zip(outputs["attention"], want):
        got = got.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        rows = mask[:, None, :, None].expand_as(got)  # BERT's padding query rows are not compared
        assert torch.allclose(got[rows], probs[rows], atol=1e-6)
    # an nn.MultiheadAttention keeps q and k in one packed projection: refused with the reason
    clip = two_block_clip()
    with pytest.raises(ValueError, match="nn.MultiheadAttention .* packs them into one in-projection"):
        attention_projections(clip, repeated_blocks(clip))


def test_distillation_of_attention_maps_lowers_their_loss(tmp_path):
    loaded = load_model(f"hf:{tiny_bert(tmp_path)}")
    encoder = loaded.model
    with torch.no_grad():  # sharper maps than a random BERT's near-uniform ones, so that ternary moves them
        for name, p in encoder.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(20.0)
    batches = [{"tokens": loaded.tokenize(SENTENCES)}] * 4
    loss = EncoderDistillationLoss(embedding_weight=0.0, hidden_weight=0.0, attention_weight=1.0)
    student = pyclipq.prepare_qat(copy.deepcopy(encoder), "ternary")
    objective = EncoderDistillation(loss)
    before, parts = objective(student, encoder, batches[0])
    before = float(before.detach())
    assert set(parts) == {"text_attention"} and before > 1e-3
    result = distill(encoder, batches, "ternary", loss=loss, init="rtn",
                     train=TrainConfig(steps=12, lr=1e-2, warmup_steps=0, weight_decay=0.0, progress=False))
    after = float(objective(result.student, encoder, batches[0])[0].detach())
    assert after < 0.5 * before, (before, after)


# ---------------------------------------------------------------- the recipe


def test_distillation_lowers_the_loss_raises_the_cosine_and_exports_what_it_trained(tmp_path):
    teacher = two_block_clip()
    images, tokens = tiny_batch(64, seed=1)
    data = [{"images": images[i:i + 16], "tokens": tokens[i:i + 16]} for i in range(0, 64, 16)]
    held_images, held_tokens = tiny_batch(32, seed=99)  # not trained on
    before = pyclipq.prepare_qat(teacher, "ternary")
    cos_before = embedding_cosine(before, teacher, tokens=held_tokens)
    result = distill(teacher, data, "ternary", train=TrainConfig(steps=60, lr=3e-3, warmup_steps=5, progress=False,
                                                                 output_dir=str(tmp_path)))
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert embedding_cosine(result.student, teacher, tokens=held_tokens) > cos_before + 0.05
    assert embedding_cosine(result.student, teacher, images=held_images) > embedding_cosine(before, teacher, images=held_images)
    # the packed model computes what the fake-quant student computed, layer by layer
    matches = compare_layers(result.student, result.quantized, lambda m: (m.encode_image(held_images), m.encode_text(held_tokens)))
    assert matches and all(m.ok for m in matches), [m for m in matches if not m.ok]
    pyclipq.save(result.quantized, tmp_path / "m.safetensors")
    reloaded = pyclipq.load(tmp_path / "m.safetensors", two_block_clip(seed=5))
    with torch.no_grad():
        assert torch.equal(reloaded.encode_text(held_tokens), result.quantized.encode_text(held_tokens))


TRAIN_STEP = Trainer.train_step


class StepClock:
    """A perf_counter that only training steps advance, by `pace` seconds each: a time budget's
    step count then follows from the numbers alone."""

    def __init__(self, monkeypatch, pace: float, stop_at: int | None = None, slow_from: int | None = None):
        """From step `slow_from` on (when given), a step takes twice `pace`."""
        self.now, self.pace, self.stop_at, self.steps = 0.0, pace, stop_at, 0

        def train_step(trainer, batch):
            if self.stop_at is not None and trainer.position.step >= self.stop_at:
                raise Interrupted(f"step {trainer.position.step}")
            slow = slow_from is not None and trainer.position.step >= slow_from
            self.now += 2 * self.pace if slow else self.pace
            self.steps += 1
            return TRAIN_STEP(trainer, batch)

        monkeypatch.setattr(Trainer, "train_step", train_step)
        monkeypatch.setattr(time, "perf_counter", lambda: self.now)


def test_a_minutes_budget_sets_the_step_count_from_the_runs_own_pace(tmp_path, monkeypatch):
    """`minutes`: the probe's pace fixes the count (1 minute at 0.5 s a step: 120 steps), the cosine
    ends there, evaluations see the right steps, and a resumed run keeps the count its checkpoint
    decided even when its own pace differs."""
    teacher = two_block_clip()
    _, tokens = tiny_batch(32, seed=1)
    data = [{"tokens": tokens[i:i + 8]} for i in range(0, 32, 8)]
    train = TrainConfig(steps=10, lr=3e-3, warmup_steps=5, progress=False, checkpoint_every=10, output_dir=str(tmp_path))
    StepClock(monkeypatch, pace=0.5, stop_at=70)
    seen = []
    with pytest.raises(Interrupted):
        distill(teacher, data, "ternary", train=train, minutes=1.0, evaluate=lambda m, step: seen.append(step) or {},
                evaluate_every=25)
    assert train.steps == 10  # the caller's config is left alone
    assert seen == [0, 25, 50]
    clock = StepClock(monkeypatch, pace=2.0)  # a different pace: a new probe would pick another count
    seen.clear()
    result = distill(teacher, data, "ternary", train=train, minutes=1.0, resume=True,
                     evaluate=lambda m, step: seen.append(step) or {}, evaluate_every=25)
    assert result.trainer.config.steps == 120 and result.trainer.position.step == 120
    assert clock.steps == 50 and seen == [70, 75, 100, 120]
    assert result.history[-1]["lr"] == pytest.approx(3e-3 * lr_factor(119, 120, 5))
    assert BUDGET_PROBE_STEPS <= 70
    # the count itself: what was spent plus the rest of the budget at the pace, never fewer than done
    assert budget_steps(60.0, 15.0, 0.5, 30) == 120
    assert budget_steps(60.0, 70.0, 0.5, 30) == 30
    for bad in (0, -1.0, float("inf"), float("nan"), True, "30"):
        with pytest.raises(ValueError, match="minutes must be a finite number > 0"):
            distill(teacher, data, "ternary", train=train, minutes=bad)


def test_a_minutes_budget_follows_the_pace_when_it_drifts(tmp_path, monkeypatch):
    """The count is re-reckoned after each stretch (budget_stretch): at 0.5 s a step the probe sets
    120 steps for 1 minute; the steps from 40 on take 1 s. At step 60 the last 30 steps took 0.83 s
    each and 40 s are spent: 60 + 24 steps. The run stops there, 64 s in, where the probe's count
    alone would have trained 120 steps in 100 s; the cosine ends at the final count. An evaluation
    inside a stretch does not cut it short. A run resumed inside the probe times the probe's rest."""
    teacher = two_block_clip()
    _, tokens = tiny_batch(32, seed=1)
    data = [{"tokens": tokens[i:i + 8]} for i in range(0, 32, 8)]
    train = TrainConfig(steps=10, lr=3e-3, warmup_steps=5, progress=False)
    clock = StepClock(monkeypatch, pace=0.5, slow_from=40)
    seen = []
    result = distill(teacher, data, "ternary", train=train, minutes=1.0,
                     evaluate=lambda m, step: seen.append(step) or {}, evaluate_every=50)
    assert result.trainer.config.steps == 84 and result.trainer.position.step == 84 and clock.steps == 84
    assert clock.now == pytest.approx(64.0) and seen == [0, 50, 84]
    assert result.history[-1]["lr"] == pytest.approx(3e-3 * lr_factor(83, 84, 5))
    # stopped at step 20 and resumed: steps 21-30 at 0.5 s, 5 s of this process's budget spent
    resumable = dataclasses.replace(train, checkpoint_every=10, output_dir=str(tmp_path))
    StepClock(monkeypatch, pace=0.5, stop_at=20)
    with pytest.raises(Interrupted):
        distill(teacher, data, "ternary", train=resumable, minutes=1.0)
    clock = StepClock(monkeypatch, pace=0.5)
    result = distill(teacher, data, "ternary", train=resumable, minutes=1.0, resume=True)
    assert result.trainer.config.steps == 140 and result.trainer.position.step == 140 and clock.steps == 120
    # the stretches: a quarter of the steps left, never fewer than the probe's
    assert budget_stretch(30, 120) == BUDGET_PROBE_STEPS and budget_stretch(100, 1000) == 225


def test_the_parameter_average_follows_each_step_and_swaps_in_and_out():
    """average_k = decay * average_(k-1) + (1 - decay) * p_k after every optimizer step, by hand."""
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    frozen = nn.Parameter(torch.tensor([5.0]), requires_grad=False)
    optimizer = torch.optim.SGD([p], lr=0.5)
    averaged = ParameterAverage([p, frozen], optimizer, 0.75)
    want = p.detach().clone()
    for grad in ([1.0, 1.0], [-2.0, 0.0], [0.5, 4.0]):
        p.grad = torch.tensor(grad)
        optimizer.step()
        want = 0.75 * want + 0.25 * p.detach()
    assert torch.allclose(averaged.average[0], want) and len(averaged.average) == 1
    trained = p.detach().clone()
    with averaged.swapped():
        assert torch.allclose(p.detach(), want)
    assert torch.equal(p.detach(), trained)
    averaged.close(keep_average=True)
    p.grad = torch.tensor([1.0, 1.0])
    optimizer.step()  # no longer averaged
    assert torch.allclose(averaged.average[0], want) and torch.allclose(p.detach(), want - 0.5)


def test_distillation_exports_and_evaluates_the_average(tmp_path):
    teacher = two_block_clip()
    _, tokens = tiny_batch(32, seed=1)
    data = [{"tokens": tokens[i:i + 8]} for i in range(0, 32, 8)]
    train = TrainConfig(steps=6, lr=3e-3, progress=False)

    def weights(model):
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    seen = []
    averaged = distill(teacher, data, "ternary", train=train, average=0.5, evaluate=lambda m, step: seen.append(weights(m)) or {},
                       evaluate_every=3)
    plain = distill(teacher, data, "ternary", train=train)
    assert len(seen) == 3 and torch.equal(seen[-1], weights(averaged.student))
    assert not torch.equal(weights(averaged.student), weights(plain.student))
    with pytest.raises(ValueError, match="average must be a decay in"):
        distill(teacher, data, "ternary", train=train, average=1.0)


def test_the_dampening_term_rises_along_half_a_cosine_and_adds_the_grid_distance():
    from pyclipq.train.qat import grid_distance

    teacher = two_block_clip()
    student = pyclipq.prepare_qat(teacher, "ternary", exact=False)
    _, tokens = tiny_batch(8, seed=1)
    progress = [0.0]
    objective = EncoderDistillation(EncoderDistillationLoss())
    dampened = GridDampening(objective, student, 2.0, lambda: progress[0])
    assert dampened.strength() == 0.0
    plain_loss, plain_parts = objective(student, teacher, {"tokens": tokens})
    loss, parts = dampened(student, teacher, {"tokens": tokens})
    assert torch.equal(loss, plain_loss) and "grid_distance" not in parts
    for at, want in ((0.5, 1.0), (1.0, 2.0), (1.5, 2.0)):
        progress[0] = at
        assert dampened.strength() == pytest.approx(want)
    loss, parts = dampened(student, teacher, {"tokens": tokens})
    distance = grid_distance(student)
    torch.testing.assert_close(parts["grid_distance"], distance.detach())
    torch.testing.assert_close(loss, plain_loss + 2.0 * distance)


def test_distillation_with_dampening_pulls_the_latent_weights_onto_their_levels(tmp_path):
    from pyclipq.train.qat import grid_distance

    teacher = two_block_clip()
    _, tokens = tiny_batch(32, seed=1)
    data = [{"tokens": tokens[i:i + 8]} for i in range(0, 32, 8)]
    train = TrainConfig(steps=24, lr=3e-3, warmup_steps=2, progress=False)
    plain = distill(teacher, data, "int4", train=train)
    dampened = distill(teacher, data, "int4", train=train, dampen=50.0)
    assert "grid_distance" in dampened.history[-1] and "grid_distance" not in plain.history[-1]
    assert float(grid_distance(dampened.student).detach()) < 0.5 * float(grid_distance(plain.student).detach())
    with pytest.raises(ValueError, match="dampen must be a finite number > 0"):
        distill(teacher, data, "int4", train=train, dampen=0.0)
    with pytest.raises(ValueError, match="dampen must be a finite number > 0"):
        distill(teacher, data, "int4", train=train, dampen=True)


def test_progressive_quantization_brings_the_weights_in_on_its_schedule():
    from pyclipq.train.qat import quantized_weights

    teacher = two_block_clip()
    student = pyclipq.prepare_qat(teacher, "ternary", exact=False)
    _, tokens = tiny_batch(8, seed=1)
    objective = EncoderDistillation(EncoderDistillationLoss())
    in_order = quantized_weights(student)
    n = len(in_order)
    assert n >= 8 and n % 2 == 0
    progress = [0.0]
    for order in ("together", "bottom-up", "top-down"):
        phase = ProgressiveQuantization(objective, student, order, 0.5, lambda: progress[0])
        assert phase.weights == (in_order[::-1] if order == "top-down" else in_order)
        assert phase.blends(0.0) == [0.0] * n
        assert phase.blends(0.5) == phase.blends(0.9) == [1.0] * n  # quantized after the phase
        if order == "together":
            assert phase.blends(0.25) == [0.5] * n
        else:  # half the phase: the first half of the weights (in the order's direction) in, the rest float
            assert phase.blends(0.25) == [1.0] * (n // 2) + [0.0] * (n // 2)
            assert phase.blends(0.5 / n / 2) == [0.5] + [0.0] * (n - 1)
    phase = ProgressiveQuantization(objective, student, "together", 0.5, lambda: progress[0])
    quantized_loss = objective(student, teacher, {"tokens": tokens})[0].detach()
    float_loss = phase(student, teacher, {"tokens": tokens})[0].detach()  # progress 0: every weight float
    assert all(w.blend == 0.0 for w in in_order)
    assert float(float_loss) < 0.05 * float(quantized_loss)  # what is left: the int8 activations
    progress[0] = 0.125
    half_loss = phase(student, teacher, {"tokens": tokens})[0].detach()
    assert all(w.blend == 0.25 for w in in_order) and float(float_loss) < float(half_loss) < float(quantized_loss)
    phase.quantize_all()
    assert all(w.blend == 1.0 for w in in_order)
    assert torch.equal(objective(student, teacher, {"tokens": tokens})[0].detach(), quantized_loss)
    for order, fraction, match in (("sideways", 0.3, "progressive must be one of"), ("together", 1.0, "progressive_fraction"),
                                   ("together", 0, "progressive_fraction"), ("bottom-up", True, "progressive_fraction")):
        with pytest.raises(ValueError, match=match):
            ProgressiveQuantization(objective, student, order, fraction, lambda: 0.0)
    float_student = pyclipq.prepare_qat(teacher, pyclipq.QuantConfig.preset("ternary", exclude=("*",)), exact=False)
    with pytest.raises(ValueError, match="no quantized weight whose latent trains"):
        ProgressiveQuantization(objective, float_student, "together", 0.3, lambda: 0.0)


def test_distillation_with_progressive_quantization_evaluates_and_exports_the_quantized_student():
    from pyclipq.train.qat import quantized_weights

    teacher = two_block_clip()
    _, tokens = tiny_batch(32, seed=1)
    data = [{"tokens": tokens[i:i + 8]} for i in range(0, 32, 8)]
    train = TrainConfig(steps=12, lr=3e-3, warmup_steps=2, progress=False)
    seen = []
    result = distill(teacher, data, "ternary", train=train, progressive="bottom-up", progressive_fraction=0.5,
                     evaluate=lambda m, step: seen.append([w.blend for w in quantized_weights(m)]) or {}, evaluate_every=3)
    plain = distill(teacher, data, "ternary", train=train)
    assert len(seen) == 5 and all(b == 1.0 for blends in seen for b in blends)
    assert all(w.blend == 1.0 for w in quantized_weights(result.student))
    assert result.history[0]["loss"] < 0.1 * plain.history[0]["loss"]  # the first step trains the float student
    assert embedding_cosine(result.quantized, result.student, tokens=tokens) > 0.9999  # the export is what trained
    for kwargs, match in (({"progressive": "sideways"}, "progressive must be one of"),
                          ({"progressive": "together", "progressive_fraction": 1.5}, "progressive_fraction must be")):
        with pytest.raises(ValueError, match=match):
            distill(teacher, data, "ternary", train=train, **kwargs)


def test_distillation_keeps_the_teachers_token_embeddings_unless_asked(tmp_path):
    teacher = two_block_clip()
    _, tokens = tiny_batch(32, seed=1)
    data = [{"tokens": tokens[i:i + 8]} for i in range(0, 32, 8)]
    train = TrainConfig(steps=4, lr=3e-3, progress=False)
    tables = [name for name, m in teacher.named_modules() if type(m) is nn.Embedding]
    assert tables  # the token embedding

    def table(model, name):
        return model.get_submodule(name).weight.detach()

    frozen = distill(teacher, data, "ternary", train=train)
    trained = distill(teacher, data, "ternary", train=train, freeze_embeddings=False)
    for name in tables:
        assert torch.equal(table(frozen.student, name), table(teacher, name))
        assert not torch.equal(table(trained.student, name), table(teacher, name))
    assert freeze_float_embeddings_(pyclipq.prepare_qat(teacher, "ternary")) == len(tables)


@pytest.mark.parametrize("fmt", ["ternary", "int2"])
def test_distillation_with_learned_scales_trains_them_and_exports_them(fmt, tmp_path):
    from pyclipq.train.fake_quant import FakeQuantLinear

    teacher = two_block_clip()
    images, tokens = tiny_batch(32, seed=1)
    data = [{"images": images[i:i + 16], "tokens": tokens[i:i + 16]} for i in range(0, 32, 16)]
    held_images, held_tokens = tiny_batch(16, seed=99)
    assert default_learn_scales(resolve_config(fmt)) == (fmt == "int2")  # int2 learns them by default, ternary not
    assert default_learn_scales(resolve_config("int4")) and not default_learn_scales(resolve_config("int8"))
    result = distill(teacher, data, fmt, learn_scales=True,
                     train=TrainConfig(steps=12, lr=3e-3, warmup_steps=2, progress=False))
    learners = {n: m for n, m in result.student.named_modules() if isinstance(m, FakeQuantLinear) and m.log_scale is not None}
    assert learners and not any(m.exact for m in learners.values())
    start = pyclipq.prepare_qat(teacher, fmt, exact=False, learn_scales=True)
    if fmt == "int2":  # the clip start: clipping moves the learned scales to the clipped weights' rule scales
        from pyclipq.primitives import format_scales
        from pyclipq.train.qat import clip_latent_weights_
        clip_latent_weights_(start)
        for m in start.modules():
            if isinstance(m, FakeQuantLinear) and m.log_scale is not None:
                rule = format_scales(m.weight, m.layer.spec, m.layer.group_size).clamp_min(1e-12)
                torch.testing.assert_close(m.learned_scale().detach(), rule)
    started = dict(start.named_modules())
    assert all(not torch.equal(m.log_scale, started[n].log_scale) for n, m in learners.items())  # they trained
    matches = compare_layers(result.student, result.quantized,
                             lambda m: (m.encode_image(held_images), m.encode_text(held_tokens)))
    assert matches and all(m.ok for m in matches), [m for m in matches if not m.ok]
    for name, module in result.quantized.named_modules():
        if name in learners:
            assert torch.equal(module.weight_scale, learners[name].learned_scale().detach()), name


@pytest.mark.parametrize("fmt", ["ternary", "int2"])
def test_the_ptq_start_gives_the_student_the_gptq_weights(fmt):
    from pyclipq.calibrate import calibrate
    from pyclipq.nn import QuantLinear
    from pyclipq.nn.packed import unpack_codes
    from pyclipq.train.fake_quant import FakeQuantLinear
    from pyclipq.train.qat import latent_from_packed

    model = two_block_clip()
    images, tokens = tiny_batch(32, seed=2)
    batches = [{"images": images[i:i + 8], "tokens": tokens[i:i + 8]} for i in range(0, 32, 8)]
    packed = pyclipq.convert(copy.deepcopy(model), fmt)
    calibrate(packed, batches, float_model=model, gptq=True, clip_search=True, num_batches=4, progress=False,
              forward=lambda m, b: encoder_outputs(m, b, None))
    student = pyclipq.prepare_qat(latent_from_packed(model, packed), resolve_config(fmt))
    fakes = {n: m for n, m in student.named_modules() if isinstance(m, FakeQuantLinear)}
    for name, module in packed.named_modules():
        if isinstance(module, QuantLinear) and not module.layer.is_float:
            # the fake-quant weight of the latent is the GPTQ weight: its codes, its scales up to
            # the float rounding of the rule's mean / absmax
            fake = fakes[name].quantized_weight()
            codes = unpack_codes(module.packed_weight, fmt)
            assert torch.equal(fake.levels, module.layer.spec.level(codes).float()), name
            assert torch.allclose(fake.scale, module.weight_scale, rtol=1e-6, atol=0), name
    assert embedding_cosine(student, model, tokens=tokens) > embedding_cosine(pyclipq.prepare_qat(model, fmt), model, tokens=tokens)
    with pytest.raises(ValueError, match="holds no quantized QuantLinear"):
        latent_from_packed(model, model)


def test_the_clip_start_gives_max_scaled_formats_their_weight_mse_scales():
    from pyclipq.calibrate.weights import observed_weight_scales
    from pyclipq.train.fake_quant import FakeQuantLinear
    from pyclipq.train.qat import clip_latent_weights_
    from pyclipq.transform import float_weight_of_layer

    model = two_block_clip()
    student = pyclipq.prepare_qat(model, "int2")
    assert clip_latent_weights_(student) > 0
    for name, module in student.named_modules():
        if isinstance(module, FakeQuantLinear) and not module.layer.is_float:
            float_weight = float_weight_of_layer(model, name)
            omse = observed_weight_scales(float_weight, "int2", 64, "omse")
            # the format's absmax rule on the clipped latent gives the OMSE scale (or less, where
            # nothing needed clipping), and unclipped weights keep their float values
            scale = module.quantized_weight().scale
            assert bool((scale <= omse * (1 + 1e-6)).all()) and torch.allclose(scale.max(), omse.max(), rtol=1e-6)
            bound = 3 * omse.repeat_interleave(64, dim=1)[:, :float_weight.shape[1]]
            assert torch.equal(module.weight, torch.maximum(torch.minimum(float_weight, bound), -bound))
    ternary = pyclipq.prepare_qat(model, "ternary")
    assert clip_latent_weights_(ternary) == 0  # the mean sets ternary's scale: nothing to clip
    with pytest.raises(ValueError, match="must be prepared for QAT"):
        clip_latent_weights_(model)


def test_the_fast_fake_quant_is_the_default_for_every_quantized_format():

    assert fast_fake_quant_default(resolve_config("int2")) and fast_fake_quant_default(resolve_config("int4"))
    assert fast_fake_quant_default(resolve_config("ternary")) and fast_fake_quant_default(resolve_config("int8"))
    assert not fast_fake_quant_default(resolve_config("passthrough"))
    # the measured defaults: ternary from RTN at 1e-3, int2 clipped at 1e-3, int4 from its PTQ at 2e-4
    assert [default_init(resolve_config(f)) for f in ("ternary", "int2", "int4", "int8")] == ["rtn", "clip", "ptq", "clip"]
    assert [default_lr(resolve_config(f)) for f in ("ternary", "int2", "int4", "int8")] == [1e-3, 1e-3, 2e-4, 2e-4]
    with pytest.raises(ValueError, match="init must be one of"):
        distill(two_block_clip(), [], "int2", init="gptq")


# ---------------------------------------------------------------- text encoders


def test_a_bare_hf_encoder_loads_as_a_mean_pooled_text_tower(tmp_path):
    loaded = load_model(f"hf:{tiny_bert(tmp_path)}")
    assert loaded.family == "hf-encoder" and loaded.preprocess is None and "mean pooling" in loaded.label
    tokens = loaded.tokenize(SENTENCES[:3])
    assert (tokens == 0).any()  # padded to the longest
    bert = loaded.model.model
    mask = (tokens != 0).long()
    hidden = bert(input_ids=tokens, attention_mask=mask).last_hidden_state
    want = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(loaded.model.encode_text(tokens), want, atol=1e-6)
    with pytest.raises(ValueError, match="text encoder .* has no image tower"):
        loaded.model.encode_image(torch.zeros(1, 3, 8, 8))
    # converts, saves and reloads like any model
    converted = pyclipq.convert(loaded.model, "int8")
    pyclipq.save(converted, tmp_path / "int8.safetensors")
    again = pyclipq.load(tmp_path / "int8.safetensors", load_model(f"hf:{tmp_path}").model)
    with torch.no_grad():
        assert torch.equal(again.encode_text(tokens), converted.encode_text(tokens))


def test_the_text_encoders_padding_is_left_out_of_the_block_loss(tmp_path):
    loaded = load_model(f"hf:{tiny_bert(tmp_path)}")
    tokens = loaded.tokenize(SENTENCES[:4])
    blocks = repeated_blocks(loaded.model)
    outputs = encoder_outputs(loaded.model, {"tokens": tokens}, blocks)
    assert torch.equal(outputs["text"]["mask"], tokens != 0) and not outputs["text"]["mask"].all()
    student = copy.deepcopy(loaded.model)
    with torch.no_grad():  # the student differs from the teacher at padding positions only
        student_out = encoder_outputs(student, {"tokens": tokens}, blocks)
        for h in student_out["text"]["hidden"]:
            h[~outputs["text"]["mask"]] += 5.0
    masked = EncoderDistillationLoss(embedding_weight=0)(student_out, outputs)[0]
    unmasked = EncoderDistillationLoss(embedding_weight=0, mask_padding=False)(student_out, outputs)[0]
    assert float(masked) < 1e-10 < float(unmasked)
    # a CLIP's text tower says nothing about its padding: every position counts, as before
    assert "mask" not in encoder_outputs(two_block_clip(), {"tokens": tiny_batch(2)[1]}, None)["text"]


def test_a_sentence_transformers_directory_sets_pooling_and_length(tmp_path):
    path = tiny_bert(tmp_path, pooling="cls")
    assert sentence_transformers_settings(str(path)) == ("cls", 24)
    loaded = load_model(f"hf:{path}")
    assert loaded.model.pooling == "cls" and loaded.context_length == 24
    tokens = loaded.tokenize(["a red circle " * 20])
    assert tokens.shape[1] == 24
    with pytest.raises(ValueError, match="pooling must be one of"):
        SentenceEncoder(loaded.model.model, 0, "avg")


# ---------------------------------------------------------------- data


def write_images(folder, count, bad=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        sub = folder / ("nested" if i % 2 else ".")
        sub.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(sub / f"img{i}.png")
    for i in range(bad):
        (folder / f"broken{i}.png").write_bytes(b"not a png")
    return folder


def test_unlabelled_sources_give_tokens_images_or_both(tmp_path):
    tok = tiny_tokenizer()
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(["a red circle", "", "a blue square", "a green star", "a big red square"]) + "\n")
    batches = list(train_data.unlabelled_batches([str(texts)], tokenizer=tok, transform=None, global_batch=2))
    assert len(batches) == 2 and set(batches[0]) == {"tokens"}  # 4 texts (blank line skipped), batches of 2
    folder = write_images(tmp_path / "img", 4)

    def transform(image):
        return torch.zeros(3, 16, 16)

    images = list(train_data.unlabelled_batches([f"folder:{folder}"], tokenizer=tok, transform=transform, global_batch=2))
    assert len(images) == 2 and images[0]["images"].shape == (2, 3, 16, 16)
    both = train_data.unlabelled_batches([str(texts), f"folder:{folder}"], tokenizer=tok, transform=transform, global_batch=2)
    batch = next(iter(both))
    assert set(batch) == {"tokens", "images", "skipped"} and len(both) == 2
    csv = tmp_path / "pairs.csv"
    csv.write_text("file,text\n" + "".join(f"img/{'nested/' if i % 2 else ''}img{i}.png,a red circle\n" for i in range(4)))
    pairs = next(iter(train_data.unlabelled_batches([f"csv:{csv}"], tokenizer=tok, transform=transform, global_batch=2,
                                                     text_column="text", image_column="file")))
    assert set(pairs) == {"tokens", "images", "skipped"}


def test_bad_unlabelled_data_gets_clear_errors(tmp_path):
    tok = tiny_tokenizer()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.txt holds no text"):
        train_data.unlabelled_batches([str(empty)], tokenizer=tok, transform=None, global_batch=2)
    csv = tmp_path / "c.csv"
    csv.write_text("caption\nhello\n")
    with pytest.raises(ValueError, match="--text-column: column 'text' not in c.csv"):
        train_data.unlabelled_batches([f"csv:{csv}"], tokenizer=tok, transform=None, global_batch=1, text_column="text")
    with pytest.raises(ValueError, match="name the CSV's --text-column, --image-column or both"):
        train_data.unlabelled_batches([f"csv:{csv}"], tokenizer=tok, transform=None, global_batch=1)
    folder = write_images(tmp_path / "img", 2)
    with pytest.raises(ValueError, match="the model has no image tower"):
        train_data.unlabelled_batches([f"folder:{folder}"], tokenizer=tok, transform=None, global_batch=1)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="none holds no image"):
        train_data.unlabelled_batches([f"folder:{tmp_path / 'none'}"], tokenizer=tok, transform=lambda i: i, global_batch=1)
    with pytest.raises(FileNotFoundError, match="--data: .*missing.txt not found"):
        train_data.unlabelled_batches([str(tmp_path / "missing.txt")], tokenizer=tok, transform=None, global_batch=1)


# ---------------------------------------------------------------- the command


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *args], capture_output=True,
                          text=True, cwd=cwd or "/", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


COMMON = ["--model", "testbed", "--batch-size", "4", "--threads", "1", "--workers", "0", "--no-progress",
          "--checkpoint-every", "2", "--log-every", "1"]


def logged_steps(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sources", ["texts", "images", "both"])
def test_the_command_distills_texts_images_or_both(tmp_path, sources):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")))
    folder = write_images(tmp_path / "img", 8, bad=1)
    data = {"texts": [str(texts)], "images": [f"folder:{folder}"], "both": [str(texts), f"folder:{folder}"]}[sources]
    out = tmp_path / "run"
    run_cli(*COMMON, *[a for d in data for a in ("--data", d)], "--format", "int2", "--steps", "3", "--out", str(out))
    results = json.loads((out / "results.json").read_text())
    history = logged_steps(out)
    assert results["recipe"] == "distill-int2" and [r["step"] for r in history] == [1, 2, 3]
    parts = set(history[0])
    assert ("text_embedding" in parts) == (sources != "images") and ("image_hidden" in parts) == (sources != "texts")
    if sources != "texts":
        assert results["skipped_images"] >= 1  # the broken PNG: counted and skipped
    reloaded = pyclipq.load(out / "model.safetensors", load_model("testbed").model)
    assert any(type(m).__name__ == "QuantLinear" for m in reloaded.modules())


def test_the_command_takes_a_minutes_budget(tmp_path):
    """--minutes replaces --steps: a budget the probe alone spends ends the run at the probe."""
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")))
    out = tmp_path / "run"
    run_cli(*COMMON, "--data", str(texts), "--format", "int8", "--steps", "40", "--minutes", "0.0001", "--out", str(out))
    assert json.loads((out / "results.json").read_text())["steps"] == BUDGET_PROBE_STEPS
    assert logged_steps(out)[-1]["step"] == BUDGET_PROBE_STEPS
    for bad in ("0", "-1", "soon", "inf"):
        proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *COMMON, "--data", str(texts),
                               "--minutes", bad, "--out", str(out)], capture_output=True, text=True, cwd="/", timeout=600)
        assert proc.returncode == 2 and f"--minutes must be a number > 0, got {bad!r}" in proc.stderr, proc.stderr


def test_the_command_dampens_when_asked(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")))
    out = tmp_path / "run"
    run_cli(*COMMON, "--data", str(texts), "--format", "ternary", "--steps", "4", "--dampen", "2", "--out", str(out))
    history = logged_steps(out)
    assert [r["step"] for r in history] == [1, 2, 3, 4] and all("grid_distance" in r for r in history[1:])
    for bad in ("0", "-1", "strong", "nan"):
        proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *COMMON, "--data", str(texts),
                               "--dampen", bad, "--out", str(out)], capture_output=True, text=True, cwd="/", timeout=600)
        assert proc.returncode == 2 and f"--dampen must be a number > 0, got {bad!r}" in proc.stderr, proc.stderr


def test_the_command_quantizes_progressively_when_asked(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")))
    runs = {}
    for name, extra in (("plain", []), ("progressive", ["--progressive", "together", "--progressive-fraction", "0.5"])):
        runs[name] = tmp_path / name
        run_cli(*COMMON, "--data", str(texts), "--format", "ternary", "--steps", "4", *extra, "--out", str(runs[name]))
    plain, progressive = logged_steps(runs["plain"]), logged_steps(runs["progressive"])
    assert [r["step"] for r in progressive] == [1, 2, 3, 4]
    assert progressive[0]["loss"] < 0.1 * plain[0]["loss"]  # its first step ran the float weights
    for flag, bad, message in (("--progressive-fraction", "1", "--progressive-fraction must be a number in (0, 1), got '1'"),
                               ("--progressive-fraction", "most", "--progressive-fraction must be a number in (0, 1)"),
                               ("--progressive", "sideways", "invalid choice: 'sideways'")):
        extra = [flag, bad] if flag == "--progressive" else ["--progressive", "together", flag, bad]
        proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *COMMON, "--data", str(texts),
                               *extra, "--out", str(tmp_path / "bad")], capture_output=True, text=True, cwd="/", timeout=600)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


class Interrupted(RuntimeError):
    pass


class StopsAfter:
    """The batches of `data`, raising after `count` of them in the first epoch (a crashed run)."""

    def __init__(self, data, count):
        self.data, self.count = data, count

    def __iter__(self):
        for i, batch in enumerate(self.data):
            if i == self.count:
                raise Interrupted()
            yield batch


def test_an_interrupted_distillation_resumes_to_the_same_model(tmp_path):
    images, tokens = tiny_batch(32, seed=1)
    data = [{"tokens": tokens[i:i + 8]} for i in range(0, 32, 8)]

    def config(out):
        return TrainConfig(steps=4, lr=3e-3, checkpoint_every=2, progress=False, output_dir=str(out))

    whole = distill(two_block_clip(), data, "int2", init="rtn", train=config(tmp_path / "whole"))
    with pytest.raises(Interrupted):
        distill(two_block_clip(), StopsAfter(data, 2), "int2", init="rtn", train=config(tmp_path / "part"))
    resumed = distill(two_block_clip(), data, "int2", init="rtn", train=config(tmp_path / "part"), resume=True)
    assert [r["step"] for r in resumed.history] == [3, 4]
    for (name, a), b in zip(whole.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_command_resumes_from_its_checkpoint(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")))
    args = [*COMMON, "--data", str(texts), "--format", "ternary", "--out", str(tmp_path / "run")]
    run_cli(*args, "--steps", "2")
    run_cli(*args, "--steps", "4", "--resume")
    assert [r["step"] for r in logged_steps(tmp_path / "run")] == [1, 2, 3, 4]  # one log, appended on resume
    assert json.loads((tmp_path / "run" / "results.json").read_text())["loss_last"] is not None


def test_the_command_takes_plain_batches_and_trained_embeddings(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")))
    out = tmp_path / "run"
    run_cli(*COMMON, "--data", str(texts), "--format", "ternary", "--steps", "3", "--out", str(out),
            "--no-length-grouping", "--train-embeddings", "--join-texts", "0.5")
    assert [r["step"] for r in logged_steps(out)] == [1, 2, 3]
    help_text = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", "--help"], capture_output=True,
                               text=True, timeout=300, cwd="/").stdout
    assert all(flag in help_text for flag in ("--no-length-grouping", "--train-embeddings", "--join-texts"))


def test_the_command_rejects_bad_data(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *COMMON, "--data", str(empty),
                           "--steps", "1", "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode != 0 and "holds no text" in proc.stderr
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square\n")
    proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *COMMON, "--data", str(texts),
                           "--join-texts", "2", "--steps", "1", "--out", str(tmp_path / "r")], capture_output=True,
                          text=True, timeout=300, cwd="/")
    assert proc.returncode != 0 and "--join-texts): expected a fraction in [0, 1], got 2.0" in proc.stderr


def test_the_command_learns_scales_when_asked(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")))
    out = tmp_path / "run"
    run_cli(*COMMON, "--data", str(texts), "--format", "ternary", "--scales", "learned", "--steps", "2", "--out", str(out))
    model = load_model("testbed").model
    reloaded = pyclipq.load(out / "model.safetensors", model)
    rule = pyclipq.convert(load_model("testbed").model, "ternary")
    learned = {n: m.weight_scale for n, m in reloaded.named_modules() if type(m).__name__ == "QuantLinear"}
    ruled = {n: m.weight_scale for n, m in rule.named_modules() if type(m).__name__ == "QuantLinear"}
    assert learned.keys() == ruled.keys() and any(not torch.equal(learned[n], ruled[n]) for n in learned)
    proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *COMMON, "--data", str(texts),
                           "--scales", "learned", "--fake-quant", "exact", "--steps", "1", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode != 0 and "--scales learned trains through the fast fake-quant" in proc.stderr


def test_the_command_rotates_int4_by_default_and_refuses_attention_maps_it_cannot_see(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "star")))
    for rotation, want in (("auto", 128), ("0", 0)):
        out = tmp_path / f"run{rotation}"
        run_cli(*COMMON, "--data", str(texts), "--format", "int4", "--rotation", rotation, "--steps", "1", "--out", str(out))
        reloaded = pyclipq.load(out / "model.safetensors", load_model("testbed").model)
        rotations = {m.layer.rotation for m in reloaded.modules() if type(m).__name__ == "QuantLinear" and not m.layer.is_float}
        assert rotations == {want}, (rotation, rotations)
    proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *COMMON, "--data", str(texts),
                           "--format", "ternary", "--attention-weight", "1", "--steps", "1", "--out", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode != 0 and "nn.MultiheadAttention" in proc.stderr and "attention_weight=0" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pyclipq.cli", "train", "distill", *COMMON, "--data", str(texts),
                           "--format", "int4", "--rotation", "some", "--steps", "1", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode != 0 and "--rotation: expected 'auto' or a block size" in proc.stderr


def test_the_default_loss_reads_attention_maps_where_the_model_shows_them(tmp_path):
    from pyclipq.train.recipes import DEFAULT_ATTENTION_WEIGHT, DEFAULT_HIDDEN_WEIGHT, default_loss

    bert = load_model(f"hf:{tiny_bert(tmp_path)}").model
    loss = default_loss(bert)
    assert (loss.hidden_weight, loss.attention_weight) == (DEFAULT_HIDDEN_WEIGHT, DEFAULT_ATTENTION_WEIGHT) > (0, 0)
    # nn.MultiheadAttention packs q and k into one in-projection: the default leaves the maps out
    clip_loss = default_loss(two_block_clip())
    assert clip_loss.attention_weight == 0.0 and clip_loss.hidden_weight == DEFAULT_HIDDEN_WEIGHT
