"""The fused transformer block (pyclipq.nn.FusedBlock) and the int8 patch embedding, on real CLIP code.

The kernels themselves are checked op by op on every CPU table in test_cpu_kernels.py; here the
converted models: the fused path gives the embeddings of the unfused one within float rounding
(a LayerNorm or GELU rounded differently can move an int8 activation code by one), falls back to
the original block wherever it does not apply, keeps the state dict, saves and loads.
"""
from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import pyclipq
from pyclipq import QuantConfig, ops
from pyclipq.nn import FusedBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clip_builders import BUILDERS, encode, sample_inputs  # noqa: E402

CONFIGS = {"int8": "int8", "int4": "int4", "ternary": "ternary", "int8-rotated": QuantConfig("int8", rotation=32),
           "int2-g32": QuantConfig("int2", group_size=32)}
# cosine of fused to unfused embeddings: float rounding only (the integer parts are the same kernels)
MIN_COSINE = 0.9999


def converted_pair(name: str, config):
    float_model = BUILDERS[name]()
    unfused = pyclipq.convert(copy.deepcopy(float_model), config, fuse_blocks=False)
    fused = pyclipq.convert(float_model, config)
    return unfused, fused


def fused_blocks(model):
    return [n for n, m in model.named_modules() if isinstance(m, FusedBlock)]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", ["open_clip", "openai", "hf"])
def test_fused_model_matches_the_unfused_one(name, config):
    unfused, fused = converted_pair(name, CONFIGS[config])
    assert len(fused.pyclipq_report.fused_blocks) == 4 and not fused.pyclipq_report.unfused_blocks  # 2 + 2 blocks
    assert len(fused_blocks(fused)) == 4 and not fused_blocks(unfused)
    images, tokens = sample_inputs(batch=3)
    for got, want in zip(encode(fused, images, tokens), encode(unfused, images, tokens)):
        assert F.cosine_similarity(got, want).min() >= MIN_COSINE
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_a_block_matches_its_unfused_forward_closely():
    """One block on one input: the float parts agree to 1e-4 of the output's scale."""
    _, fused = converted_pair("open_clip", "int8")
    block = fused.visual.transformer.resblocks[0]
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        got, want = block(x), block.unfused(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_fusing_keeps_the_state_dict_and_names():
    unfused, fused = converted_pair("open_clip", "int8")
    assert list(fused.state_dict()) == list(unfused.state_dict())
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in unfused.named_modules()]
    block = fused.visual.transformer.resblocks[1]
    assert block.ln_1 is block.unfused.ln_1 and block.mlp.c_fc is block.unfused.mlp.c_fc


def test_the_original_forward_runs_where_the_fused_path_does_not_apply():
    """Training mode, autograd, a hook inside the block: bit-identical to the unfused model."""
    unfused, fused = converted_pair("open_clip", "int8")
    images, tokens = sample_inputs()
    with torch.no_grad():
        want = unfused.encode_image(images)
    fused.train()
    unfused.train()
    with torch.no_grad():
        assert torch.equal(fused.encode_image(images), unfused.encode_image(images))
    fused.eval()
    unfused.eval()
    x = images.clone().requires_grad_(True)
    assert torch.equal(fused.encode_image(x), unfused.encode_image(x))
    # a hook on a layer inside block 0: that block runs unfused and the hook sees the layer's call
    seen, seen_unfused = [], []
    handle = fused.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(lambda m, a, out: seen.append(out))
    unfused.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(lambda m, a, out: seen_unfused.append(out))
    with torch.no_grad():
        fused.encode_image(images)
        unfused.encode_image(images)
    handle.remove()
    assert len(seen) == 1 and torch.equal(seen[0], seen_unfused[0])
    with torch.no_grad():
        assert not torch.equal(fused.encode_image(images), want)  # fused again once the hook is gone


def test_save_and_load_fuse_again(tmp_path):
    _, fused = converted_pair("open_clip", "int8")
    path = tmp_path / "m.safetensors"
    pyclipq.save(fused, path)
    loaded = pyclipq.load(path, BUILDERS["open_clip"](seed=5))
    assert len(fused_blocks(loaded)) == 4
    images, tokens = sample_inputs()
    for got, want in zip(encode(loaded, images, tokens), encode(fused, images, tokens)):
        assert torch.equal(got, want)


