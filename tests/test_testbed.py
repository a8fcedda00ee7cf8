"""The test bed: deterministic scenes, truthful captions, the tokenizer, the loss, the shipped weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pyclipq.testbed import (
    NUM_CLASSES,
    ZERO_SHOT_TEMPLATES,
    TestbedConfig,
    WordTokenizer,
    build_model,
    class_names,
    evaluate_on_testbed,
    load_testbed,
    make_split,
)
from pyclipq.testbed import scenes
from pyclipq.testbed.captions import caption_vocabulary, position_phrase
from pyclipq.testbed.splits import SPLIT_CODES, chunk_seed, iterate_batches
from pyclipq.cli.testbed_train import contrastive_loss, main as train_main
from pyclipq.eval import zero_shot_accuracy, zero_shot_classifier


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


def test_split_is_deterministic_and_prefix_stable():
    small, large = make_split("test", 100), make_split("test", 300)
    again = make_split("test", 100)
    assert torch.equal(small.images, again.images) and small.captions == again.captions
    assert torch.equal(small.images, large.images[:100])
    assert torch.equal(small.labels, large.labels[:100])
    assert small.captions == large.captions[:100]


def test_splits_never_share_a_seed():
    seeds = {split: {chunk_seed(split, chunk) for chunk in range(2000)} for split in SPLIT_CODES}
    assert all(len(s) == 2000 for s in seeds.values())
    assert not (seeds["train"] & seeds["val"]) and not (seeds["train"] & seeds["test"]) and not (seeds["val"] & seeds["test"])
    assert not torch.equal(make_split("train", 8).images, make_split("test", 8).images)


def test_training_stream_is_the_train_split_in_order():
    batches = iterate_batches("train", 200)
    first, second = next(batches), next(batches)
    reference = make_split("train", 400)
    assert torch.equal(torch.cat([first.images, second.images]), reference.images)
    assert first.captions + second.captions == reference.captions


def test_bad_split_arguments_name_the_argument():
    with pytest.raises(ValueError, match="split"):
        make_split("holdout", 4)
    with pytest.raises(ValueError, match="n:"):
        make_split("test", 0)


def test_classes_cover_every_colour_shape_pair():
    names = class_names()
    assert len(names) == NUM_CLASSES == len(set(names)) >= 40
    data = make_split("val", 512)
    assert data.images.shape == (512, 3, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert data.images.min() >= 0 and data.images.max() <= 1
    # 512 draws from 48 classes leave none out with probability ~ 48 * (47/48)^512 < 1e-3.
    assert set(data.labels.tolist()) == set(range(NUM_CLASSES))
    for label, color, shape in zip(data.labels, data.attributes.color, data.attributes.shape):
        assert names[label] == f"{scenes.COLOR_NAMES[color]} {scenes.SHAPES[shape]}"


def test_captions_describe_their_scene():
    data = make_split("val", 300)
    attributes = data.attributes
    for i, caption in enumerate(data.captions):
        words = caption.rstrip(".").split()
        assert scenes.COLOR_NAMES[attributes.color[i]] in words
        assert scenes.SHAPES[attributes.shape[i]] in words
        mentioned_sizes = [word for word in words if word in scenes.SIZE_NAMES]
        expected_size = [scenes.SIZE_NAMES[attributes.size[i]]] if data.mentions_size[i] else []
        assert mentioned_sizes == expected_size, caption
        place = position_phrase(int(attributes.column[i]), int(attributes.row[i]))
        assert (f"in the {place}" in caption) == bool(data.mentions_position[i]), caption


def test_position_phrases():
    assert position_phrase(0, 0) == "top left"
    assert position_phrase(1, 1) == "middle"
    assert position_phrase(2, 1) == "middle right"
    assert position_phrase(1, 2) == "bottom middle"


@pytest.mark.parametrize(
    "shape, area",
    [
        ("circle", lambda r: math.pi * r * r),
        ("square", lambda r: 2 * r * r),
        ("diamond", lambda r: 2 * r * r),
        ("triangle", lambda r: 3 * math.sqrt(3) / 4 * (1.15 * r) ** 2),
        ("ring", lambda r: math.pi * ((r) ** 2 - (0.44 * r) ** 2)),
        ("cross", lambda r: 2 * (2 * r) * (0.64 * r) - (0.64 * r) ** 2),
    ],
)
def test_rendered_area_matches_geometry(shape, area):
    radius = 10.0
    coords = torch.arange(64, dtype=torch.float32) - 31.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    coverage = (0.5 - scenes._signed_distance(shape, x, y, torch.tensor(radius))).clamp(0, 1)
    assert coverage.sum().item() == pytest.approx(area(radius), rel=0.03)


def test_vertex_up_shapes_point_up():
    # A triangle's top vertex is on the +y axis: (0, 0.95 R) is inside, (0, -0.95 R) is not.
    radius = torch.tensor(10.0)
    inside = scenes._signed_distance("triangle", torch.tensor([0.0]), torch.tensor([9.0]), radius)
    outside = scenes._signed_distance("triangle", torch.tensor([0.0]), torch.tensor([-9.0]), radius)
    assert inside.item() < 0 < outside.item()


def test_tokenizer_layout():
    tokenizer = WordTokenizer(["a", "red", "circle", "."], context_length=8)
    start, end = tokenizer.start_id, tokenizer.end_id
    assert (start, end, tokenizer.vocab_size) == (6, 7, 8)
    tokens = tokenizer(["a red circle.", "a blue circle"])
    assert tokens.tolist() == [[6, 2, 3, 4, 5, 7, 0, 0], [6, 2, 1, 4, 7, 0, 0, 0]]
    # open_clip pools text at argmax(token id): that must be the end token.
    assert (tokens.argmax(dim=1) == torch.tensor([5, 4])).all()
    truncated = tokenizer("a a a a a a a a a a")
    assert truncated[0, -1].item() == end and truncated.shape == (1, 8)


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="context_length"):
        WordTokenizer(["a"], context_length=2)
    with pytest.raises(ValueError, match="words"):
        WordTokenizer(["a", "a"], context_length=8)


def test_every_caption_and_prompt_word_is_in_the_vocabulary():
    tokenizer = TestbedConfig().tokenizer()
    texts = make_split("train", 500).captions + [t.format(name) for name in class_names() for t in ZERO_SHOT_TEMPLATES]
    tokens = tokenizer(texts)
    assert not (tokens == 1).any()
    longest = max(len(tokenizer.encode(text)) for text in texts)
    assert longest + 2 <= tokenizer.context_length


def test_caption_matches_marks_every_truthful_caption():
    data = make_split("train", 64)
    matches = data.caption_matches()
    a = data.attributes
    for i in range(64):
        for j in range(64):
            truthful = (
                a.color[i] == a.color[j]
                and a.shape[i] == a.shape[j]
                and (not data.mentions_size[j] or a.size[i] == a.size[j])
                and (not data.mentions_position[j] or (a.row[i] == a.row[j] and a.column[i] == a.column[j]))
            )
            assert bool(matches[i, j]) == bool(truthful)
    assert matches.diagonal().all()
    # Spot-check the rule on the captions' own words: a truthful caption names the image's colour and shape.
    for i, j in torch.nonzero(matches)[:50].tolist():
        words = data.captions[j].rstrip(".").split()
        assert scenes.COLOR_NAMES[a.color[i]] in words and scenes.SHAPES[a.shape[i]] in words


def test_contrastive_loss_with_one_positive_is_clip_loss():
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * images @ texts.T
    expected = (torch.nn.functional.cross_entropy(logits, torch.arange(6)) + torch.nn.functional.cross_entropy(logits.T, torch.arange(6))) / 2
    assert contrastive_loss(images, texts, scale, torch.eye(6, dtype=torch.bool)).item() == pytest.approx(expected.item(), rel=1e-6)


def test_model_keeps_multihead_attention():
    model = build_model(TestbedConfig())
    attention = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    config = TestbedConfig()
    assert len(attention) == config.vision_layers + config.text_layers
    assert model.encode_text(config.tokenizer()(["a red circle."])).shape == (1, config.embed_dim)


def test_shipped_weights_reach_their_recorded_accuracy(testbed):
    recorded = testbed.metadata["zero_shot_test_fp32"]
    assert recorded["top1"] >= 0.85 and recorded["scenes"] >= 10000
    assert testbed.metadata["reproduce"].startswith("python -m pyclipq.cli.testbed_train")
    # A 2048-scene prefix of the same test split: its top-1 has a standard error of ~0.7 points.
    data = make_split("test", 2048)
    classifier = zero_shot_classifier(testbed.model, testbed.tokenizer, testbed.classnames, testbed.templates, progress=False)
    measured = zero_shot_accuracy(testbed.model, classifier, data.loader(), progress=False)
    assert measured["top1"] == pytest.approx(recorded["top1"], abs=0.03)
    assert measured["top5"] == pytest.approx(recorded["top5"], abs=0.02)


def test_testbed_report_of_the_reference_against_itself(testbed):
    report = evaluate_on_testbed(
        testbed.model, testbed.tokenizer, reference=testbed.model, scenes=512, retrieval_scenes=256, progress=False
    )
    data = make_split("test", 512)
    classifier = zero_shot_classifier(testbed.model, testbed.tokenizer, testbed.classnames, testbed.templates, progress=False)
    assert report["zero_shot_top1"] == pytest.approx(zero_shot_accuracy(testbed.model, classifier, data.loader(), progress=False)["top1"])
    assert report["zero_shot_top1_agreement"] == 1.0 and report["similarity_kl"] == pytest.approx(0.0, abs=1e-9)
    # Captions are ambiguous, so recall counts every truthful caption: far above the 1/256 of chance.
    assert 0.5 < report["image_to_text_recall@1"] <= report["image_to_text_recall@5"] <= 1.0
    assert report["text_to_image_recall@10"] > 0.5
    with pytest.raises(ValueError, match="retrieval_scenes"):
        evaluate_on_testbed(testbed.model, testbed.tokenizer, scenes=10, retrieval_scenes=20, progress=False)


def test_load_testbed_reports_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="pyclipq.cli.testbed_train"):
        load_testbed(tmp_path)


def test_training_script_writes_a_loadable_testbed(tmp_path):
    arguments = [
        "--steps", "2", "--batch-size", "32", "--vision-layers", "1", "--text-layers", "1",
        "--vision-width", "32", "--text-width", "32", "--embed-dim", "16",
        "--val-every", "2", "--val-scenes", "64", "--test-scenes", "64", "--threads", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    train_main(arguments)
    metadata = json.loads((tmp_path / "testbed.json").read_text())
    assert metadata["reproduce"] == "python -m pyclipq.cli.testbed_train " + " ".join(arguments)
    loaded = load_testbed(tmp_path)
    assert loaded.config.vision_width == 32 and loaded.config.vocabulary == caption_vocabulary()
    assert 0.0 <= metadata["zero_shot_test_fp32"]["top1"] <= 1.0
