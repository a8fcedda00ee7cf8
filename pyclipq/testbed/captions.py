"""Captions for test-bed scenes, and the prompt templates for zero-shot classification on them.

Training captions mention size and position only some of the time, so a caption without them
(which is what a zero-shot prompt is) is in the training distribution. Which details a caption
mentions is returned too: the training loss needs it to know which images a caption truthfully
describes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .scenes import COLOR_NAMES, HORIZONTAL, SHAPES, SIZE_NAMES, VERTICAL, SceneAttributes

# {size} expands to "small " / "large " or nothing, {where} to " in the top left" or nothing.
CAPTION_TEMPLATES = (
    "a photo of a {size}{color} {shape}{where}.",
    "a picture of a {size}{color} {shape}{where}.",
    "a {size}{color} {shape}{where}.",
    "there is a {size}{color} {shape}{where}.",
    "a rendering of a {size}{color} {shape}{where}.",
    "a {size}{color} {shape} on a noisy background.",
    "a {size}{shape} that is {color}{where}.",
)

# Zero-shot prompts: each is a caption template with size and position left out.
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "there is a {}.",
    "a rendering of a {}.",
    "a {} on a noisy background.",
)

# Probability that a caption mentions the size, and separately the position.
MENTION_PROBABILITY = 0.5


@dataclass
class CaptionBatch:
    texts: list[str]
    mentions_size: torch.Tensor  # bool, one per caption
    mentions_position: torch.Tensor  # bool, one per caption


def position_phrase(column: int, row: int) -> str:
    """"top left", "middle", "bottom middle"...: the centre cell is just "middle"."""
    if column == 1 and row == 1:
        return "middle"
    if row == 1:
        return f"middle {HORIZONTAL[column]}"
    if column == 1:
        return f"{VERTICAL[row]} middle"
    return f"{VERTICAL[row]} {HORIZONTAL[column]}"


def write_captions(attributes: SceneAttributes, generator: torch.Generator) -> CaptionBatch:
    n = attributes.color.shape[0]
    template = torch.randint(len(CAPTION_TEMPLATES), (n,), generator=generator)
    mentions_size = torch.rand(n, generator=generator) < MENTION_PROBABILITY
    mentions_position = torch.rand(n, generator=generator) < MENTION_PROBABILITY
    texts = []
    for i in range(n):
        chosen = CAPTION_TEMPLATES[int(template[i])]
        # The "noisy background" template has no slot for a position, so it never mentions one.
        if "{where}" not in chosen:
            mentions_position[i] = False
        size = f"{SIZE_NAMES[int(attributes.size[i])]} " if mentions_size[i] else ""
        where = ""
        if mentions_position[i]:
            where = f" in the {position_phrase(int(attributes.column[i]), int(attributes.row[i]))}"
        texts.append(
            chosen.format(
                size=size,
                color=COLOR_NAMES[int(attributes.color[i])],
                shape=SHAPES[int(attributes.shape[i])],
                where=where,
            )
        )
    return CaptionBatch(texts=texts, mentions_size=mentions_size, mentions_position=mentions_position)


def caption_vocabulary() -> list[str]:
    """Every word the captions and zero-shot prompts can contain, in a fixed order."""
    words: list[str] = []
    for template in CAPTION_TEMPLATES + ZERO_SHOT_TEMPLATES:
        filled = template.replace("{size}", "").replace("{color}", "").replace("{shape}", "")
        filled = filled.replace("{where}", " in the").replace("{}", "")
        words.extend(filled.replace(".", " . ").split())
    words.extend(SIZE_NAMES + COLOR_NAMES + SHAPES + HORIZONTAL + VERTICAL)
    return list(dict.fromkeys(words))
