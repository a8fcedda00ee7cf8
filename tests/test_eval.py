"""pyclipq.eval against values computed by hand or by an independent route."""
from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from pyclipq.eval import (
    HuggingFaceCLIP,
    as_clip_like,
    cifar100,
    cifar100_classnames,
    cifar100_templates,
    compare_to_reference,
    encode_images,
    encode_texts,
    evaluate_retrieval,
    evaluate_retrieval_csv,
    image_folder,
    imagenet_templates,
    make_loader,
    paired_cosine,
    read_retrieval_csv,
    recall_from_similarity,
    retrieval_recall,
    similarity_kl,
    top1_agreement,
    topk_accuracy,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from pyclipq.testbed import load_testbed, make_split


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


@pytest.fixture(scope="module")
def scenes_as_uint8():
    # Images saved as PNG come back rounded to 8 bits; the tensor route gets the same rounding.
    data = make_split("test", 96)
    data.images = (data.images * 255).round().to(torch.uint8).float() / 255
    return data


# ---------------------------------------------------------------- top-k and zero-shot


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.1, 0.2, 0.7], [0.6, 0.5, 0.4]])
    labels = torch.tensor([0, 0, 1, 2])
    # Ranks of the true class: 1, 2, 2, 3.
    assert topk_accuracy(logits, labels, ks=(1, 2, 3, 5)) == {"top1": 0.25, "top2": 0.75, "top3": 1.0, "top5": 1.0}


def test_topk_accuracy_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="ks"):
        topk_accuracy(torch.zeros(2, 3), torch.tensor([0, 1]), ks=(0,))


