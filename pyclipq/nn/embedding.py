"""QuantEmbedding: an embedding table whose rows are stored in a pyclipq format."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import LayerConfig
from .packed import PackedWeight, dequantize_packed


class QuantEmbedding(PackedWeight):
    """A lookup table [num_embeddings, embedding_dim], one packed row per token.

    A lookup gathers the packed rows of the requested ids and dequantizes only
    those, so the table stays packed in memory. Weight-only by nature: the
    layer config's activation mode is "none".
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, layer: LayerConfig, dtype=None, device=None):
        super().__init__(num_embeddings, embedding_dim, layer.weight_only(), dtype=dtype, device=device)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    @classmethod
    def from_float(cls, embedding: nn.Embedding, layer: LayerConfig) -> "QuantEmbedding":
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"embedding must be a torch.nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None:
            # max_norm renormalizes the float table in place on lookup: it has no packed meaning.
            # (padding_idx only shapes gradients, so a frozen packed table serves it unchanged.)
            raise ValueError(f"QuantEmbedding cannot quantize an embedding with max_norm={embedding.max_norm}")
        weight = embedding.weight
        module = cls(weight.shape[0], weight.shape[1], layer=layer, dtype=weight.dtype, device=weight.device)
        module.load_float_weight(weight)
        return module

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.layer.is_float:
            return F.embedding(ids, self.weight)
        flat = ids.reshape(-1)
        rows = dequantize_packed(
            self.packed_weight.index_select(0, flat),
            self.weight_scale.index_select(0, flat),
            self.layer.format,
            self.in_features,
            self.float_dtype,
        )
        return rows.reshape(*ids.shape, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._layer_repr()}"
