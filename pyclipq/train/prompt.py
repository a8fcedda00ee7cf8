"""A CoOp-style prompt learner for open_clip CLIP text towers (P4Q's learnable prompt).

Each class prompt is ``[SOT] [p]_1 ... [p]_M [CLASS] . [EOT]``: M context vectors
shared by every class replace word embeddings, the class name's own token embeddings
follow (class token at the end; "front" and "middle" are the other placements CoOp
and P4Q describe). The text tower then runs on these embeddings exactly as
``encode_text`` runs on looked-up tokens (``encode_text_embeddings``).
"""
from __future__ import annotations

import torch
from torch import nn

POSITIONS = ("end", "front", "middle")
_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")


def check_open_clip_text(model: nn.Module, argument: str = "model") -> None:
    missing = [name for name in _TEXT_PARTS if not hasattr(model, name)]
    if missing:
        raise ValueError(
            f"{argument}: the prompt learner needs an open_clip CLIP text tower ({', '.join(_TEXT_PARTS)}); "
            f"{type(model).__name__} lacks {missing}"
        )


def encode_text_embeddings(model: nn.Module, embeddings: torch.Tensor, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's CLIP.encode_text from token *embeddings* [B, L, D] instead of ids.

    token_ids [B, L] serve the pooling only (open_clip pools at argmax id, the EOT).
    With embeddings = model.token_embedding(ids) this equals model.encode_text(ids).
    """
    from open_clip.transformer import text_global_pool

    check_open_clip_text(model)
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    pooled = text_global_pool(x, token_ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(pooled, tuple):  # older open_clip returns (pooled, tokens)
        pooled = pooled[0]
    projection = model.text_projection
    if projection is not None:
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
    return nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def _body(tokenizer, text: str, context_length: int) -> list[int]:
    """The ids between SOT and EOT of `text` (EOT = the row's largest id, open_clip's convention)."""
    ids = tokenizer([text])[0]
    if ids.shape[0] != context_length:
        raise ValueError(f"tokenizer: expected rows of context_length {context_length}, got {ids.shape[0]}")
    eot = int(ids.argmax())
    return ids[1:eot].tolist()


class PromptLearner(nn.Module):
    """M learnable context vectors shared by all classes, and the class prompts built from them.

    model: an open_clip CLIP (its token embedding and context length are read once;
    the class names' embeddings are stored as fixed buffers). tokenizer: the model's
    (texts -> [n, context_length] ids). ctx_init: None = N(0, 0.02) vectors (CoOp's
    generic context), or a phrase with exactly n_ctx tokens ("a photo of a") whose
    word embeddings start the context.
    """

    def __init__(self, model: nn.Module, tokenizer, classnames, n_ctx: int = 16, position: str = "end", ctx_init: str | None = None):
        super().__init__()
        check_open_clip_text(model)
        if isinstance(classnames, str) or not classnames:
            raise ValueError("classnames must be a non-empty sequence of class names")
        if not isinstance(n_ctx, int) or n_ctx < 1:
            raise ValueError(f"n_ctx must be an int >= 1, got {n_ctx!r}")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {list(POSITIONS)}, got {position!r}")
        if not callable(tokenizer):
            raise ValueError(f"tokenizer must be callable (texts -> token ids), got {type(tokenizer).__name__}")
        self.classnames = list(classnames)
        self.n_ctx = n_ctx
        self.position = position
        length = model.positional_embedding.shape[0]
        sot = int(tokenizer(["x"])[0][0])
        eot = int(tokenizer(["x"])[0].max())
        rows, ctx_positions = [], []
        for name in self.classnames:
            name_ids = _body(tokenizer, name, length)
            tail = _body(tokenizer, f"{name}.", length)[len(name_ids):]  # the "." after the name
            needed = 2 + n_ctx + len(name_ids) + len(tail)
            if needed > length:
                raise ValueError(
                    f"n_ctx: {n_ctx} context vectors + class {name!r} ({len(name_ids)} tokens) + '.' + SOT/EOT need "
                    f"{needed} positions, the text tower has {length}; use n_ctx <= {length - needed + n_ctx}"
                )
            ctx = [-1] * n_ctx  # -1 marks a context slot
            half = n_ctx // 2
            if position == "end":
                body = ctx + name_ids + tail
            elif position == "front":
                body = name_ids + ctx + tail
            else:
                body = ctx[:half] + name_ids + ctx[half:] + tail
            row = [sot] + body + [eot]
            ctx_positions.append([i for i, t in enumerate(row) if t == -1])
            # Context slots hold the pad id 0: below EOT, so argmax pooling still finds the EOT.
            rows.append([0 if t == -1 else t for t in row] + [0] * (length - len(row)))
        ids = torch.tensor(rows, dtype=torch.long)
        embedding = model.token_embedding
        device = model.positional_embedding.device
        with torch.no_grad():
            base = embedding(ids.to(device)).float()
        self.register_buffer("token_ids", ids.to(device))
        self.register_buffer("base_embeddings", base)
        self.register_buffer("ctx_positions", torch.tensor(ctx_positions, dtype=torch.long, device=device))
        width = base.shape[-1]
        if ctx_init is None:
            ctx = torch.randn(n_ctx, width, device=device) * 0.02
        else:
            init_ids = _body(tokenizer, ctx_init, length)
            if len(init_ids) != n_ctx:
                raise ValueError(f"ctx_init: {ctx_init!r} has {len(init_ids)} tokens, n_ctx is {n_ctx}")
            with torch.no_grad():
                ctx = embedding(torch.tensor(init_ids, device=device)).float()
        self.ctx = nn.Parameter(ctx)

    def forward(self) -> torch.Tensor:
        """The class prompts' token embeddings [num_classes, context_length, width]."""
        c, m = self.ctx_positions.shape
        index = self.ctx_positions[:, :, None].expand(c, m, self.ctx.shape[1])
        return self.base_embeddings.scatter(1, index, self.ctx[None].expand(c, -1, -1).to(self.base_embeddings.dtype))

    def extra_repr(self) -> str:
        return f"classes={len(self.classnames)}, n_ctx={self.n_ctx}, position={self.position}"
