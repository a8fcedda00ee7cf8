"""Feeding calibration batches: the quantized layers of a model, the passes over the batches, and
how a batch goes through a CLIP (images, tokens or both)."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..nn import QuantLinear


class StopForward(Exception):
    """Raised by a hook once every layer a GPTQ chunk needs has seen this batch."""


def quant_linears(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and not module.layer.is_float:
            yield name, module


def check_model(model, needs_static: bool = True) -> list:
    """The quantized linears of a converted model; with `needs_static`, at least one must be static."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module converted by pyclipq.convert, got {type(model).__name__}")
    linears = list(quant_linears(model))
    if not linears:
        raise ValueError("model has no quantized pyclipq QuantLinear (it was not converted with static activations or "
                         "any other mode): convert it with pyclipq.convert first")
    static = [(n, m) for n, m in linears if m.layer.activation == "static"]
    if needs_static and not static:
        modes = sorted({m.layer.activation for _, m in linears})
        found = f"its quantized linears use activation {modes}" if linears else "it has no pyclipq QuantLinear"
        raise ValueError(
            "model was not converted with static activations "
            f"({found}): convert it with pyclipq.convert(model, QuantConfig(<format>, activation='static')) first, "
            "or ask for a weight-side method (gptq, clip_search, weight_observer, smooth)"
        )
    return linears


def batch_passes(batches, num_batches: int):
    """A function returning an iterator over the (at most num_batches) calibration batches, once per pass."""
    if isinstance(batches, (torch.Tensor, Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise ValueError(
            "batches must be an iterable of batches (a list or DataLoader of image tensors, token-id tensors, "
            f"(images, token_ids) pairs or dicts of model inputs), got {type(batches).__name__}"
        )
    if iter(batches) is batches:
        # A one-shot iterator (a generator) can be read once: keep the batches for later passes.
        kept = list(itertools.islice(batches, num_batches))
        source = lambda: iter(kept)  # noqa: E731
    else:
        source = lambda: itertools.islice(iter(batches), num_batches)  # noqa: E731
    if next(source(), None) is None:
        raise ValueError("batches: got no calibration batches (an empty iterable); calibration needs at least one")
    return source


def _device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _is_tokens(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dim() >= 1


def _encode(model, kind: str, x):
    if kind == "image":
        for method, keyword in (("encode_image", None), ("get_image_features", "pixel_values")):
            if callable(getattr(model, method, None)):
                return getattr(model, method)(x) if keyword is None else getattr(model, method)(**{keyword: x})
    else:
        for method, keyword in (("encode_text", None), ("get_text_features", "input_ids")):
            if callable(getattr(model, method, None)):
                return getattr(model, method)(x) if keyword is None else getattr(model, method)(**{keyword: x})
    return model(x)


def default_forward(model: nn.Module, batch) -> None:
    """Run one calibration batch through a CLIP-like model (or any model).

    - a float tensor: images -> ``encode_image`` / ``get_image_features`` / ``model(x)``;
    - an integer tensor: token ids -> ``encode_text`` / ``get_text_features`` / ``model(x)``;
    - a tuple / list: its float tensor is the images, an integer tensor of >= 2 dims the token
      ids, and a 1-D integer tensor (labels, as DataLoaders give) is ignored;
    - a dict: ``model(**batch)``.
    """
    device = _device(model)
    if isinstance(batch, Mapping):  # a dict, or a tokenizer's BatchEncoding
        model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point():
            _encode(model, "image", batch.to(device))
        elif _is_tokens(batch):
            _encode(model, "text", batch.to(device))
        else:
            raise ValueError(f"batches: a tensor batch must be float images or integer token ids, got {batch.dtype}")
        return
    if isinstance(batch, (tuple, list)):
        images = [t for t in batch if isinstance(t, torch.Tensor) and t.is_floating_point()]
        tokens = [t for t in batch if _is_tokens(t) and t.dim() >= 2]
        if any(isinstance(t, str) for t in batch) or any(
            isinstance(t, (list, tuple)) and t and isinstance(t[0], str) for t in batch
        ):
            raise ValueError("batches: texts must be token ids (tokenize them first), got strings")
        if not images and not tokens:
            raise ValueError("batches: a tuple batch needs an image tensor and/or a 2-D token-id tensor")
        for t in images[:1]:
            _encode(model, "image", t.to(device))
        for t in tokens[:1]:
            _encode(model, "text", t.to(device))
        return
    raise ValueError(
        f"batches: each batch must be a tensor, an (images, token_ids) tuple or a dict, got {type(batch).__name__}"
    )
