"""Image-text retrieval: recall@k in both directions, from features or from a CSV of (image, caption) rows."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from .datasets import RetrievalPairs, image_path_loader, read_retrieval_csv
from .encode import encode_images, encode_texts

# Similarity rows are ranked this many at a time, so 25k captions x 5k images stays in memory.
_ROWS_PER_CHUNK = 1024


def caption_owners(text_to_image: torch.Tensor | None, num_images: int, num_texts: int) -> torch.Tensor:
    """Validated (num_texts,) index of the image each caption describes; one caption per image by default."""
    if text_to_image is None:
        if num_texts != num_images:
            raise ValueError(
                f"text_to_image: needed when the number of texts ({num_texts}) differs from the number of images ({num_images})"
            )
        return torch.arange(num_images)
    text_to_image = torch.as_tensor(text_to_image).long().cpu()
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image: expected shape ({num_texts},), one image index per text, got {tuple(text_to_image.shape)}")
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image: image indices must lie in [0, {num_images})")
    captioned = torch.zeros(num_images, dtype=torch.bool)
    captioned[text_to_image] = True
    if not captioned.all():
        missing = torch.nonzero(~captioned).flatten()[:5].tolist()
        raise ValueError(f"text_to_image: every image needs at least one caption; images {missing} have none")
    return text_to_image


def recall_from_similarity(
    similarity: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    relevant: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@k from an (images, texts) similarity matrix.

    image_to_text_recall@k: fraction of images with at least one of their captions among the k
    most similar texts. text_to_image_recall@k: fraction of texts with one of their images among
    the k most similar images. k above the candidate count counts every candidate.

    Which caption belongs to which image comes from text_to_image (one image per caption, by
    default caption i for image i) or, where one caption can truly describe several images (as on
    the test bed), from relevant: an (images, texts) bool matrix.
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity: expected an (images, texts) matrix, got shape {tuple(similarity.shape)}")
    if not ks or any(k <= 0 for k in ks):
        raise ValueError(f"ks: expected positive k values, got {tuple(ks)}")
    num_images, num_texts = similarity.shape
    if relevant is not None:
        if text_to_image is not None:
            raise ValueError("relevant: pass either text_to_image or relevant, not both")
        relevant = _checked_relevance(relevant, num_images, num_texts)

        def is_relevant(image_ids, text_ids):
            return relevant[image_ids, text_ids]

    else:
        owners = caption_owners(text_to_image, num_images, num_texts)

        def is_relevant(image_ids, text_ids):
            return owners[text_ids] == image_ids

    similarity = similarity.float().cpu()
    largest = max(ks)

    image_hits = []
    for start in range(0, num_images, _ROWS_PER_CHUNK):
        rows = similarity[start : start + _ROWS_PER_CHUNK]
        top_texts = rows.topk(min(largest, num_texts), dim=1).indices
        image_ids = torch.arange(start, start + rows.shape[0])[:, None].expand_as(top_texts)
        image_hits.append(is_relevant(image_ids, top_texts))
    image_hits = torch.cat(image_hits)

    text_hits = []
    for start in range(0, num_texts, _ROWS_PER_CHUNK):
        columns = similarity[:, start : start + _ROWS_PER_CHUNK].T
        top_images = columns.topk(min(largest, num_images), dim=1).indices
        text_ids = torch.arange(start, start + columns.shape[0])[:, None].expand_as(top_images)
        text_hits.append(is_relevant(top_images, text_ids))
    text_hits = torch.cat(text_hits)

    recalls = {}
    for k in ks:
        recalls[f"image_to_text_recall@{k}"] = image_hits[:, :k].any(dim=1).float().mean().item()
        recalls[f"text_to_image_recall@{k}"] = text_hits[:, :k].any(dim=1).float().mean().item()
    return recalls


def _checked_relevance(relevant: torch.Tensor, num_images: int, num_texts: int) -> torch.Tensor:
    relevant = torch.as_tensor(relevant).bool().cpu()
    if relevant.shape != (num_images, num_texts):
        raise ValueError(f"relevant: expected an ({num_images}, {num_texts}) bool matrix, got {tuple(relevant.shape)}")
    if not relevant.any(dim=1).all() or not relevant.any(dim=0).all():
        raise ValueError("relevant: every image needs a relevant text and every text a relevant image")
    return relevant


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    *,
    relevant: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall@k from image and text features (cosine similarity; features need not be normalized)."""
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(
            "image_features, text_features: expected (n_images, d) and (n_texts, d), "
            f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    similarity = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    return recall_from_similarity(similarity, text_to_image, ks, relevant=relevant)


def evaluate_retrieval(
    model,
    tokenizer,
    image_batches: Iterable,
    captions: Sequence[str],
    text_to_image: torch.Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> dict[str, float]:
    """Encode images (in batch order) and captions with the model, then recall@k both ways."""
    images = encode_images(model, image_batches, device=device, progress=progress)
    texts = encode_texts(model, tokenizer, captions, device=device, batch_size=batch_size, progress=progress)
    return {
        **retrieval_recall(images.features, texts, text_to_image, ks),
        "images": images.features.shape[0],
        "texts": texts.shape[0],
    }


def evaluate_retrieval_csv(
    model,
    tokenizer,
    preprocess,
    csv_path,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    root=None,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> dict[str, float]:
    """Recall@k over a CSV of image paths and captions; an image on several rows has several captions."""
    pairs: RetrievalPairs = read_retrieval_csv(csv_path, image_column=image_column, caption_column=caption_column, root=root)
    loader = image_path_loader(pairs.image_paths, preprocess, batch_size=batch_size, num_workers=num_workers)
    return evaluate_retrieval(
        model,
        tokenizer,
        loader,
        pairs.captions,
        pairs.text_to_image,
        device=device,
        batch_size=batch_size,
        ks=ks,
        progress=progress,
    )
