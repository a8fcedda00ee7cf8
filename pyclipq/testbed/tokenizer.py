"""A word-level tokenizer for the test bed's captions.

open_clip's BPE tokenizer would work offline, but its 49408-entry embedding table alone would
be 25 MB at width 128, ten times the rest of the test-bed model. Captions here use a few dozen
words, so a word-level vocabulary keeps the shipped weights at a few MB.

It follows the CLIP conventions open_clip's text tower relies on: padding id 0, a start token,
and an end token with the highest id, because open_clip pools the text features at
argmax(token id) (the "argmax" text pool type).
"""
from __future__ import annotations

import re

import torch

PAD_ID = 0
UNKNOWN_ID = 1
_FIRST_WORD_ID = 2
_TOKEN_PATTERN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordTokenizer:
    """Callable like open_clip's tokenizers: texts -> LongTensor (len(texts), context_length)."""

    def __init__(self, words: list[str], context_length: int):
        if len(set(words)) != len(words):
            raise ValueError("words: the vocabulary has duplicate entries")
        if context_length < 3:
            raise ValueError(f"context_length: need room for start, one word and end tokens, got {context_length}")
        self.words = list(words)
        self.context_length = context_length
        self.word_to_id = {word: _FIRST_WORD_ID + i for i, word in enumerate(self.words)}
        self.start_id = _FIRST_WORD_ID + len(self.words)
        self.end_id = self.start_id + 1
        self.vocab_size = self.end_id + 1

    def encode(self, text: str) -> list[int]:
        """Word ids of one text, without start/end tokens; unknown words map to UNKNOWN_ID."""
        return [self.word_to_id.get(token, UNKNOWN_ID) for token in _TOKEN_PATTERN.findall(text.lower())]

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        tokens = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            # Like open_clip, an over-long text is cut and still ends with the end token.
            ids = [self.start_id] + self.encode(text)[: self.context_length - 2] + [self.end_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens
