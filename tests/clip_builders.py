"""Small random-weight CLIP models from each implementation's own code (no downloads), for the tests."""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

IMAGE_SIZE = 32
CONTEXT = 16
VOCAB = 100


def openai_clip_module():
    """clip.model from clip-anytorch.

    clip/__init__ imports pkg_resources, which setuptools >= 81 no longer ships; the
    model classes need none of it, so when that import fails clip/model.py is loaded
    on its own (still as module "clip.model", the name the OpenAI adapter matches).
    """
    try:
        import clip.model

        return clip.model
    except ModuleNotFoundError as e:
        if e.name != "pkg_resources":
            raise
    if "clip.model" in sys.modules:
        return sys.modules["clip.model"]
    package = importlib.util.find_spec("clip")
    spec = importlib.util.spec_from_file_location("clip.model", os.path.join(os.path.dirname(package.origin), "model.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["clip.model"] = module
    spec.loader.exec_module(module)
    return module


def small_open_clip(seed: int = 0, custom_text: bool = False, vocab_size: int = VOCAB, context_length: int = CONTEXT, **block):
    """open_clip CLIP (or CustomTextCLIP); `block` sets custom-attention options on both towers."""
    import open_clip.model as ocm

    torch.manual_seed(seed)
    vision = ocm.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=IMAGE_SIZE, **block)
    text = ocm.CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=64, heads=2, layers=2, **block)
    cls = ocm.CustomTextCLIP if custom_text else ocm.CLIP
    return cls(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()


def small_hf_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                         bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=32,
    )
    return CLIPModel(config).eval()


def small_openai_clip(seed: int = 0):
    module = openai_clip_module()
    torch.manual_seed(seed)
    model = module.CLIP(
        embed_dim=32, image_resolution=IMAGE_SIZE, vision_layers=2, vision_width=64, vision_patch_size=8,
        context_length=CONTEXT, vocab_size=VOCAB, transformer_width=64, transformer_heads=2, transformer_layers=2,
    )
    return model.eval()


def sample_inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    # Token 0 is padding for open_clip; the largest id marks end-of-text for argmax pooling.
    tokens = torch.randint(1, VOCAB - 1, (batch, CONTEXT), generator=g)
    tokens[:, -3] = VOCAB - 1
    tokens[:, -2:] = 0
    return images, tokens


def encode(model, images, tokens):
    """(image embeddings, text embeddings) through each implementation's own API."""
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            image = model.get_image_features(pixel_values=images)
            text = model.get_text_features(input_ids=tokens)
            # transformers 5 may return model outputs; the projected embeddings are the pooler output.
            image = getattr(image, "pooler_output", image)
            text = getattr(text, "pooler_output", text)
            return image, text
        return model.encode_image(images), model.encode_text(tokens)


BUILDERS = {"open_clip": small_open_clip, "hf": small_hf_clip, "openai": small_openai_clip}