def test_hugging_face_blocks_fuse_and_keep_their_class():
    """CLIPEncoderLayer: q, k and v share one quantized input; the fused block is still a
    CLIPEncoderLayer, so transformers' output capture finds it (output_hidden_states)."""
    unfused, fused = converted_pair("hf", "int8")
    block = fused.text_model.encoder.layers[0]
    assert isinstance(block, FusedBlock) and isinstance(block, type(block.unfused))
    tokens = sample_inputs()[1]
    with torch.no_grad():
        got = fused.text_model(input_ids=tokens, output_hidden_states=True)
        want = unfused.text_model(input_ids=tokens, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert torch.equal(g, w)  # a capture hook inside the block: the blocks ran unfused


def test_blocks_deepcopy_and_pickle_as_fused_blocks():
    """A converted model pickles only through its state dict (parametrized packed parameters); a
    block alone pickles, and both deep-copy, as the original block wrapped again."""
    _, fused = converted_pair("open_clip", "int8")
    images, tokens = sample_inputs()
    block = fused.visual.transformer.resblocks[0]
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert isinstance(again, FusedBlock) and again._modules is again.unfused._modules
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        assert torch.equal(again(x), block(x))
    for other in (copy.deepcopy(fused),):
        assert len(fused_blocks(other)) == 4
        block = other.visual.transformer.resblocks[0]
        assert block._modules is block.unfused._modules  # still one set of modules
        for got, want in zip(encode(other, images, tokens), encode(fused, images, tokens)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("config", ["int8", "ternary", "int8-rotated"])
def test_pooled_rows_give_the_same_embeddings_bit_for_bit(config, monkeypatch):
    """pyclipq.pooled_only: the final block of each open_clip tower computed at the pooled rows only
    (class token; end-of-text by argmax or eos id at a different position in every sequence; first, last)
    gives the embeddings of the whole block exactly, and its rows path ran."""
    _, model = converted_pair("open_clip", CONFIGS[config])
    calls = []
    rows_path = FusedBlock._fused_rows
    monkeypatch.setattr(FusedBlock, "_fused_rows", lambda self, *a: (calls.append(self), rows_path(self, *a))[1])
    images, tokens = sample_inputs(batch=4)
    for b in range(4):  # end-of-text at another position in each sequence
        tokens[b, -3], tokens[b, 3 + 2 * b] = tokens[b, 3 + 2 * b], tokens[b, -3]
    with torch.no_grad():
        want_image = model.encode_image(images)
        assert not calls
        with pyclipq.pooled_only(model, images=images):
            assert torch.equal(model.encode_image(images), want_image)
        assert calls == [model.visual.transformer.resblocks[-1]]
        model.text_eos_id = tokens.max().item()  # what 'eos' pooling looks for
        for pool in ("argmax", "first", "last", "eos"):
            model.text_pool_type = pool
            want = model.encode_text(tokens)
            with pyclipq.pooled_only(model, tokens=tokens):
                assert torch.equal(model.encode_text(tokens), want), pool
            assert calls[-1] is model.transformer.resblocks[-1], pool
        # outside the context the whole block runs again
        calls.clear()
        model.encode_text(tokens)
        assert not calls


@pytest.mark.parametrize("family", ["hf", "openai"])
def test_pooled_rows_of_transformers_and_openai_clips_are_bit_exact(family, monkeypatch):
    """pyclipq.pooled_only on a transformers CLIPModel (get_*_features: the class token; end-of-text by
    the legacy argmax rule and by the first eos_token_id) and an OpenAI CLIP (class token; argmax):
    the embeddings of the whole final block exactly, through the rows path of each tower's last block."""
    _, model = converted_pair(family, "int8")
    calls = []
    rows_path = FusedBlock._fused_rows
    monkeypatch.setattr(FusedBlock, "_fused_rows", lambda self, *a: (calls.append(self), rows_path(self, *a))[1])
    images, tokens = sample_inputs(batch=4)
    for b in range(4):  # the largest id, also the eos id, at another position in each sequence
        tokens[b, -3], tokens[b, 3 + 2 * b] = tokens[b, 3 + 2 * b], tokens[b, -3]
    tokens[1, -1] = tokens[1, 3 + 2]  # a second eos after the first: HF's eos rule reads the first
    want_image, want_text = encode(model, images, tokens)
    if family == "hf":
        vision, text = model.vision_model.encoder.layers[-1], model.text_model.encoder.layers[-1]
        rules = {"first eos": tokens.max().item(), "legacy argmax": 2}
    else:
        vision, text = model.visual.transformer.resblocks[-1], model.transformer.resblocks[-1]
        rules = {"argmax": None}
    with torch.no_grad():
        with pyclipq.pooled_only(model, images=images):
            got_image = model.get_image_features(pixel_values=images) if family == "hf" else model.encode_image(images)
        assert torch.equal(getattr(got_image, "pooler_output", got_image), want_image)
        assert calls == [vision]
        for rule, eos in rules.items():
            if family == "hf":
                model.text_model.eos_token_id = eos
                want_text = encode(model, images, tokens)[1]
            with pyclipq.pooled_only(model, tokens=tokens):
                got = model.get_text_features(input_ids=tokens) if family == "hf" else model.encode_text(tokens)
            assert torch.equal(getattr(got, "pooler_output", got), want_text), rule
            assert calls[-1] is text, rule
    assert len(calls) == 1 + len(rules)


def test_pooled_rows_are_used_only_where_the_tower_reads_the_pooled_token(monkeypatch):
    """Average pooling, output tokens or an unfused final block: pooled_only is a no-op and the embeddings stay those of the whole tower. Bad arguments get a clear error."""
    _, model = converted_pair("open_clip", "int8")
    calls = []
    monkeypatch.setattr(FusedBlock, "_fused_rows", lambda self, *a: calls.append(self))
    images, tokens = sample_inputs(batch=2)
    with torch.no_grad():
        model.visual.pool_type = "avg"
        want = model.encode_image(images)
        with pyclipq.pooled_only(model, images=images):
            assert torch.equal(model.encode_image(images), want)
        model.visual.pool_type, model.visual.output_tokens = "tok", True
        with pyclipq.pooled_only(model, images=images):
            model.encode_image(images)
        model.text_pool_type = "none"
        with pyclipq.pooled_only(model, tokens=tokens):
            model.encode_text(tokens)
        unfused, _ = converted_pair("open_clip", "int8")
        with pyclipq.pooled_only(unfused, tokens=tokens):
            unfused.encode_text(tokens)
    assert not calls
    for kwargs in ({}, {"images": images, "tokens": tokens}):
        with pytest.raises(ValueError, match="exactly one of images and tokens"):
            pyclipq.pooled_only(model, **kwargs)


def test_weight_only_blocks_stay_unfused():
    model = pyclipq.convert(BUILDERS["open_clip"](), "int8-weight-only")
    assert not fused_blocks(model)
    assert all("weight-only" in why for _, why in model.pyclipq_report.unfused_blocks)


def _chain_forward(block, *args, **kwargs):
    """The block's forward through the nine-call chain, the single op switched off."""
    block._one_op_cache = ((), False)
    # mock restores the class as it was: assigning the inherited method back would leave the
    # Fused<Class> its own _one_op, which a later patch of FusedBlock._one_op would not reach
    with mock.patch.object(type(block), "_one_op", lambda self, resolved: False):
        return block(*args, **kwargs)


@pytest.mark.parametrize("name,dtype", [("open_clip", torch.float32), ("open_clip", torch.bfloat16),
                                        ("openai", torch.float32)])
@pytest.mark.parametrize("config", ["int8", "int4", "ternary", "int2-g32"])
def test_the_one_op_block_equals_the_chain_bit_for_bit(name, config, dtype):
    """transformer_block makes the chain's calls in C++: the same outputs exactly, the text towers'
    causal masks and every block of both towers included. (Hugging Face's three projections join
    into one first: test_hugging_face_projections_join_into_one_linear.)"""
    _, fused = converted_pair(name, CONFIGS[config])
    fused = fused.to(dtype)
    images, tokens = sample_inputs(batch=3)
    blocks = [m for m in fused.modules() if isinstance(m, FusedBlock)]
    calls = []
    for block in blocks:
        block.register_forward_hook(lambda m, args, kwargs, out: calls.append((m, args, kwargs, out)), with_kwargs=True)
    with torch.no_grad():
        encode(fused, images.to(dtype), tokens)
    assert len(calls) == 4
    for block, args, kwargs, out in calls:
        block._forward_hooks.clear()
        with torch.no_grad():
            assert block._one_op(block._resolved())
            got = block(*args, **kwargs)
            want = _chain_forward(block, *args, **kwargs)
        got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
        assert got.dtype == dtype and torch.equal(got, want)


def test_blocks_with_input_transforms_keep_the_chain():
    _, fused = converted_pair("open_clip", CONFIGS["int8-rotated"])
    block = fused.visual.transformer.resblocks[0]
    assert not block._one_op(block._resolved())
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(block(x), _chain_forward(block, x))


def _three_projection_outputs(model, images, tokens, monkeypatch):
    """The embeddings with Hugging Face's q, k, v run as three linears (not joined)."""
    with monkeypatch.context() as patch:
        patch.setattr(FusedBlock, "_joined_projection", lambda self, projections: None)
        return encode(model, images, tokens)


def _shares_storage(*tensors) -> bool:
    return len({t.untyped_storage().data_ptr() for t in tensors}) == 1


@pytest.mark.parametrize("config", ["int8", "int4", "ternary", "int8-rotated"])
def test_hugging_face_projections_join_into_one_linear(config, monkeypatch):
    """Hugging Face's q, k, v projections run as one q|k|v linear whose storage they view: the same
    embeddings bit for bit as three linears, the same state dict, no weight held twice; with plain
    dynamic int8 / int4 / ternary the block is then the one op transformer_block."""
    _, model = converted_pair("hf", CONFIGS[config])
    images, tokens = sample_inputs(batch=3)
    want = _three_projection_outputs(model, images, tokens, monkeypatch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = encode(model, images, tokens)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    blocks = [m for m in model.modules() if isinstance(m, FusedBlock)]
    assert len(blocks) == 4
    for block in blocks:
        attention = block.self_attn
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        joined = block._joined_projection(block._resolved()[1])
        assert joined is not None and joined.out_features == 3 * q.out_features
        for name in ("packed_weight", "weight_scale", "bias"):
            assert _shares_storage(getattr(q, name), getattr(k, name), getattr(v, name), getattr(joined, name)), name
        if joined.tile_weight is not None:
            assert _shares_storage(q.tile_weight, k.tile_weight, v.tile_weight, joined.tile_weight)
        resolved = block._resolved()
        assert block._one_op((resolved[0], (joined,), *resolved[2:])) == (config != "int8-rotated")


def test_joined_projections_follow_writes_moves_copies_and_loads(tmp_path, monkeypatch):
    """A write through one projection, a dtype move, a deep copy and a save / load: the joined q|k|v
    follows each (joined again where the views were broken) and equals three linears bit for bit."""
    _, model = converted_pair("hf", "int8")
    images, tokens = sample_inputs(batch=2)
    with torch.inference_mode():  # joins; the layers' buffers must still take writes outside it
        encode(model, images, tokens)

    def check(m, *inputs):
        for got, want in zip(encode(m, *inputs), _three_projection_outputs(m, *inputs, monkeypatch)):
            assert torch.equal(got, want)

    q = model.vision_model.encoder.layers[0].self_attn.q_proj
    q.load_float_weight(torch.randn(q.out_features, q.in_features))  # in place, through the view
    check(model, images, tokens)
    copied = copy.deepcopy(model)
    copy_q = copied.vision_model.encoder.layers[0].self_attn.q_proj
    assert copy_q.packed_weight.untyped_storage().data_ptr() != q.packed_weight.untyped_storage().data_ptr()
    check(copied, images, tokens)
    pyclipq.save(model, tmp_path / "m.safetensors")
    loaded = pyclipq.load(tmp_path / "m.safetensors", BUILDERS["hf"]())
    for got, want in zip(encode(loaded, images, tokens), encode(model, images, tokens)):
        assert torch.equal(got, want)
    model = model.to(torch.bfloat16)  # new scale and bias tensors: the views are gone
    check(model, images.to(torch.bfloat16), tokens)
    block = model.vision_model.encoder.layers[0]
    assert _shares_storage(block.self_attn.q_proj.weight_scale, block.self_attn.v_proj.weight_scale)


def test_the_one_op_block_runs_the_same_on_1_2_and_3_threads():
    _, fused = converted_pair("open_clip", "int8")
    block = fused.visual.transformer.resblocks[0]
    x = torch.randn(3, 50, 64)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(block(x))
        with torch.no_grad():
            want = block.unfused(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert (outs[0] - want).abs().max() <= 1e-4 * want.abs().max()


def test_the_one_op_block_compiles_fullgraph():
    """(opcheck: tests/test_ops.py's samples)"""
    _, fused = converted_pair("open_clip", "int8")
    block = fused.visual.transformer.resblocks[0]
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        want = block(x)
        compiled = torch.compile(block, fullgraph=True, backend="eager")
        assert torch.equal(compiled(x), want)


def test_the_one_op_block_rejects_bad_inputs():
    packed, scale = pyclipq.formats.random_packed_weight("int8", 3 * 64, 64, 0)
    linears = []
    for n, k in ((3 * 64, 64), (64, 64), (128, 64), (64, 128)):  # q|k|v, out_proj, fc1, fc2
        linears += [*pyclipq.formats.random_packed_weight("int8", n, k, 0), None, None]
    norms = [None] * 4
    x = torch.randn(2, 9, 64)
    with pytest.raises(RuntimeError, match="x must be 3-D"):
        ops.transformer_block(x[0], norms, 1e-5, 1e-5, linears, "int8", 0, 2)
    with pytest.raises(RuntimeError, match="norms must be 4 tensors or None"):
        ops.transformer_block(x, norms[:3], 1e-5, 1e-5, linears, "int8", 0, 2)
    with pytest.raises(RuntimeError, match="linears must be 16 entries"):
        ops.transformer_block(x, norms, 1e-5, 1e-5, linears[:12], "int8", 0, 2)
    with pytest.raises(RuntimeError, match="weight and weight_scale of linear 2\\) must be tensors"):
        ops.transformer_block(x, norms, 1e-5, 1e-5, linears[:8] + [None, scale, None, None] + linears[12:], "int8", 0, 2)
    with pytest.raises(RuntimeError, match="3 \\* embed_dim = 192 outputs"):
        ops.transformer_block(x, norms, 1e-5, 1e-5, [packed[:64], scale[:64], None, None] * 4, "int8", 0, 2)
    with pytest.raises(RuntimeError, match="in ln_1 \\(norms\\[0:2\\], eps_1\\): .*eps must be finite and > 0"):
        ops.transformer_block(x, norms, 0.0, 1e-5, linears, "int8", 0, 2)
    with pytest.raises(RuntimeError, match="in ln_2 \\(norms\\[2:4\\], eps_2\\): .*eps must be finite and > 0"):
        ops.transformer_block(x, norms, 1e-5, float("nan"), linears, "int8", 0, 2)
    narrow_fc2 = [*pyclipq.formats.random_packed_weight("int8", 32, 128, 0), None, None]  # 32 outputs, not 64
    with pytest.raises(RuntimeError, match="in fc2 \\(linears\\[12:16\\]\\): .*residual must hold"):
        ops.transformer_block(x, norms, 1e-5, 1e-5, linears[:12] + narrow_fc2, "int8", 0, 2)
    with pytest.raises(RuntimeError, match="in attention: .*mask must be \\[T, T\\]"):
        ops.transformer_block(x, norms, 1e-5, 1e-5, linears, "int8", 0, 2, torch.zeros(8, 8))
    with pytest.raises(RuntimeError, match="in ln_1 \\(norms\\[0:2\\], eps_1\\): .*weight must be"):
        ops.transformer_block(x, [torch.ones(63), None, None, None], 1e-5, 1e-5, linears, "int8", 0, 2)
    with pytest.raises(ValueError, match="runs on CPU tensors only"):
        ops.transformer_block(x.to("meta"), norms, 1e-5, 1e-5, linears, "int8", 0, 2)


def test_bf16_model_runs_fused_in_bf16():
    unfused, fused = converted_pair("open_clip", "int8")
    images, _ = sample_inputs()
    with torch.no_grad():
        got = fused.to(torch.bfloat16).encode_image(images.bfloat16())
        want = unfused.to(torch.bfloat16).encode_image(images.bfloat16())
    assert got.dtype == torch.bfloat16
    assert F.cosine_similarity(got.float(), want.float()).min() >= 0.999


def test_the_block_ops_compile_fullgraph():
    x = torch.randn(2, 9, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    packed, scale = pyclipq.formats.random_packed_weight("int8", 3 * 64, 64, 0)

    def block_core(x):
        q = ops.layer_norm_quantize(x, weight, bias, 1e-5)
        qkv = ops.quantized_linear("int8", *q, packed, scale, activation="none")
        return ops.attention(qkv.view(2, 9, 3 * 64), 2, causal=True)

    compiled = torch.compile(block_core, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), block_core(x))


# ---------------------------------------------------------------- int8 patch embedding

def test_patch_embedding_with_dynamic_activations_runs_the_fused_linear():
    config = QuantConfig("int8", quantize_patch_embedding=True, patch_embedding_activation="dynamic")
    model = pyclipq.convert(BUILDERS["open_clip"](), config)
    conv = model.visual.conv1
    packed = conv.parametrizations.weight[0]
    assert packed.layer.activation == "dynamic"
    images, _ = sample_inputs()
    with torch.no_grad():
        got = conv(images)
        kh, kw = conv.kernel_size
        b, c, h, w = images.shape
        patches = images.reshape(b, c, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * kh * kw)
        want = ops.reference.int8_linear(patches, packed.packed_weight, packed.weight_scale, conv.bias)
        want = want.reshape(b, h // kh, w // kw, -1).permute(0, 3, 1, 2)
        weight_only = F.conv2d(images, conv.weight, conv.bias, stride=conv.stride)  # the dequantized weight
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert F.cosine_similarity(got.flatten(1), weight_only.flatten(1)).min() >= 0.999


def test_patch_embedding_activation_is_checked():
    with pytest.raises(ValueError, match="patch_embedding_activation must be one of"):
        QuantConfig("int8", quantize_patch_embedding=True, patch_embedding_activation="static")
    with pytest.raises(ValueError, match="needs quantize_patch_embedding=True"):
        QuantConfig("int8", patch_embedding_activation="dynamic")
    config = QuantConfig("int8", quantize_patch_embedding=True, patch_embedding_activation="dynamic")
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert "patch_embedding_activation" not in QuantConfig("int8").to_dict()  # readable by earlier versions


# ---------------------------------------------------------------- bad inputs

def test_block_ops_reject_bad_inputs():
    qkv = torch.randn(2, 9, 96)
    with pytest.raises(RuntimeError, match="mask must be \\[T, T\\]"):
        ops.attention(qkv, 2, torch.zeros(8, 8))
    with pytest.raises(RuntimeError, match="3 \\* num_heads \\* head_dim"):
        ops.attention(qkv, 5)
    with pytest.raises(RuntimeError, match="qkv must be float32"):
        ops.attention(qkv.double(), 2)
    with pytest.raises(RuntimeError, match="additive float32 mask"):
        ops.attention(qkv, 2, torch.zeros(9, 9, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="scale must be finite"):
        ops.attention(qkv, 2, scale=float("nan"))
    with pytest.raises(RuntimeError, match="3 \\* num_heads \\* head_dim"):
        ops.attention(torch.randn(2, 9, 0), 2)
    with pytest.raises(RuntimeError, match="qkv must be 3-D"):
        ops.attention(qkv[0], 2)
    for rows in (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0]), torch.zeros(2, 1, dtype=torch.long)):
        with pytest.raises(RuntimeError, match="rows must be int64 \\[B\\] with B = 2"):
            ops.attention(qkv, 2, rows=rows)
    for rows in (torch.tensor([0, 9]), torch.tensor([-1, 3])):
        with pytest.raises(RuntimeError, match="rows must be query rows in \\[0, T\\) with T = 9"):
            ops.attention(qkv, 2, rows=rows)
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="weight must be a floating-point vector of x's K = 64"):
        ops.layer_norm_quantize(x, torch.ones(63), None, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be finite and > 0"):
        ops.layer_norm_quantize(x, None, None, 0.0)
    with pytest.raises(RuntimeError, match="rotation_block must be 1"):
        ops.layer_norm_quantize(x, None, None, 1e-5, 0, 48)
    with pytest.raises(RuntimeError, match="contains NaN or Inf"):
        ops.layer_norm_quantize(torch.full((2, 64), float("nan")), None, None, 1e-5)
    packed, scale = pyclipq.formats.random_packed_weight("int8", 16, 64, 0)
    q = ops.quantize_per_token(x)
    with pytest.raises(RuntimeError, match="residual must hold \\[M, N\\] = \\[4, 16\\]"):
        ops.quantized_linear("int8", *q, packed, scale, residual=torch.zeros(4, 15))
    with pytest.raises(RuntimeError, match="out_dtype must be float32, bfloat16 or float16"):
        ops.quantized_linear("int8", *q, packed, scale, out_dtype=torch.int32)
    with pytest.raises(RuntimeError, match="residual must be float32, bfloat16 or float16"):
        ops.quantized_linear("int8", *q, packed, scale, residual=torch.zeros(4, 16, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="activation must be 'none', 'gelu'"):
        ops.quantized_linear("int8", *q, packed, scale, activation="relu")
    with pytest.raises(ValueError):
        ops.quantized_linear("int3", *q, packed, scale)
    with pytest.raises(RuntimeError, match="x_scale must be a contiguous float32 \\[M\\]"):
        ops.quantized_linear("int8", q[0], q[1][:3], q[2], packed, scale)
    with pytest.raises(ValueError, match="runs on CPU tensors only"):
        ops.attention(qkv.to("meta"), 2)


# ---------------------------------------------------------------- every CPU table

CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import torch, torch.nn.functional as F, pyclipq
from test_fused_block import converted_pair, encode, sample_inputs
worst = 1.0
for name in ("open_clip", "openai", "hf"):
    for config in ("int8", "int4", "ternary"):
        unfused, fused = converted_pair(name, config)
        images, tokens = sample_inputs(batch=3)
        for got, want in zip(encode(fused, images, tokens), encode(unfused, images, tokens)):
            worst = min(worst, float(F.cosine_similarity(got, want).min()))
print(json.dumps({{"isa": pyclipq.build_info()["cpu_isa"], "worst_cosine": worst}}))
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_fused_models_match_on_the_lower_tables(isa):
    """The forced lower tables (their own LayerNorm, epilogue pass and attention instantiation)."""
    if isa not in pyclipq.build_info()["cpu_isa_supported"]:
        pytest.skip(f"this CPU/OS cannot run the {isa} table")
    code = CHILD.format(tests=str(Path(__file__).resolve().parent))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd="/",
                       env={**os.environ, "PYCLIPQ_CPU_ISA": isa})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["isa"] == isa and result["worst_cosine"] >= MIN_COSINE, result


def test_the_tower_profile_counts_each_op_of_the_chain():
    """benchmarks/profile_tower.py: one-op blocks show as transformer_block; --chain shows their ops."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import profile_tower
    from pyclipq.cli.loading import load_model

    loaded = load_model("testbed")
    loaded.model = pyclipq.convert(loaded.model, "int8")
    blocks = len(fused_blocks(loaded.model.visual))
    assert blocks > 1

    def calls(chain):
        report = profile_tower.profile_tower(loaded, "image", 2, 2, chain=chain)
        assert report["wall_ms_per_forward"] > 0
        return {name: op["calls"] for name, op in report["ops"].items() if name.startswith("pyclipq::")}

    # the last block computes only the pooled row after its q|k|v, so it always runs as the chain
    assert calls(False) == {"pyclipq::transformer_block": blocks - 1, "pyclipq::quantized_linear": 4,
                            "pyclipq::int8_linear": 1, "pyclipq::layer_norm_quantize": 2,
                            "pyclipq::attention": 1, "pyclipq::quantize_per_token": 2}
    assert calls(True) == {"pyclipq::quantized_linear": 4 * blocks, "pyclipq::int8_linear": 1,
                           "pyclipq::layer_norm_quantize": 2 * blocks, "pyclipq::attention": blocks,
                           "pyclipq::quantize_per_token": 2 * blocks}
    # the chain's patch is undone: no Fused<Class> is left with an _one_op of its own
    assert not [type(m) for m in loaded.model.modules() if isinstance(m, FusedBlock) and "_one_op" in vars(type(m))]


@pytest.mark.parametrize("args,message", [(["--calls", "0"], "--calls must be at least 1, got 0"),
                                          (["--threads", "0"], "--threads must be at least 1, got 0"),
                                          (["--batches", "1", "0"], "--batches must all be at least 1, got [1, 0]")])
def test_the_tower_profile_rejects_bad_arguments(args, message):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_tower.py"
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 2 and message in r.stderr, r.stderr
