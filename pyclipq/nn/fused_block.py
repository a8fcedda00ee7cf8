"""FusedBlock: a pre-LN transformer block of packed linears run as one chain of fused CPU ops.

A block ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``, whose four linears (q|k|v, out, fc1,
fc2) are packed QuantLinears, runs in eager PyTorch as about twenty ops, each a pass over
memory. FusedBlock runs it as nine calls of four ops (``pyclipq.ops``), made by one op,
``transformer_block``, when its linears share one LayerConfig of plain dynamic quantization:

1. ``layer_norm_quantize``: ln_1, the q|k|v layer's input rotation, per-token int8, one pass;
2. ``quantized_linear``: q|k|v;
3. ``attention``: every head of every sequence in one call (causal masks computed as such);
4. ``quantize_per_token`` + ``quantized_linear`` with the residual added in the epilogue: out;
5. ``layer_norm_quantize`` for ln_2, ``quantized_linear`` with GELU in the epilogue: fc1;
6. ``quantize_per_token`` + ``quantized_linear`` with the residual: fc2.

The integer parts are the layers' own; the floats differ from the unfused block within float
rounding (LayerNorm, GELU and softmax computed by other kernels; tests state the tolerance).

The module wraps the original block and shares its children, parameters and buffers (the
same dicts): the state dict, the module names and every reference into the block are
unchanged. Whenever the fused path does not apply (training, autograd, tensors off the CPU,
cross-attention arguments) it calls the original block, which computes with the same modules.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as module_state

from .. import formats, ops
from .attention import additive_mask
from .linear import QuantLinear, _version_of

_ops = ops._ops  # torch.ops.pyclipq, called directly: the typed wrappers' checks cost ~2 us a call

ACTIVATIONS = tuple(a for a in ops.library.EPILOGUE_ACTIVATIONS if a != "none")  # what an MLP may fuse
_FUSED_CLASSES: dict[type, type] = {}  # original block class -> its Fused<Class> (FusedBlock.wrap)
# How a block is called: open_clip's ResidualAttentionBlock(q_x, k_x, v_x, attn_mask) (bool masks:
# True = masked), OpenAI's ResidualAttentionBlock(x) (its mask an attribute), Hugging Face's
# CLIPEncoderLayer(hidden_states, attention_mask, is_causal=...) (bool masks: True = attends).
CONVENTIONS = ("open_clip", "openai", "hf")
# (final block, rows): set by `pooled_rows_only` for a caller that reads one row per sequence of
# that block's output (the pooled token); FusedBlock.forward reads it.
_POOLED_ROWS: contextvars.ContextVar = contextvars.ContextVar("pyclipq_pooled_rows", default=None)


@contextlib.contextmanager
def pooled_rows_only(block: nn.Module, rows: torch.Tensor):
    """Inside, the FusedBlock `block` computes its output only at row rows[b] of each sequence b:
    the attention's keys and values from every row, its queries, the out projection, LayerNorm and
    MLP for those rows alone (three quarters of a block's linear work saved); the other rows of the tensor it
    returns hold its input, not its output. For callers that pool the last block's output at one
    token (the class token, the end-of-text token) and read nothing else: each op computes a row
    the same whatever the other rows, so the rows computed equal the whole block's bit for bit.
    Anywhere the fused path does not apply, the block runs whole."""
    token = _POOLED_ROWS.set((block, rows))
    try:
        yield
    finally:
        _POOLED_ROWS.reset(token)


@dataclass(frozen=True)
class BlockParts:
    """Where a block keeps its parts (paths relative to the block), as its adapter reads them."""

    ln_1: str
    attention: str  # a module with num_heads, the projections below and `out_proj`
    ln_2: str
    fc1: str
    fc2: str
    activation: str  # "gelu" (erf form) or "quick_gelu"
    convention: str  # one of CONVENTIONS
    sequence_first: bool = False  # x is [T, B, E] (OpenAI CLIP, nn.MultiheadAttention without batch_first)
    # the attention's input projections: one packed q | k | v ("in_proj") or three (q, k, v), which
    # then share one quantized input where their layers quantize it alike
    projections: tuple[str, ...] = ("in_proj",)


def fusable_reason(block: nn.Module, parts: BlockParts) -> str | None:
    """Why `block` cannot run fused, or None when it can."""
    if parts.activation not in ACTIVATIONS:
        return f"activation {parts.activation!r} is not one of {ACTIVATIONS}"
    if parts.convention not in CONVENTIONS or len(parts.projections) not in (1, 3):
        raise ValueError(f"BlockParts: convention must be one of {CONVENTIONS} and projections 1 or 3 names, got "
                         f"{parts.convention!r}, {parts.projections}")
    attention = block.get_submodule(parts.attention)
    linears = {name: getattr(attention, name, None) for name in (*parts.projections, "out_proj")}
    linears.update({parts.fc1: block.get_submodule(parts.fc1), parts.fc2: block.get_submodule(parts.fc2)})
    for name, linear in linears.items():
        if not isinstance(linear, QuantLinear):
            return f"{name} is {type(linear).__name__}, not a packed QuantLinear"
        if linear.layer.is_float or linear.layer.activation == "none":
            return f"{name} is {'float' if linear.layer.is_float else 'weight-only'}: no integer activations to fuse"
    for name in (parts.ln_1, parts.ln_2):
        ln = block.get_submodule(name)
        if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1:
            return f"{name} is {type(ln).__name__}, not a LayerNorm over the last dimension"
    return None


class FusedBlock(nn.Module):
    """A pre-LN block computed by the fused CPU ops; the original block (``unfused``) otherwise.

    Built with ``FusedBlock.wrap(block, parts)``, whose instance is also an instance of the
    block's own class (a subclass made once per class, ``Fused<Class>``): code that finds blocks
    by class (transformers' output capture hooks, isinstance checks) still finds them, and the
    class's own methods run on the shared modules. It pickles and deep-copies as the original
    block wrapped again.
    """

    @classmethod
    def wrap(cls, block: nn.Module, parts: BlockParts) -> "FusedBlock":
        original = type(block)
        fused_class = _FUSED_CLASSES.get(original)
        if fused_class is None:
            fused_class = type(f"Fused{original.__name__}", (cls, original), {"__module__": __name__})
            _FUSED_CLASSES[original] = fused_class
        module = fused_class.__new__(fused_class)
        FusedBlock.__init__(module, block, parts)
        return module

    def __reduce_ex__(self, protocol):
        return FusedBlock.wrap, (self.unfused, self.parts)

    def __init__(self, block: nn.Module, parts: BlockParts):
        nn.Module.__init__(self)  # not the original class's: the block is built already
        reason = fusable_reason(block, parts)
        if reason is not None:
            raise ValueError(f"FusedBlock cannot run {type(block).__name__}: {reason}")
        # the same dicts: one set of modules and tensors, whichever forward runs
        self._modules = block._modules
        self._parameters = block._parameters
        self._buffers = block._buffers
        object.__setattr__(self, "unfused", block)  # not a submodule: its children are ours already
        self.training = block.training
        self.parts = parts
        self._causal_masks: dict = {}
        self._one_op_cache: tuple = ((), False)  # (the linears' LayerConfigs, whether _one_op)
        # (q|k|v of separate projections as one QuantLinear, their buffers' addresses): _joined_projection
        object.__setattr__(self, "_joined", None)
        # the modules a hook may wait on, listed once (walking the tree cost ~7 us a call)
        self._watched = tuple(m for m in self.modules() if m is not self)

    def train(self, mode: bool = True):
        super().train(mode)
        self.unfused.training = mode  # its own flag: the children are shared already
        return self

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # plain attributes of the original (OpenAI's attn_mask, open_clip's helpers)
            return getattr(object.__getattribute__(self, "unfused"), name)

    def _part(self, path: str) -> nn.Module:
        module = self
        for name in path.split("."):
            module = module._modules[name]
        return module

    def _resolved(self):
        """(attention, (input projections), ln_1, ln_2, fc1, fc2) as they are now, or None when a
        linear is no longer a packed QuantLinear (QAT's twins, or a user's swap since): walked
        through the module dicts, ~10x cheaper than get_submodule at ~1 us a step per call."""
        parts = self.parts
        attention = self._part(parts.attention)
        projections = tuple(attention._modules.get(name) for name in parts.projections)
        fc1, fc2 = self._part(parts.fc1), self._part(parts.fc2)
        if not all(type(m) is QuantLinear for m in (*projections, attention._modules.get("out_proj"), fc1, fc2)):
            return None
        return attention, projections, self._part(parts.ln_1), self._part(parts.ln_2), fc1, fc2

    def _hooked(self, resolved) -> bool:
        """Whether a forward hook waits on a module inside the block (calibration observers, feature
        capture) or on every module: the fused ops would skip its call, so the block runs unfused."""
        if torch.compiler.is_compiling():
            return False
        if module_state._global_forward_hooks or module_state._global_forward_pre_hooks:
            return True
        attention, projections, *rest = resolved
        # the parts as they are now (a swapped-in linear included) and every module there was at fusing
        return any(m._forward_hooks or m._forward_pre_hooks
                   for m in (attention, *projections, attention.out_proj, *rest, *self._watched))

    def _call(self, args, kwargs):
        """(x, mask, causal hint, whether the call asks for more than the fused path gives)."""
        convention = self.parts.convention
        if convention == "hf":
            x = args[0] if args else kwargs.get("hidden_states")
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            # the causal flag HF passes with a None mask; output_attentions and the like: unfused
            extra = len(args) > 2 or any(v not in (None, False) for k, v in kwargs.items()
                                         if k not in ("hidden_states", "attention_mask", "is_causal"))
            return x, mask, bool(kwargs.get("is_causal", False)) and mask is None, extra
        if convention == "openai":
            return (args[0] if args else kwargs.get("x")), getattr(self.unfused, "attn_mask", None), False, \
                len(args) > 1 or bool(kwargs.keys() - {"x"})
        x = args[0] if args else kwargs.get("q_x")
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        extra = any(a is not None for a in args[1:3]) or kwargs.get("k_x") is not None or kwargs.get("v_x") is not None
        return x, mask, False, extra

    def forward(self, *args, **kwargs):
        x, mask, causal, extra = self._call(args, kwargs)
        applies = (x is not None and not self.training and not extra and x.device.type == "cpu" and x.dim() == 3
                   and x.dtype in (torch.float32, torch.bfloat16) and not (torch.is_grad_enabled() and x.requires_grad))
        resolved = self._resolved() if applies else None
        if resolved is None or self._hooked(resolved):
            return self.unfused(*args, **kwargs)
        joined = self._joined_projection(resolved[1])
        if joined is not None:
            resolved = (resolved[0], (joined,), *resolved[2:])
        pooled = _POOLED_ROWS.get()
        rows = pooled[1] if pooled is not None and pooled[0] is self else None
        if self.parts.sequence_first:
            return self._fused(resolved, x.transpose(0, 1), mask, causal, rows).transpose(0, 1)
        return self._fused(resolved, x, mask, causal, rows)

    def _joined_projection(self, projections) -> QuantLinear | None:
        """Separate q, k, v projections (Hugging Face's) as one q|k|v QuantLinear, or None where they
        stay apart (one packed projection already; per-layer input transforms or static scales; under
        torch.compile). The joined layer holds the storage: the three layers' buffers become row views
        of its weight, scales, bias and tile layout, so no weight is held twice, the state dict and
        every write through the three layers stay as they were, and the block runs as the one-op
        ``transformer_block`` (one GEMM of 3 E columns, no concatenation). Checked every call: a move,
        a load with assign or a rebuilt tile layout breaks the views, and the next call joins again."""
        if len(projections) == 1 or torch.compiler.is_compiling():
            return None
        if self._joined is not None and self._joined[1] == _buffer_addresses(projections):
            return self._joined[0]
        first = projections[0]
        if not (_quantize_alike(projections) and not first.layer.is_float
                and all(p.in_features == first.in_features and (p.bias is None) == (first.bias is None)
                        and p.out_features % formats.TILE_COLUMNS == 0 for p in projections)):
            return None
        joined = _join(projections)
        object.__setattr__(self, "_joined", (joined, _buffer_addresses(projections)))
        return joined

    def _mask(self, mask: torch.Tensor | None, tokens: int, batch: int, heads: int):
        """(additive float32 mask or None, causal): a causal mask is recognised once per tensor version."""
        if mask is None:
            return None, False
        if self.parts.convention == "openai" and mask.shape[-1] > tokens:  # a context-length mask: its last T x T
            mask = mask[-tokens:, -tokens:]
        if mask.dtype == torch.bool and self.parts.convention == "hf":  # HF: True = may attend
            mask = ~mask
        key = (mask.data_ptr(), mask._version if not mask.is_inference() else -1, tuple(mask.shape), mask.dtype)
        causal = self._causal_masks.get(key)
        additive = additive_mask(mask, "attn_mask", torch.float32)
        if causal is None:
            square = additive.reshape(-1, tokens, tokens)[0] if additive.dim() == 4 and additive.shape[0] == 1 \
                and additive.shape[1] == 1 else additive
            causal = square.dim() == 2 and tuple(square.shape) == (tokens, tokens) and _is_causal(square)
            self._causal_masks = {key: causal}
        if causal:
            return None, True
        if additive.dim() == 3:  # [B * heads, T, T], as nn.MultiheadAttention takes it
            additive = additive.reshape(batch, heads, tokens, tokens)
        return additive, False

    def _one_op(self, resolved) -> bool:
        """Whether the block runs as the single op ``transformer_block``: one packed q|k|v and four
        linears of one LayerConfig quantizing their inputs per token as they come (dynamic, no
        smoothing or rotation to apply); the chain below otherwise. Decided once per set of configs."""
        attention, projections, ln_1, ln_2, fc1, fc2 = resolved
        layers = (*projections, attention.out_proj, fc1, fc2)
        configs = tuple(m.layer for m in layers)  # frozen: the same objects, the same answer
        cached, answer = self._one_op_cache
        if (not torch.compiler.is_compiling() and len(cached) == len(configs)
                and all(a is b for a, b in zip(cached, configs))):
            return answer
        first = layers[0].layer
        one = (len(projections) == 1 and first.activation == "dynamic"
               and all(m.layer == first and not m.layer.has_input_transform for m in layers))
        if not torch.compiler.is_compiling():
            self._one_op_cache = (configs, one)
        return one

    def _fused(self, resolved, x: torch.Tensor, attn_mask, causal_hint: bool, rows=None) -> torch.Tensor:
        attention, projections, ln_1, ln_2, fc1, fc2 = resolved
        batch, tokens, width = x.shape
        x = x.contiguous()
        mask, causal = self._mask(attn_mask, tokens, batch, attention.num_heads)
        if rows is not None:
            return self._fused_rows(resolved, x, mask, causal or causal_hint, rows)
        if self._one_op(resolved):
            layers = (projections[0], attention.out_proj, fc1, fc2)
            linears = [t for m in layers for t in (m.packed_weight, m.weight_scale, m.bias, m._tile_weight_for(None))]
            return _ops.transformer_block(x, [ln_1.weight, ln_1.bias, ln_2.weight, ln_2.bias], ln_1.eps, ln_2.eps,
                                          linears, layers[0].layer.format, layers[0].layer.activation_group_size,
                                          attention.num_heads, mask, causal or causal_hint, self.parts.activation)
        qkv = _projected(projections, ln_1, x)
        attended = _ops.attention(qkv.view(batch, tokens, 3 * width), attention.num_heads, mask, causal or causal_hint,
                                  None)
        x = _linear(attention.out_proj, _quantize(attention.out_proj, attended), residual=x, out_dtype=x.dtype)
        hidden = _linear(fc1, _norm_quantize(ln_2, fc1, x), activation=self.parts.activation)
        x = _linear(fc2, _quantize(fc2, hidden), residual=x, out_dtype=x.dtype)
        return x.view(batch, tokens, width)

    def _fused_rows(self, resolved, x: torch.Tensor, mask, causal: bool, rows: torch.Tensor) -> torch.Tensor:
        """The block at rows[b] of each sequence b only (pooled_rows_only): q|k|v of every row, the
        attention of the rows picked, then the ops of the chain on those B rows."""
        attention, projections, ln_1, ln_2, fc1, fc2 = resolved
        batch, tokens, width = x.shape
        qkv = _projected(projections, ln_1, x)
        attended = _ops.attention(qkv.view(batch, tokens, 3 * width), attention.num_heads, mask, causal, None, rows)
        index = torch.arange(batch)
        picked = x[index, rows]
        picked = _linear(attention.out_proj, _quantize(attention.out_proj, attended.view(batch, width)), residual=picked,
                         out_dtype=x.dtype)
        hidden = _linear(fc1, _norm_quantize(ln_2, fc1, picked), activation=self.parts.activation)
        picked = _linear(fc2, _quantize(fc2, hidden), residual=picked, out_dtype=x.dtype)
        out = x.clone()
        out[index, rows] = picked.view(batch, width)
        return out

    def extra_repr(self) -> str:
        return f"{type(self.unfused).__name__}, activation={self.parts.activation}"


def fuse_block(block: nn.Module, parts: BlockParts | None) -> tuple[nn.Module, str | None]:
    """(FusedBlock over `block`, None), or (`block`, why not) when its parts do not fuse."""
    if parts is None:
        return block, "not a pre-LN block of LayerNorm, q|k|v attention and a two-layer MLP"
    reason = fusable_reason(block, parts)
    return (block, reason) if reason else (FusedBlock.wrap(block, parts), None)


def _is_causal(mask: torch.Tensor) -> bool:
    """An additive [T, T] mask that is -inf exactly above the diagonal and 0 elsewhere."""
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all()) and bool((mask[~upper] == 0).all())


@torch.no_grad()
def _join(projections) -> QuantLinear:
    """One QuantLinear whose rows are `projections`' in order, and those layers' buffers made row
    views of its own (see FusedBlock._joined_projection). Normal tensors even when first called
    under inference_mode: the layers' buffers must keep taking in-place writes."""
    first = projections[0]
    with torch.inference_mode(False):
        joined = QuantLinear(first.in_features, sum(p.out_features for p in projections), first.bias is not None,
                             layer=first.layer, dtype=first.float_dtype, device=first.packed_weight.device)
        joined.packed_weight = torch.cat([p.packed_weight for p in projections])
        joined.weight_scale = torch.cat([p.weight_scale for p in projections])
        if first.bias is not None:
            joined.bias = torch.cat([p.bias for p in projections])
        joined.refresh_tile_weight()
        start = 0
        for p in projections:
            rows = slice(start, start + p.out_features)
            p.packed_weight, p.weight_scale = joined.packed_weight[rows], joined.weight_scale[rows]
            if p.bias is not None:
                p.bias = joined.bias[rows]
            if joined.tile_weight is not None:  # whole panels: every part's rows are a multiple of TILE_COLUMNS
                p.tile_weight = joined._tile_weight_for(rows)
            p._tile_source_version = _version_of(p.packed_weight)  # the views share the joined tensors' counter
            start = rows.stop
    return joined


def _quantize_alike(projections) -> bool:
    """Whether the projections quantize their shared input alike: one config, dynamic activations,
    no per-layer (online) smoothing; so one quantized input serves them all, or one joined layer."""
    layer = projections[0].layer
    return all(p.layer == layer for p in projections) and layer.smoothing != "online" and layer.activation == "dynamic"


def _buffer_addresses(projections) -> tuple:
    """Where each projection's weight, scales, bias and tile layout live: equal to the addresses
    recorded at _join while they are still its views."""
    return tuple(t.data_ptr() if t is not None else 0 for p in projections
                 for t in (p.packed_weight, p.weight_scale, p.bias, p.tile_weight))


def _projected(projections, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """q | k | v [M, 3 E] from the packed projection, or from three that share one quantized input
    when their layers quantize it alike (same config, no per-layer smoothing or static scale)."""
    if len(projections) == 1:
        return _linear(projections[0], _norm_quantize(ln, projections[0], x))
    first = projections[0]
    shared = _quantize_alike(projections)
    quantized = _norm_quantize(ln, first, x) if shared else None
    return torch.cat([_linear(p, quantized if shared else _norm_quantize(ln, p, x)) for p in projections], dim=-1)


def _norm_quantize(ln: nn.LayerNorm, linear: QuantLinear, x: torch.Tensor):
    """ln(x) as `linear` takes it: smoothed (online smoothing divides the LayerNorm's output, folded
    into its affine here), rotated and quantized."""
    weight, bias = ln.weight, ln.bias
    if linear.layer.smoothing == "online":
        divisor = linear.smooth_scale.float()
        weight = (weight.float() if weight is not None else torch.ones_like(divisor)) / divisor
        bias = bias.float() / divisor if bias is not None else None
    return _ops.layer_norm_quantize(x, weight, bias, ln.eps, linear.layer.activation_group_size,
                                    linear.rotation_block, linear.call_act_scale())


def _quantize(linear: QuantLinear, x: torch.Tensor):
    if linear.layer.has_input_transform:
        x = linear.transform_input(x)
    return _ops.quantize_per_token(x, linear.layer.activation_group_size, linear.call_act_scale())


def _linear(linear: QuantLinear, quantized, *, activation: str = "none", residual=None, out_dtype=None):
    x_q, x_scale, x_sums = quantized
    return _ops.quantized_linear(x_q, x_scale, x_sums, linear.packed_weight, linear.weight_scale, linear.layer.format,
                                 linear.layer.activation_group_size, linear.bias, linear._tile_weight_for(None),
                                 activation, residual, out_dtype)
