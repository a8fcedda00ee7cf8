"""pyclipq.convert on open_clip, Hugging Face and OpenAI CLIP models built from their own code."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from clip_builders import VOCAB, BUILDERS, encode, openai_clip_module, sample_inputs, small_open_clip
from torch import nn

from pyclipq import formats
from pyclipq.configs import QuantConfig
from pyclipq.convert import convert, count_linears, fp32_nbytes, state_nbytes, summary
from pyclipq.models import QuantOpenClipAttention
from pyclipq.nn import PatchConv2d, QuantEmbedding, QuantLinear, QuantMultiheadAttention

IMPLEMENTATIONS = sorted(BUILDERS)
# visual.proj and text_projection are bare Parameters (x @ P) there: linear maps count_linears cannot see
PARAMETER_PROJECTIONS = {"open_clip": 2, "openai": 2, "hf": 0}


def converted(name: str, config, **kwargs):
    """(float model, converted copy) of the small model of implementation `name`."""
    model = BUILDERS[name](**kwargs)
    return model, convert(copy.deepcopy(model), config)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a, b, dim=-1).min().item()


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_passthrough_swap_reproduces_the_original_outputs(name):
    model, swapped = converted(name, "passthrough")
    images, tokens = sample_inputs()
    for got, expected in zip(encode(swapped, images, tokens), encode(model, images, tokens)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The swap really happened: every linear (attention included) is now a pyclipq module.
    swapped_linears = swapped.pyclipq_report.total_linears(quantized_only=False)
    assert swapped_linears == count_linears(model) + PARAMETER_PROJECTIONS[name]


@pytest.mark.parametrize(
    "block",
    [dict(block_type="custom"), dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True)],
)
def test_open_clip_custom_attention_class_is_swapped_exactly(block):
    model = small_open_clip(**block)
    swapped = convert(copy.deepcopy(model), "passthrough")
    assert isinstance(swapped.visual.transformer.resblocks[0].attn, QuantOpenClipAttention)
    images, tokens = sample_inputs()
    for got, expected in zip(encode(swapped, images, tokens), encode(model, images, tokens)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_open_clip_custom_text_clip_is_swapped_exactly():
    model, swapped = converted("open_clip", "passthrough", custom_text=True)
    assert type(model).__name__ == "CustomTextCLIP"
    images, tokens = sample_inputs()
    for got, expected in zip(encode(swapped, images, tokens), encode(model, images, tokens)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_int8_embeddings_stay_close_to_float32(name):
    model, quantized = converted(name, "int8")
    images, tokens = sample_inputs()
    for got, expected in zip(encode(quantized, images, tokens), encode(model, images, tokens)):
        assert min_cosine(got, expected) >= 0.99


# OpenAI CLIP's own LayerNorm cannot run bfloat16 on CPU (float32 input, bfloat16 parameters), converted or not.
@pytest.mark.parametrize("name", ["open_clip", "hf"])
def test_converted_model_cast_to_bfloat16_runs_in_bfloat16(name):
    model, quantized = converted(name, "int8")
    quantized.to(torch.bfloat16)
    images, tokens = sample_inputs()
    for got, expected in zip(encode(quantized, images.bfloat16(), tokens), encode(model, images, tokens)):
        assert got.dtype == torch.bfloat16
        assert min_cosine(got.float(), expected) >= 0.99


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_every_linear_is_quantized_and_counted_by_kind(name):
    model, quantized = converted(name, "int8")
    report = quantized.pyclipq_report
    # 2 layers per tower: q, k, v (3) + out + 2 MLP per layer, and one projection per tower.
    assert report.linears() == {"attn_qkv": 12, "attn_out": 4, "mlp": 8, "projection": 2}
    assert report.float_linears_left == [] and report.skipped == []
    assert count_linears(quantized) == 0
    assert report.bytes_after < report.bytes_before
    assert all(r.format == "int8" for r in report.layers)


def test_open_clip_block_modules_become_pyclipq_modules():
    _, quantized = converted("open_clip", "int4")
    block = quantized.transformer.resblocks[0]
    assert isinstance(block.attn, QuantMultiheadAttention) and isinstance(block.mlp.c_fc, QuantLinear)
    assert block.attn.in_proj.layer.group_size == 128
    assert not any(isinstance(m, (nn.Linear, nn.MultiheadAttention)) for m in quantized.modules())


def test_open_clip_get_cast_dtype_still_reads_the_model_dtype():
    _, quantized = converted("open_clip", "int8")
    assert quantized.transformer.get_cast_dtype() == torch.float32
    quantized.half()
    assert quantized.transformer.get_cast_dtype() == torch.float16
    assert quantized.transformer.resblocks[0].mlp.c_fc.weight_scale.dtype == torch.float32


def test_ternary_qffn_converts_only_the_mlps():
    _, quantized = converted("open_clip", "ternary-qffn")
    report = quantized.pyclipq_report
    assert report.linears() == {"mlp": 8}
    assert isinstance(quantized.transformer.resblocks[0].attn, nn.MultiheadAttention)
    # the attention linears are what is left float: 2 towers x 2 layers x (q, k, v, out)
    assert sum(n for _, n in report.float_linears_left) == 16
    assert isinstance(quantized.visual.proj, nn.Parameter)


def test_exclude_pattern_leaves_one_attention_projection_float():
    config = QuantConfig("int8", exclude=("*.attn.out_proj",))
    _, quantized = converted("openai", config)
    attn = quantized.visual.transformer.resblocks[0].attn
    assert attn.in_proj.layer.format == "int8" and attn.out_proj.layer.format == "float"
    assert quantized.pyclipq_report.linears() == {"attn_qkv": 12, "mlp": 8, "projection": 2}


def test_projection_flag_off_keeps_projections_float():
    for name in ("open_clip", "hf"):
        _, quantized = converted(name, QuantConfig("int8", quantize_projections=False))
        assert "projection" not in quantized.pyclipq_report.linears()
        assert sum(n for _, n in quantized.pyclipq_report.float_linears_left) == (2 if name == "hf" else 0)


PATCH_EMBEDDINGS = {"open_clip": "visual.conv1", "openai": "visual.conv1", "hf": "vision_model.embeddings.patch_embedding"}


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("config", [QuantConfig("int8"), "ternary-qall-embeddings"], ids=["int8-float-patch", "qall-emb"])
def test_patch_embedding_runs_as_one_matmul_with_its_weights_unchanged(name, config):
    model, quantized = converted(name, config)
    conv = quantized.get_submodule(PATCH_EMBEDDINGS[name])
    assert isinstance(conv, PatchConv2d)
    float_conv = model.get_submodule(PATCH_EMBEDDINGS[name])
    images = sample_inputs()[0]
    with torch.no_grad():  # the same map as the model's own convolution with the weight it now holds
        expected = F.conv2d(images, conv.weight, conv.bias, conv.stride)
        torch.testing.assert_close(conv(images), expected, rtol=1e-5, atol=1e-5)
    if not isinstance(config, str):  # without quantize_patch_embedding the patch embedding stays float
        assert torch.equal(conv.weight, float_conv.weight)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_the_int8_preset_runs_the_patch_embedding_in_int8(name):
    """The int8 preset: per-patch int8 activations against the int8 weight (the fused linear op)."""
    model, quantized = converted(name, "int8")
    kinds = {r.kind: r for r in quantized.pyclipq_report.layers}
    assert kinds["patch_embedding"].format == "int8" and kinds["patch_embedding"].activation == "dynamic"
    conv = quantized.get_submodule(PATCH_EMBEDDINGS[name])
    images = sample_inputs()[0]
    with torch.no_grad():
        got = conv(images)
        weight_only = F.conv2d(images, conv.weight, conv.bias, conv.stride)  # the dequantized weight in float
        float_out = model.get_submodule(PATCH_EMBEDDINGS[name])(images)
    assert not torch.equal(got, weight_only)  # the int8 path ran
    assert F.cosine_similarity(got.flatten(1), float_out.flatten(1)).min() >= 0.999


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_embeddings_and_projections_quantized_weight_only(name):
    model, quantized = converted(name, "ternary-qall-embeddings")
    report = quantized.pyclipq_report
    kinds = {r.kind: r for r in report.layers}
    assert kinds["token_embedding"].format == "ternary" and kinds["patch_embedding"].activation == "none"
    assert sum(isinstance(m, QuantEmbedding) for m in quantized.modules()) == 1
    images, tokens = sample_inputs()
    # the embeddings still flow: outputs have the original shapes and are finite
    for got, expected in zip(encode(quantized, images, tokens), encode(model, images, tokens)):
        assert got.shape == expected.shape and torch.isfinite(got).all()
    # 2-bit codes over K padded to 128, plus one float32 scale per row
    assert kinds["token_embedding"].quant_bytes == VOCAB * (formats.padded_k(64) // 4 + 4)
    assert report.bytes_after == state_nbytes(quantized)


def test_openai_resnet_attention_pool_is_skipped_with_its_reason():
    module = openai_clip_module()
    torch.manual_seed(0)
    model = module.CLIP(32, 64, (1, 1, 1, 1), 32, None, 16, 100, 64, 2, 1).eval()
    report = convert(model, QuantConfig("int8", quantize_patch_embedding=True)).pyclipq_report
    skipped = dict(report.skipped)
    assert "F.multi_head_attention_forward" in skipped["visual.attnpool"]
    assert "no patch embedding" in skipped["patch_embedding"]
    assert report.float_linears_left == [(f"visual.attnpool.{p}", 1) for p in ("k_proj", "q_proj", "v_proj", "c_proj")]
    assert not any(isinstance(m, PatchConv2d) for m in model.modules())  # a ResNet stem is no patch embedding
    images = torch.randn(1, 3, 64, 64)
    assert model.encode_image(images).shape == (1, 32)


def test_generic_module_with_linears_and_attention_is_converted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    convert(model, "int8")
    assert model.pyclipq_report.implementation == "generic"
    assert model.pyclipq_report.linears() == {"linear": 2, "attn_qkv": 3, "attn_out": 1}


def test_summary_lists_layers_and_the_total_against_float32():
    _, quantized = converted("hf", "int8")
    text = summary(quantized, file=None)
    assert "vision_model.encoder.layers.0.self_attn.q_proj" in text
    total, fp32 = state_nbytes(quantized), fp32_nbytes(quantized)
    assert text.splitlines()[-1] == f"total {total:,} bytes vs {fp32:,} bytes in float32 ({fp32 / total:.2f}x smaller)"


def test_convert_errors_are_clear():
    with pytest.raises(ValueError, match="one of"):
        convert(small_open_clip(), "int3")
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        convert("model", "int8")
    with pytest.raises(ValueError, match="bare Linear"):
        convert(nn.Linear(4, 4), "int8")
    _, quantized = converted("open_clip", "int8")
    with pytest.raises(ValueError, match="model is already converted"):
        convert(quantized, "int8")


def test_zero_shot_classifier_from_open_clip_tokenizer_works_on_the_converted_model():
    import open_clip

    model = small_open_clip(vocab_size=49408, context_length=77)
    quantized = convert(copy.deepcopy(model), "int8")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    classes, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a drawing of a {}."]
    with torch.no_grad():
        expected = open_clip.build_zero_shot_classifier(model, tokenizer, classes, templates)
        got = open_clip.build_zero_shot_classifier(quantized, tokenizer, classes, templates)
    assert got.shape == expected.shape == (32, 3)
    assert min_cosine(got.t(), expected.t()) >= 0.99


def vit_b32():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).eval()


def test_vit_b32_all_72_vision_linears_are_quantized():
    model = vit_b32()
    assert count_linears(model.visual) == 72
    # Only the vision tower, to keep this test quick; the slow test below converts both towers.
    report = convert(model, QuantConfig("int8", include=("visual.*",))).pyclipq_report
    assert report.linears("visual.transformer.") == {"attn_qkv": 36, "attn_out": 12, "mlp": 24}
    assert report.linears() == {"attn_qkv": 36, "attn_out": 12, "mlp": 24, "projection": 1}
    assert count_linears(model.visual) == 0


@pytest.mark.slow
def test_vit_b32_both_towers_are_quantized_and_int8_embeddings_stay_close_to_float32():
    model = vit_b32()
    assert count_linears(model.transformer) == 72
    quantized = convert(copy.deepcopy(model), "int8")
    report = quantized.pyclipq_report
    assert report.total_linears("visual.transformer.") == report.total_linears("transformer.") == 72
    assert report.linears() == {"attn_qkv": 72, "attn_out": 24, "mlp": 48, "projection": 2}
    assert count_linears(quantized) == 0 and report.float_linears_left == []
    images, tokens = torch.randn(2, 3, 224, 224), torch.randint(1, 49406, (2, 77))
    for got, expected in zip(encode(quantized, images, tokens), encode(model, images, tokens)):
        assert min_cosine(got, expected) >= 0.99


@pytest.mark.slow
def test_hf_and_openai_vit_b32_have_all_72_vision_linears_swapped():
    from transformers import CLIPConfig, CLIPModel

    hf = convert(CLIPModel(CLIPConfig()), "passthrough").pyclipq_report
    assert hf.total_linears("vision_model.", quantized_only=False) == 72
    assert hf.total_linears("text_model.", quantized_only=False) == 72
    openai = openai_clip_module().CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12)
    report = convert(openai, "passthrough").pyclipq_report
    assert report.total_linears("visual.transformer.", quantized_only=False) == 72
    assert report.total_linears("transformer.", quantized_only=False) == 72


@pytest.mark.slow
@pytest.mark.parametrize("name", ["open_clip", "hf"])
def test_compiled_converted_model_runs_without_graph_breaks(name):
    model = convert(BUILDERS[name](), "ternary-qall-embeddings")
    images, tokens = sample_inputs()
    if name == "hf":
        def image_embedding(x):
            out = model.get_image_features(pixel_values=x)
            return getattr(out, "pooler_output", out)
    else:
        image_embedding = model.encode_image
    with torch.no_grad():
        eager = image_embedding(images)
        compiled = torch.compile(image_embedding, fullgraph=True)(images)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_exported_image_tower_matches_eager():
    model = convert(BUILDERS["openai"](), "ternary-qall-embeddings")
    images, _ = sample_inputs()
    with torch.no_grad():
        exported = torch.export.export(model.visual, (images,))
        assert torch.equal(exported.module()(images), model.visual(images))
