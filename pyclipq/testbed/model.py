"""The test-bed CLIP: open_clip's own CLIP class at a tiny size, plus loading the shipped weights.

open_clip's default blocks keep nn.MultiheadAttention with a packed in_proj, the hardest module
for conversion to handle, which is why this implementation was chosen over the others.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import open_clip
import torch
from safetensors.torch import load_file, save_file

from . import captions, scenes
from .splits import TestbedSplit, make_split
from .tokenizer import WordTokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "testbed.safetensors"
METADATA_FILE = "testbed.json"


@dataclass
class TestbedConfig:
    __test__ = False  # not a pytest test class, despite the name
    embed_dim: int = 128
    image_size: int = scenes.IMAGE_SIZE
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 6
    vision_head_width: int = 32
    vision_pool: str = "tok"
    text_width: int = 128
    text_layers: int = 1
    text_heads: int = 4
    context_length: int = 16
    vocabulary: list[str] = field(default_factory=captions.caption_vocabulary)

    def tokenizer(self) -> WordTokenizer:
        return WordTokenizer(self.vocabulary, self.context_length)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer().vocab_size


def build_model(config: TestbedConfig) -> open_clip.model.CLIP:
    """A randomly initialised open_clip CLIP with the test bed's architecture."""
    vision_cfg = {
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "width": config.vision_width,
        "layers": config.vision_layers,
        "head_width": config.vision_head_width,
        "pool_type": config.vision_pool,
    }
    text_cfg = {
        "context_length": config.context_length,
        "vocab_size": config.vocab_size,
        "width": config.text_width,
        "heads": config.text_heads,
        "layers": config.text_layers,
    }
    return open_clip.model.CLIP(embed_dim=config.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)


@dataclass
class Testbed:
    """The trained test-bed CLIP and everything needed to evaluate it."""

    __test__ = False  # not a pytest test class, despite the name

    model: open_clip.model.CLIP
    tokenizer: WordTokenizer
    config: TestbedConfig
    metadata: dict
    classnames: list[str] = field(default_factory=scenes.class_names)
    templates: tuple[str, ...] = captions.ZERO_SHOT_TEMPLATES

    def split(self, split: str, n: int) -> TestbedSplit:
        return make_split(split, n)


def save_testbed(model: open_clip.model.CLIP, config: TestbedConfig, metadata: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    # Tied or shared storage is not expected in open_clip's CLIP, but contiguous copies make
    # safetensors accept any view.
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    document = {"config": asdict(config), **metadata}
    (directory / METADATA_FILE).write_text(json.dumps(document, indent=2) + "\n")


def load_testbed(directory: str | Path | None = None, device: str | torch.device = "cpu") -> Testbed:
    """Load the shipped test-bed CLIP (or one saved by `python -m pyclipq.cli.testbed_train`) in eval mode."""
    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    weights_path, metadata_path = directory / WEIGHTS_FILE, directory / METADATA_FILE
    for path in (weights_path, metadata_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"directory: {path} not found. Pass the folder holding {WEIGHTS_FILE} and {METADATA_FILE}, "
                "or recreate the shipped weights with `python -m pyclipq.cli.testbed_train`."
            )
    metadata = json.loads(metadata_path.read_text())
    if "config" not in metadata:
        raise ValueError(f"directory: {metadata_path} has no 'config' entry; it was not written by pyclipq.cli.testbed_train")
    config = TestbedConfig(**metadata.pop("config"))
    model = build_model(config)
    model.load_state_dict(load_file(str(weights_path)))
    model.to(device).eval()
    return Testbed(model=model, tokenizer=config.tokenizer(), config=config, metadata=metadata)
