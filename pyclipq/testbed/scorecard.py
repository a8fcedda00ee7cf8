"""Every number the test bed reports for one model: zero-shot, retrieval and, given the fp32
reference, fidelity. One call per quantization format fills a row of the evidence table."""
from __future__ import annotations

import torch

from pyclipq.eval import compare_to_reference, encode_images, encode_texts, retrieval_recall
from pyclipq.eval import zero_shot_accuracy, zero_shot_classifier

from .captions import ZERO_SHOT_TEMPLATES
from .scenes import class_names
from .splits import make_split

TEST_SCENES = 10240
# Retrieval ranks every caption for every scene: 2048 x 2048 keeps that cheap.
RETRIEVAL_SCENES = 2048


def evaluate_on_testbed(
    model,
    tokenizer,
    *,
    reference=None,
    scenes: int = TEST_SCENES,
    retrieval_scenes: int = RETRIEVAL_SCENES,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    progress: bool = True,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 on the test split, recall@1/5/10 both ways, and fidelity to reference.

    Retrieval counts a caption as correct for every scene it truthfully describes
    (TestbedSplit.caption_matches): captions that leave out size or position fit many scenes.
    """
    if retrieval_scenes > scenes:
        raise ValueError(f"retrieval_scenes: at most scenes ({scenes}), got {retrieval_scenes}")
    data = make_split("test", scenes)
    classnames = class_names()
    classifier = zero_shot_classifier(
        model, tokenizer, classnames, ZERO_SHOT_TEMPLATES, device=device, batch_size=batch_size, progress=progress
    )
    accuracy = zero_shot_accuracy(model, classifier, data.loader(batch_size), device=device, progress=progress)
    report = {"zero_shot_top1": accuracy["top1"], "zero_shot_top5": accuracy["top5"], "scenes": accuracy["n"]}

    pairs = make_split("test", retrieval_scenes)
    image_features = encode_images(model, pairs.loader(batch_size), device=device, progress=progress).features
    text_features = encode_texts(model, tokenizer, pairs.captions, device=device, batch_size=batch_size, progress=progress)
    report.update(retrieval_recall(image_features, text_features, relevant=pairs.caption_matches()))

    if reference is not None:
        fidelity = compare_to_reference(
            reference,
            model,
            tokenizer,
            data.loader(batch_size),
            classnames,
            ZERO_SHOT_TEMPLATES,
            device=device,
            batch_size=batch_size,
            progress=progress,
        )
        report.update({key: value for key, value in fidelity.items() if key not in ("images", "texts")})
    return report