def test_zero_shot_classifier_is_normalized_mean_of_prompt_embeddings(testbed):
    classnames, templates = ["red circle", "blue star"], ["a photo of a {}.", "a {}."]
    classifier = zero_shot_classifier(testbed.model, testbed.tokenizer, classnames, templates, batch_size=3, progress=False)
    with torch.no_grad():
        for row, name in enumerate(classnames):
            prompts = testbed.tokenizer([t.format(name) for t in templates])
            mean = F.normalize(testbed.model.encode_text(prompts), dim=-1).mean(dim=0)
            torch.testing.assert_close(classifier[row], mean / mean.norm(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("templates", ["a photo of a {}.", ["a photo"], ["{} and {}"], []])
def test_zero_shot_classifier_rejects_bad_templates(testbed, templates):
    with pytest.raises(ValueError, match="templates"):
        zero_shot_classifier(testbed.model, testbed.tokenizer, ["red circle"], templates, progress=False)


def test_zero_shot_accuracy_matches_direct_computation(testbed):
    data = make_split("test", 200)
    classifier = zero_shot_classifier(testbed.model, testbed.tokenizer, testbed.classnames, testbed.templates, progress=False)
    result = zero_shot_accuracy(testbed.model, classifier, data.loader(batch_size=64), progress=False)
    with torch.no_grad():
        logits = F.normalize(testbed.model.encode_image(data.images), dim=-1) @ classifier.T
    ranks = (logits > logits.gather(1, data.labels[:, None])).sum(dim=1)
    assert result["n"] == 200
    assert result["top1"] == pytest.approx((ranks < 1).float().mean().item())
    assert result["top5"] == pytest.approx((ranks < 5).float().mean().item())


def test_zero_shot_accuracy_needs_labels(testbed):
    classifier = torch.zeros(48, testbed.config.embed_dim)
    with pytest.raises(ValueError, match="batches"):
        zero_shot_accuracy(testbed.model, classifier, [torch.zeros(2, 3, 32, 32)], progress=False)
    with pytest.raises(ValueError, match="classifier"):
        zero_shot_accuracy(testbed.model, torch.zeros(48, 7), [(torch.zeros(2, 3, 32, 32), torch.zeros(2).long())], progress=False)


def test_encoders_reject_non_clip_models_and_bad_texts(testbed):
    with pytest.raises(ValueError, match="model"):
        encode_images(torch.nn.Linear(2, 2), [torch.zeros(1, 2)], progress=False)
    with pytest.raises(ValueError, match="texts"):
        encode_texts(testbed.model, testbed.tokenizer, "a red circle.", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        encode_texts(testbed.model, testbed.tokenizer, ["a red circle."], batch_size=0, progress=False)


# ---------------------------------------------------------------- retrieval


def test_recall_on_a_constructed_similarity_matrix():
    # 3 images, 4 captions: captions 0 and 1 describe image 0, caption 2 image 1, caption 3 image 2.
    similarity = torch.tensor(
        [
            [0.1, 0.8, 0.3, 0.9],  # image 0: ranked texts 3, 1, 2, 0 -> first own caption (1) at rank 2
            [0.2, 0.1, 0.7, 0.3],  # image 1: ranked 2, ... -> rank 1
            [0.9, 0.4, 0.5, 0.6],  # image 2: ranked 0, 3, ... -> rank 2
        ]
    )
    owners = torch.tensor([0, 0, 1, 2])
    # Text -> image, by column: text 0 ranks images 2, 1, 0 (own 0: rank 3); text 1 ranks 0 first;
    # text 2 ranks 1 first; text 3 ranks 0, 2, 1 (own 2: rank 2).
    recall = recall_from_similarity(similarity, owners, ks=(1, 2, 3))
    assert recall == pytest.approx(
        {
            "image_to_text_recall@1": 1 / 3,
            "image_to_text_recall@2": 1.0,
            "image_to_text_recall@3": 1.0,
            "text_to_image_recall@1": 2 / 4,
            "text_to_image_recall@2": 3 / 4,
            "text_to_image_recall@3": 1.0,
        }
    )


def test_recall_with_a_relevance_matrix():
    similarity = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.2, 0.6]])
    # Text 0 truly describes both images, text 1 image 0, text 2 image 1.
    relevant = torch.tensor([[True, True, False], [True, False, True]])
    recall = recall_from_similarity(similarity, ks=(1,), relevant=relevant)
    # Image 1's best text is 0, relevant; text 1's best image is 0, relevant; text 2's best is 1.
    assert recall == {"image_to_text_recall@1": 1.0, "text_to_image_recall@1": 1.0}
    # With exact pairs instead (text i for image i, first two texts), image 1's best text is not its own.
    exact = recall_from_similarity(similarity[:, :2], ks=(1,))
    assert exact["image_to_text_recall@1"] == 0.5
    with pytest.raises(ValueError, match="relevant"):
        recall_from_similarity(similarity, torch.tensor([0, 0, 1]), relevant=relevant)
    with pytest.raises(ValueError, match="relevant"):
        recall_from_similarity(similarity, relevant=torch.tensor([[True, True, False], [False, False, False]]))


def test_retrieval_recall_uses_cosine_and_defaults_to_one_caption_per_image():
    images = torch.randn(20, 8)
    texts = images + 0.3 * torch.randn(20, 8)
    recall = retrieval_recall(images * 5.0, texts, ks=(1, 5, 10))
    expected = recall_from_similarity(F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T, ks=(1, 5, 10))
    assert recall == pytest.approx(expected)
    perfect = retrieval_recall(images, images.clone(), ks=(1,))
    assert perfect == {"image_to_text_recall@1": 1.0, "text_to_image_recall@1": 1.0}


def test_retrieval_rejects_inconsistent_caption_owners():
    similarity = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="text_to_image"):
        recall_from_similarity(similarity)
    with pytest.raises(ValueError, match="text_to_image"):
        recall_from_similarity(similarity, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="text_to_image"):
        recall_from_similarity(similarity, torch.tensor([0, 0, 1, 1]))  # image 2 has no caption
    with pytest.raises(ValueError, match="image_features"):
        retrieval_recall(torch.zeros(3, 4), torch.zeros(3, 5))


