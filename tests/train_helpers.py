"""Tiny open_clip CLIPs and data for the training tests (fast on 2 CPU cores)."""
from __future__ import annotations

import open_clip
import torch

from pyclipq.testbed import WordTokenizer

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "star", ".", "big"]
CLASSNAMES = ["red circle", "blue square", "green star", "big red square"]
CONTEXT = 12


def tiny_tokenizer() -> WordTokenizer:
    return WordTokenizer(WORDS, CONTEXT)


def tiny_clip(seed: int = 0, layers: int = 1) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": layers, "head_width": 16},
        text_cfg={"context_length": CONTEXT, "vocab_size": tiny_tokenizer().vocab_size, "width": 32, "heads": 2,
                  "layers": layers},
    )


def tiny_batch(n: int, seed: int = 0):
    """(images, token ids) of random pixels and random real captions."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=g)
    names = [CLASSNAMES[int(i)] for i in torch.randint(len(CLASSNAMES), (n,), generator=g)]
    return images, tiny_tokenizer()([f"a photo of a {name}." for name in names])


def class_data(batches: int, batch_size: int, seed: int = 0):
    """A learnable toy task: each class is an image whose mean colour channel says the class."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        labels = torch.randint(len(CLASSNAMES), (batch_size,), generator=g)
        images = torch.rand(batch_size, 3, 16, 16, generator=g) * 0.3
        for i, label in enumerate(labels.tolist()):
            images[i, label % 3] += 0.6
            if label == 3:
                images[i, :, :8] += 0.3
        out.append((images, labels))
    return out


def single_thread():
    """Generator for an autouse fixture: these models are tiny, so per-op overhead dominates and
    extra intra-op threads only add synchronisation (15x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
