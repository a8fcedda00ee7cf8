"""Evaluation of CLIP-like models: zero-shot classification, retrieval, and fidelity to an fp32 reference.

One set of functions serves the test bed, the benchmarks and `pyclipq eval`. A model is anything
with encode_image / encode_text (open_clip, OpenAI clip, pyclipq-converted models) or a
transformers CLIPModel; a tokenizer is any callable list[str] -> LongTensor of token ids.
Every function batches, shows a tqdm bar unless progress=False, and runs on the given device.
"""
from .datasets import (
    LabelledImages,
    RetrievalPairs,
    cifar100,
    image_folder,
    image_path_loader,
    make_loader,
    read_retrieval_csv,
)
from .encode import HuggingFaceCLIP, ImageFeatures, as_clip_like, encode_images, encode_texts
from .fidelity import compare_to_reference, model_logit_scale, paired_cosine, similarity_kl, top1_agreement
from .prompts import cifar100_classnames, cifar100_templates, imagenet_templates
from .retrieval import evaluate_retrieval, evaluate_retrieval_csv, recall_from_similarity, retrieval_recall
from .zero_shot import topk_accuracy, zero_shot_accuracy, zero_shot_classifier

__all__ = [
    "HuggingFaceCLIP",
    "ImageFeatures",
    "LabelledImages",
    "RetrievalPairs",
    "as_clip_like",
    "cifar100",
    "cifar100_classnames",
    "cifar100_templates",
    "compare_to_reference",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_retrieval_csv",
    "image_folder",
    "image_path_loader",
    "imagenet_templates",
    "make_loader",
    "model_logit_scale",
    "paired_cosine",
    "read_retrieval_csv",
    "recall_from_similarity",
    "retrieval_recall",
    "similarity_kl",
    "top1_agreement",
    "topk_accuracy",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