# ---------------------------------------------------------------- fidelity


def test_fidelity_primitives_by_hand():
    cosine = paired_cosine(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0]]))
    assert cosine == pytest.approx({"mean": (1 + 1 / math.sqrt(2)) / 2, "min": 1 / math.sqrt(2)})
    reference, candidate = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    # p = (1/4, 3/4), q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2).
    assert similarity_kl(reference, candidate) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert similarity_kl(candidate, candidate) == 0.0
    assert top1_agreement(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])) == 0.5
    with pytest.raises(ValueError, match="reference_logits"):
        similarity_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_fidelity_of_a_model_to_itself_is_perfect(testbed):
    data = make_split("test", 64)
    report = compare_to_reference(
        testbed.model, testbed.model, testbed.tokenizer, data.loader(32), testbed.classnames[:12], testbed.templates[:2], progress=False
    )
    assert report["image_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert report["image_cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert report["text_cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert report["zero_shot_top1_agreement"] == 1.0
    assert report["similarity_kl"] == pytest.approx(0.0, abs=1e-9)
    assert report["logit_scale"] == pytest.approx(testbed.model.logit_scale.exp().item())
    assert (report["images"], report["texts"]) == (64, 24)


def test_fidelity_sees_a_perturbed_copy(testbed):
    data = make_split("test", 128)
    perturbed = copy.deepcopy(testbed.model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            # Relative to each tensor's own magnitude (std is undefined for the scalar logit_scale).
            parameter.add_(0.05 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    report = compare_to_reference(
        testbed.model, perturbed, testbed.tokenizer, data.loader(64), testbed.classnames, testbed.templates[:2], progress=False
    )
    assert 0.5 < report["image_cosine_mean"] < 0.9999
    assert report["image_cosine_min"] <= report["image_cosine_mean"]
    assert report["text_cosine_mean"] < 0.9999
    assert report["similarity_kl"] > 1e-4
    assert report["zero_shot_top1_agreement"] <= 1.0


def test_fidelity_rejects_one_shot_iterators(testbed):
    with pytest.raises(ValueError, match="image_batches"):
        compare_to_reference(
            testbed.model, testbed.model, testbed.tokenizer, iter([torch.zeros(1, 3, 32, 32)]), ["red circle"], ["a {}."], progress=False
        )


# ---------------------------------------------------------------- datasets on disk


def _save_scenes(root, data, classnames):
    from torchvision.transforms.functional import to_pil_image

    paths = []
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        folder = root / classnames[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        # Through uint8 so the PNG holds exactly the 8-bit values of the image.
        to_pil_image((image * 255).round().to(torch.uint8)).save(path)
        paths.append(path)
    return paths


def test_image_folder_zero_shot_equals_tensor_route(tmp_path, testbed, scenes_as_uint8):
    from torchvision.transforms import ToTensor

    data = scenes_as_uint8
    _save_scenes(tmp_path, data, testbed.classnames)
    folder = image_folder(tmp_path, ToTensor())
    # ImageFolder sorts folder names, so its labels index folder.classnames, not the test bed's order.
    assert folder.classnames == sorted(testbed.classnames[label] for label in set(data.labels.tolist()))
    by_folder = zero_shot_classifier(testbed.model, testbed.tokenizer, folder.classnames, testbed.templates, progress=False)
    from_disk = zero_shot_accuracy(testbed.model, by_folder, make_loader(folder.dataset, batch_size=40), progress=False)

    folder_label = {name: i for i, name in enumerate(folder.classnames)}
    relabelled = torch.tensor([folder_label[testbed.classnames[label]] for label in data.labels])
    in_memory = torch.utils.data.TensorDataset(data.images, relabelled)
    from_tensors = zero_shot_accuracy(testbed.model, by_folder, make_loader(in_memory, batch_size=40), progress=False)
    assert from_disk == pytest.approx(from_tensors)


def test_retrieval_csv_equals_tensor_route(tmp_path, testbed, scenes_as_uint8):
    from torchvision.transforms import ToTensor

    data = scenes_as_uint8
    paths = _save_scenes(tmp_path / "images", data, testbed.classnames)
    # Two captions for the first image, one for every other: exercises text_to_image.
    rows = [(paths[0], "a picture of a thing.")] + [(path, caption) for path, caption in zip(paths, data.captions)]
    csv_path = tmp_path / "pairs.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows((path.relative_to(tmp_path), caption) for path, caption in rows)

    from_csv = evaluate_retrieval_csv(testbed.model, testbed.tokenizer, ToTensor(), csv_path, batch_size=40, progress=False)
    owners = torch.tensor([0] + list(range(len(paths))))
    captions = [caption for _, caption in rows]
    from_tensors = evaluate_retrieval(testbed.model, testbed.tokenizer, [data.images], captions, owners, progress=False)
    assert from_csv == pytest.approx(from_tensors)
    assert from_csv["images"] == 96 and from_csv["texts"] == 97


def test_retrieval_csv_errors_name_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="csv_path"):
        read_retrieval_csv(tmp_path / "absent.csv")
    bad_column = tmp_path / "columns.csv"
    bad_column.write_text("filepath,title\nx.png,a cat\n")
    with pytest.raises(ValueError, match="image_column"):
        read_retrieval_csv(bad_column)
    missing_image = tmp_path / "missing.csv"
    missing_image.write_text("image,caption\nnot_here.png,a cat\n")
    with pytest.raises(FileNotFoundError, match="root="):
        read_retrieval_csv(missing_image)


def test_missing_datasets_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        cifar100(tmp_path, transform=None)
    with pytest.raises(FileNotFoundError, match="one sub-folder"):
        image_folder(tmp_path / "absent", transform=None)
    with pytest.raises(FileNotFoundError, match="one sub-folder"):
        image_folder(tmp_path, transform=None)


def test_shipped_prompt_lists():
    classnames = cifar100_classnames()
    # torchvision labels CIFAR-100 classes in alphabetical order of their names.
    assert len(classnames) == 100 == len(set(classnames)) and classnames == sorted(classnames)
    assert {"aquarium fish", "maple tree", "sweet pepper", "willow tree"} <= set(classnames)
    for templates, count in ((cifar100_templates(), 18), (imagenet_templates(), 80), (imagenet_templates(subset=True), 7)):
        assert len(templates) == count == len(set(templates))
        assert all(template.count("{}") == 1 for template in templates)
    assert set(imagenet_templates(subset=True)) <= set(imagenet_templates())


# ---------------------------------------------------------------- transformers CLIPModel


def test_transformers_clip_goes_through_the_same_functions():
    from transformers import CLIPConfig, CLIPModel

    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 40, "max_position_embeddings": 8, "bos_token_id": 38, "eos_token_id": 39},
        vision_config={**tower, "image_size": 16, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    wrapped = as_clip_like(model)
    assert isinstance(wrapped, HuggingFaceCLIP)

    def tokenizer(texts):
        # One id per character, in [1, 37], then the end token: enough to exercise the text tower.
        rows = [[1 + ord(c) % 37 for c in text[:6]] + [39] for text in texts]
        return torch.tensor([row + [0] * (8 - len(row)) for row in rows])

    images = torch.randn(6, 3, 16, 16)
    features = encode_images(model, [images[:4], images[4:]], progress=False).features
    with torch.no_grad():
        direct = model.get_image_features(pixel_values=images)
    direct = getattr(direct, "pooler_output", direct)
    torch.testing.assert_close(features, F.normalize(direct, dim=-1))
    report = compare_to_reference(model, model, tokenizer, [images], ["cat", "dog"], ["a {}."], progress=False)
    assert report["text_cosine_min"] == pytest.approx(1.0, abs=1e-6) and report["similarity_kl"] == pytest.approx(0.0, abs=1e-9)
