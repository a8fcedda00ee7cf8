"""`pyclipq eval`: load a model, optionally quantize it (or load a pyclipq checkpoint), and
evaluate it with pyclipq.eval on the test bed, an ImageFolder, CIFAR-100 or a retrieval CSV,
with fidelity against the fp32 model whenever a quantized model is evaluated."""
from __future__ import annotations

import copy
import os

import torch

import pyclipq

from .. import eval as ev
from ..testbed import ZERO_SHOT_TEMPLATES, class_names, make_split
from .loading import LoadedModel, load_model

DATASET_KINDS = ("testbed", "imagefolder", "cifar100", "retrieval")


def parse_dataset(spec: str) -> tuple[str, str | None]:
    kind, _, path = spec.partition(":")
    if kind not in DATASET_KINDS:
        raise ValueError(f"--dataset must be one of testbed, imagefolder:DIR, cifar100:ROOT, retrieval:CSV; got {spec!r}")
    if kind != "testbed" and not path:
        raise ValueError(f"--dataset {kind} needs a path: {kind}:PATH")
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"--dataset path not found: {path}")
    return kind, path or None


def quantized_model(loaded: LoadedModel, fmt: str | None, checkpoint: str | None) -> torch.nn.Module | None:
    if fmt and checkpoint:
        raise ValueError("give either --format (convert now) or --quantized (a saved checkpoint), not both")
    if checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"--quantized checkpoint not found: {checkpoint}")
        return pyclipq.load(checkpoint, copy.deepcopy(loaded.model)).eval()
    if fmt:
        return pyclipq.convert(copy.deepcopy(loaded.model), fmt).eval()
    return None


def labelled_images(loaded: LoadedModel, kind: str, path: str | None, limit: int | None):
    """(list of (images, labels) batches or loader, classnames, templates)."""
    if kind == "testbed":
        data = make_split("test", limit or 2048)
        batches = [(data.images[i:i + 256], data.labels[i:i + 256]) for i in range(0, len(data), 256)]
        return batches, class_names(), list(ZERO_SHOT_TEMPLATES)
    if loaded.preprocess is None:
        raise ValueError(f"model {loaded.label} has no image preprocessing for {kind} datasets")
    if kind == "imagefolder":
        labelled, templates = ev.image_folder(path, loaded.preprocess), ev.imagenet_templates()
    else:
        labelled, templates = ev.cifar100(path, loaded.preprocess), ev.cifar100_templates()
    dataset = labelled.dataset
    if limit:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return list(ev.make_loader(dataset, batch_size=64)), labelled.classnames, templates


def run_eval(args) -> dict:
    loaded = load_model(args.model, args.pretrained)
    kind, path = parse_dataset(args.dataset)
    candidate = quantized_model(loaded, args.format, args.quantized)
    model = candidate if candidate is not None else loaded.model
    progress = not args.no_progress and not args.json
    common = {"device": args.device, "progress": progress}
    report: dict = {"model": loaded.label, "dataset": args.dataset,
                    "quantized": args.format or args.quantized or None}
    with torch.inference_mode():
        if kind == "retrieval":
            report["retrieval"] = ev.evaluate_retrieval_csv(model, loaded.tokenize, loaded.preprocess, path,
                                                            batch_size=args.batch_size, **common)
        else:
            batches, classnames, templates = labelled_images(loaded, kind, path, args.limit)
            classifier = ev.zero_shot_classifier(model, loaded.tokenize, classnames, templates,
                                                 batch_size=args.batch_size, **common)
            report["zero_shot"] = ev.zero_shot_accuracy(model, classifier, batches, **common)
            if candidate is not None:
                report["fidelity"] = ev.compare_to_reference(loaded.model, candidate, loaded.tokenize, batches,
                                                             classnames, templates, batch_size=args.batch_size,
                                                             **common)
    lines = [f"{report['model']} on {report['dataset']}" + (f" ({report['quantized']})" if report["quantized"] else "")]
    for section in ("zero_shot", "retrieval", "fidelity"):
        if section in report:
            lines.append(f"  {section}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in report[section].items()))
    report["_text"] = "\n".join(lines)
    return report
