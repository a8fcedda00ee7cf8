"""OpenAI's published zero-shot prompts, shipped as JSON in pyclipq/eval/data."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

_DATA = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=None)
def _read(name: str) -> dict:
    return json.loads((_DATA / name).read_text(encoding="utf-8"))


def cifar100_classnames() -> list[str]:
    """The 100 CIFAR-100 class names in label order ("aquarium fish", not "aquarium_fish")."""
    return list(_read("cifar100.json")["classnames"])


def cifar100_templates() -> list[str]:
    """OpenAI's 18 CIFAR-100 prompt templates."""
    return list(_read("cifar100.json")["templates"])


def imagenet_templates(subset: bool = False) -> list[str]:
    """OpenAI's 80 ImageNet prompt templates, or with subset=True the 7 they found to do as well."""
    return list(_read("imagenet_templates.json")["templates_7" if subset else "templates"])
