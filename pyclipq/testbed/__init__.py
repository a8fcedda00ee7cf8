"""The accuracy test bed: a tiny open_clip CLIP trained in-repo on procedurally generated scenes.

Real CLIP weights cannot be downloaded on the machines this project is built on, and random
weights have none of the structure (outliers, an aligned image-text space) that makes low-bit
quantization hard. `load_testbed()` gives a trained CLIP small enough to ship; `make_split`
renders its deterministic train / val / test scenes.
"""
from .captions import ZERO_SHOT_TEMPLATES
from .scorecard import evaluate_on_testbed
from .model import Testbed, TestbedConfig, build_model, load_testbed
from .scenes import NUM_CLASSES, class_names
from .splits import TestbedSplit, make_split
from .tokenizer import WordTokenizer

__all__ = [
    "NUM_CLASSES",
    "Testbed",
    "TestbedConfig",
    "TestbedSplit",
    "WordTokenizer",
    "ZERO_SHOT_TEMPLATES",
    "build_model",
    "evaluate_on_testbed",
    "class_names",
    "load_testbed",
    "make_split",
]
