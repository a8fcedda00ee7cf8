"""Recipes: the prompt learner, the QAdapter, P4Q's loss direction, one-call TernaryCLIP / P4Q, the CLI."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from pyclipq.convert import convert as pyclipq_convert
from pyclipq.cli import testbed_recipes
from pyclipq.train import qat, recipes
from pyclipq.train.p4q import FeatureBatches, P4QModel, P4QObjective, QAdapter
from pyclipq.train.prompt import PromptLearner, encode_text_embeddings
from pyclipq.train.trainer import TrainConfig

from train_helpers import CLASSNAMES, class_data, single_thread, tiny_batch, tiny_clip, tiny_tokenizer

_one_thread = pytest.fixture(autouse=True)(single_thread)


# ---------------------------------------------------------------- prompt learner


def test_encode_text_embeddings_equals_encode_text():
    model = tiny_clip().eval()
    _, tokens = tiny_batch(5)
    with torch.no_grad():
        assert torch.equal(encode_text_embeddings(model, model.token_embedding(tokens), tokens), model.encode_text(tokens))


@pytest.mark.parametrize("position", ["end", "front", "middle"])
def test_prompt_layout(position):
    model, tok = tiny_clip(), tiny_tokenizer()
    prompt = PromptLearner(model, tok, CLASSNAMES, n_ctx=4, position=position)
    name = tok(["big red square"])[0][1:4].tolist()  # "big red square" between SOT and EOT
    row = prompt.token_ids[3].tolist()
    slots = prompt.ctx_positions[3].tolist()
    expected = {"end": [1, 2, 3, 4], "front": [4, 5, 6, 7], "middle": [1, 2, 6, 7]}[position]
    assert slots == expected
    body = [t for i, t in enumerate(row[1:], start=1) if i not in slots][: len(name) + 1]
    assert body == name + [tok.word_to_id["."]]
    assert int(torch.tensor(row).argmax()) == len(name) + 4 + 2  # EOT after SOT, 4 slots, name, "."
    embeddings = prompt()
    assert torch.equal(embeddings[3, slots], prompt.ctx.detach())  # the shared context, in every class
    assert torch.equal(embeddings[0, prompt.ctx_positions[0]], prompt.ctx.detach())


def test_prompt_init_from_phrase_reproduces_the_hand_prompt():
    model, tok = tiny_clip().eval(), tiny_tokenizer()
    prompt = PromptLearner(model, tok, CLASSNAMES, n_ctx=4, ctx_init="a photo of a")
    ids = tok([f"a photo of a {c}." for c in CLASSNAMES])
    with torch.no_grad():
        torch.testing.assert_close(prompt(), model.token_embedding(ids))


def test_prompt_errors():
    model, tok = tiny_clip(), tiny_tokenizer()
    with pytest.raises(ValueError, match="n_ctx: 9 context vectors"):
        PromptLearner(model, tok, CLASSNAMES, n_ctx=9)
    with pytest.raises(ValueError, match="position must be one of"):
        PromptLearner(model, tok, CLASSNAMES, position="left")
    with pytest.raises(ValueError, match="ctx_init: 'a photo' has 2 tokens"):
        PromptLearner(model, tok, CLASSNAMES, n_ctx=4, ctx_init="a photo")
    with pytest.raises(ValueError, match="classnames must be a non-empty"):
        PromptLearner(model, tok, "red circle")
    with pytest.raises(ValueError, match="prompt learner needs an open_clip CLIP text tower"):
        PromptLearner(torch.nn.Linear(2, 2), tok, CLASSNAMES)


# ---------------------------------------------------------------- QAdapter and P4Q


def test_qadapter_starts_at_the_ptq_direction_and_exports_the_same_codes():
    adapter = QAdapter(32, reduction=4, alpha=0.2, layer="int8")
    z = torch.randn(6, 32)
    torch.testing.assert_close(adapter(z), 0.8 * z)  # fc2 starts at zero
    with torch.no_grad():
        adapter.fc2.weight.normal_()
    exported = adapter.export()
    y_fake = adapter(z)
    y_real = exported(z)
    assert F.cosine_similarity(y_fake, y_real).min() > 0.99999
    assert torch.equal(exported.fc1.dequantize_weight(torch.float32), adapter.fc1.quantized_weight().dequantize())
    with pytest.raises(ValueError, match="alpha must be in"):
        QAdapter(32, alpha=1.5)
    with pytest.raises(ValueError, match="reduction must be an int"):
        QAdapter(4, reduction=8)


def test_p4q_distillation_is_kl_teacher_to_student():
    model = tiny_clip().eval()
    tok = tiny_tokenizer()
    ptq = pyclipq_convert(qat.deepcopy_model(model), "int4")
    student = P4QModel(ptq, PromptLearner(ptq, tok, CLASSNAMES, n_ctx=3), QAdapter(32))
    teacher_classes = F.normalize(torch.randn(len(CLASSNAMES), 32), dim=-1)
    images, labels = class_data(1, 5)[0]
    loss, parts = P4QObjective(teacher_classes, lam=1.0, temperature=2.0)(student, model, (images, labels))
    with torch.no_grad():
        s = student.logits(images)
        t = model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ teacher_classes.t()
    p_t, p_s = F.softmax(t / 2, dim=1), F.softmax(s / 2, dim=1)
    by_hand = 4 * (p_t * (p_t.log() - p_s.log())).sum(dim=1).mean()
    reverse = 4 * (p_s * (p_s.log() - p_t.log())).sum(dim=1).mean()
    assert parts["kd"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert abs(by_hand - reverse) > 1e-4
    assert loss.item() == pytest.approx((F.cross_entropy(s, labels) + by_hand).item(), rel=1e-5)


def test_p4q_cached_features_give_the_same_loss():
    model = tiny_clip().eval()
    ptq = pyclipq_convert(qat.deepcopy_model(model), "int4")
    student = P4QModel(ptq, PromptLearner(ptq, tiny_tokenizer(), CLASSNAMES, n_ctx=3), QAdapter(32))
    objective = P4QObjective(F.normalize(torch.randn(len(CLASSNAMES), 32), dim=-1))
    images, labels = class_data(1, 6)[0]
    cached = FeatureBatches.from_batches(ptq, model, [(images, labels)])
    batch = {k: v[torch.arange(6)] for k, v in {"image_features": cached.image_features,
             "teacher_image_features": cached.teacher_image_features, "labels": cached.labels}.items()}
    live, live_parts = objective(student, model, (images, labels))
    fast, fast_parts = objective(student, model, batch)
    assert fast.item() == pytest.approx(live.item(), rel=1e-6) and set(fast_parts) == {"ce", "kd"}
    with pytest.raises(ValueError, match="batch dict is missing"):
        objective(student, model, {"labels": labels})
    with pytest.raises(ValueError, match="batch_size must be in"):
        FeatureBatches(cached.image_features, cached.teacher_image_features, cached.labels, 7)


def test_p4q_one_call_trains_only_prompt_and_adapter_and_runs_packed(tmp_path):
    model = tiny_clip().eval()
    tok = tiny_tokenizer()
    ptq = pyclipq_convert(qat.deepcopy_model(model), "int4")
    frozen = {k: v.clone() for k, v in ptq.state_dict().items()}
    data = class_data(1, 16)
    result = recipes.p4q(ptq, model, tok, CLASSNAMES, data, n_ctx=3, prompt_lr=0.02, adapter_lr=1e-2,
                         train=TrainConfig(steps=12, warmup_steps=1, progress=False))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert all(torch.equal(frozen[k], v) for k, v in result.model.ptq_model.state_dict().items())
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt.ctx", "adapter.fc1.weight", "adapter.fc2.weight"}
    # Exported: packed adapter and class embeddings through the packed text tower, same predictions.
    images = data[0][0]
    with torch.no_grad():
        fake = result.model.logits(images)
        real = result.exported.encode_image(images, normalize=True) @ result.exported.class_embeddings.t()
    assert torch.equal(fake.argmax(1), real.argmax(1))
    from pyclipq.nn import QuantLinear

    assert isinstance(result.exported.adapter.fc1, QuantLinear)
    # The head saves and loads next to the PTQ model (which pyclipq.save / load handle).
    path = tmp_path / "head.safetensors"
    recipes.save_p4q_head(result.exported, path)
    loaded = recipes.load_p4q_head(result.exported.ptq_model, path)
    assert torch.equal(loaded.encode_image(images), result.exported.encode_image(images))
    assert torch.equal(loaded.class_embeddings, result.exported.class_embeddings) and loaded.classnames == CLASSNAMES


# ---------------------------------------------------------------- TernaryCLIP and the CLI


def test_ternary_one_call_returns_a_packed_model(tmp_path):
    model = tiny_clip().eval()
    data = [tiny_batch(6, seed=i) for i in range(2)]
    result = recipes.ternary_clip(model, data, preset="qffn", train=TrainConfig(steps=3, output_dir=str(tmp_path), progress=False))
    from pyclipq.nn import QuantLinear

    formats = {m.layer.format for m in result.quantized.modules() if isinstance(m, QuantLinear)}
    assert formats == {"ternary"}
    assert (tmp_path / "checkpoint.pt").is_file() and len(result.history) == 3
    resumed = recipes.ternary_clip(model, data, preset="qffn", resume=True,
                                   train=TrainConfig(steps=4, output_dir=str(tmp_path), progress=False))
    assert [r["step"] for r in resumed.history] == [4]  # picked up after step 3
    with pytest.raises(ValueError, match="preset must be one of"):
        recipes.ternary_config("qattn")


def test_cli_rejects_bad_commands():
    with pytest.raises(SystemExit, match="usage: python -m pyclipq.cli.testbed_recipes"):
        testbed_recipes.main(["quantize"])
    with pytest.raises(SystemExit):
        testbed_recipes.ternary_main(["--preset", "qall"])  # --out is required


# ---------------------------------------------------------------- the shipped test bed (CI's shortened run)


def test_shortened_ternary_qat_on_the_testbed_lowers_loss_and_beats_ptq():
    from pyclipq.testbed import load_testbed, make_split

    testbed = load_testbed()
    test = make_split("test", 256).loader(256)
    student = qat.prepare_qat(testbed.model, recipes.ternary_config("qall"))
    # Before training the fake-quant model *is* the PTQ model (same codes, reference numerics).
    accuracy = lambda m: recipes.zero_shot_top1(m, testbed.tokenizer, testbed.classnames, testbed.templates, test)  # noqa: E731
    ptq = accuracy(student)
    data = recipes.TestbedPairs(256, 32, testbed.tokenizer)
    config = TrainConfig(steps=8, lr=1e-3, warmup_steps=1, progress=False)
    trainer = recipes.Trainer(student, data, config, teacher=testbed.model)
    history = trainer.fit()
    after = accuracy(student)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert after > ptq + 0.08, (ptq, after)  # measured: 11.3% -> 25.8% after 8 steps


def test_load_p4q_head_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a P4Q head"):
        recipes.load_p4q_head(tiny_clip(), path)
