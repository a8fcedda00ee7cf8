"""QAT: fake quantization matches the formats and the kernels; prepare -> convert exports the same codes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyclipq
from pyclipq import formats, ops, primitives
from pyclipq.configs import LayerConfig, QuantConfig
from pyclipq.convert import convert
from pyclipq.nn import QuantMultiheadAttention
from pyclipq.ops import reference
from pyclipq.train import qat
from pyclipq.train.fake_quant import (
    FakeQuantLinear,
    FakeQuantParameter,
    fake_quant_multihead_attention,
    fake_quantize_activation,
    fake_quantize_weight,
    linear_match_tolerance,
    quantize_activation_rows,
)

from train_helpers import single_thread, tiny_batch, tiny_clip

LAYERS = [
    LayerConfig("int8"),
    LayerConfig("int4", 32),
    LayerConfig("int4", 0),
    LayerConfig("int2", 64),
    LayerConfig("ternary"),
    LayerConfig("ternary", threshold_rule="twice_mean"),
]
IDS = ["int8", "int4-g32", "int4-ch", "int2-g64", "ternary-absmean", "ternary-twice_mean"]

_one_thread = pytest.fixture(autouse=True)(single_thread)


def packed_args(layer: LayerConfig, weight: torch.Tensor):
    codes, scale = primitives.quantize_weight(weight, layer.format, layer.group_size, layer.threshold_rule)
    packed = codes if layer.format == "int8" else formats.pack_codes_reference(codes, formats.get_format(layer.format).bits)
    return (packed, scale, layer.group_size) if layer.format in ("int4", "int2") else (packed, scale)


def reference_linear(layer, x, weight, bias, act_scale=None):
    return getattr(reference, f"{layer.format}_linear")(x, *packed_args(layer, weight), bias=bias, act_scale=act_scale)


def kernel_linear(layer, x, weight, bias, act_scale=None):
    return getattr(ops, f"{layer.format}_linear")(x, *packed_args(layer, weight), bias=bias, act_scale=act_scale)


# ---------------------------------------------------------------- activations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_mirrors_the_reference(dtype):
    x = (torch.randn(9, 77) * torch.rand(9, 1) * 10).to(dtype)
    x[1] = 0  # scale 0, codes 0
    x[2, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # absmax 127: exact ties, round half to even
    for act_scale in (None, torch.tensor(0.03)):
        q, s = quantize_activation_rows(x.float(), act_scale)
        rq, rs, _ = reference.quantize_per_token(x, 0, act_scale)
        assert torch.equal(q.to(torch.int8), rq[:, :77]) and torch.equal(s, rs)


def test_activation_ste_passes_gradients_and_masks_static_clipping():
    x = torch.randn(4, 16, requires_grad=True)
    upstream = torch.randn(4, 16)
    (fake_quantize_activation(x) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)  # dynamic: nothing clips, identity gradient
    x.grad = None
    scale = torch.tensor(0.005)  # clips everything beyond 127.5 * 0.005
    (fake_quantize_activation(x, scale) * upstream).sum().backward()
    inside = x.detach().abs() <= 127.5 * 0.005
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad, upstream * inside)


def test_activation_rejects_bad_input():
    with pytest.raises(ValueError, match="x must be a floating-point"):
        fake_quantize_activation(torch.ones(3, dtype=torch.int64))


# ---------------------------------------------------------------- weights and linears


@pytest.mark.parametrize("layer", LAYERS, ids=IDS)
def test_fake_weight_is_dequantize_of_quantize_with_identity_gradient(layer):
    w = torch.randn(12, 200, requires_grad=True)
    fq = fake_quantize_weight(w, layer)
    codes, scale = primitives.quantize_weight(w.detach(), layer.format, layer.group_size, layer.threshold_rule)
    assert torch.equal(fq, primitives.dequantize_codes(codes, scale, layer.format, 200))
    upstream = torch.randn_like(fq)
    (fq * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("layer", LAYERS, ids=IDS)
@pytest.mark.parametrize("k", [1, 77, 300])
def test_exact_fake_quant_linear_is_bit_identical_to_reference(layer, k):
    lin = nn.Linear(k, 37)
    x = torch.randn(3, 5, k) * 4
    fake = FakeQuantLinear.from_linear(lin, layer, exact=True)
    assert torch.equal(fake(x), reference_linear(layer, x, lin.weight.detach(), lin.bias.detach()))


def test_exact_int8_splits_long_accumulations():
    # |q| = 127 and level 127 everywhere: one fp32 accumulation over K=2304 would pass 2**24.
    layer = LayerConfig("int8")
    lin = nn.Linear(2304, 3, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.weight[1] = -1.0
    x = torch.ones(2, 2304)
    x[1, ::2] = 1 + 2**-20  # values whose int products must not round
    fake = FakeQuantLinear.from_linear(lin, layer)
    assert torch.equal(fake(x), reference_linear(layer, x, lin.weight.detach(), None))


def test_exact_static_activation_matches_reference():
    layer = LayerConfig("int4", 32, activation="static")
    lin = nn.Linear(96, 10)
    fake = FakeQuantLinear.from_linear(lin, layer)
    x = torch.randn(7, 96)
    with pytest.raises(RuntimeError, match="act_scale"):
        fake(x)
    fake.set_act_scale(0.01)  # clips: |x| up to ~3 > 1.27
    want = reference_linear(layer, x, lin.weight.detach(), lin.bias.detach(), torch.tensor(0.01))
    assert torch.equal(fake(x), want)
    with pytest.raises(ValueError, match="scale must be one finite positive"):
        fake.set_act_scale(-1.0)


@pytest.mark.parametrize("layer", LAYERS, ids=IDS)
def test_float_path_and_kernel_within_derived_tolerance(layer):
    lin = nn.Linear(300, 64)
    x = torch.randn(4, 9, 300) * 3
    exact = FakeQuantLinear.from_linear(lin, layer, exact=True)
    fast = FakeQuantLinear.from_linear(lin, layer, exact=False)
    y = exact(x)
    tol = linear_match_tolerance(x, exact.quantized_weight(), lin.bias)
    assert ((fast(x) - y).abs() <= tol).all()
    assert ((kernel_linear(layer, x, lin.weight.detach(), lin.bias.detach()) - y).abs() <= tol).all()
    # The bound is tight enough to catch a wrong code: nudge one weight across a level.
    codes, scale = primitives.quantize_weight(lin.weight.detach(), layer.format, layer.group_size, layer.threshold_rule)
    wrong = primitives.dequantize_codes(codes, scale, layer.format, 300).clone()
    wrong[0, 0] += scale.reshape(64, -1)[0, 0] * formats.get_format(layer.format).level_mul
    x_fq = fake_quantize_activation(x)
    assert ((F.linear(x_fq, wrong, lin.bias) - y).abs() > tol).any()


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("activation", ["dynamic", "static", "none"])
def test_ste_gradients_are_those_of_the_dequantized_linear(exact, activation):
    layer = LayerConfig("int4", 32, activation=activation)
    lin = nn.Linear(64, 24)
    fake = FakeQuantLinear.from_linear(lin, layer, exact=exact)
    if activation == "static":
        fake.set_act_scale(0.015)
    x = (torch.randn(5, 64) * 1.2).requires_grad_(True)
    upstream = torch.randn(5, 24)
    (fake(x) * upstream).sum().backward()
    # By hand: y = x_fq @ w_fq^T + b with identity STE through both quantizers.
    w_fq = fake.quantized_weight().dequantize()
    act_scale = fake.act_scale if activation == "static" else None
    x_fq = x.detach() if activation == "none" else fake_quantize_activation(x.detach(), act_scale)
    mask = torch.ones_like(x) if activation != "static" else (x.detach().abs() <= 127.5 * 0.015).float()
    assert mask.min() == 0 or activation != "static"  # the static case really clips somewhere
    torch.testing.assert_close(x.grad, (upstream @ w_fq) * mask, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, upstream.t() @ x_fq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, upstream.sum(0))


@pytest.mark.parametrize("learn_scales", [False, True])
@pytest.mark.parametrize("activation", ["dynamic", "none"])
@pytest.mark.parametrize("rotation", [0, 32])
def test_a_blended_layer_applies_that_share_of_its_weight_rounding_with_the_ste_gradient(learn_scales, activation, rotation):
    """Progressive quantization's forward: F.linear(x_fq, w + blend (w_fq - w)) in the rotated space
    the layer quantizes in; the latent's gradient mixes the float and the straight-through one (the
    same with the identity STE), the learned scales' shrinks with the blend; blend 1 is the
    quantized layer itself, bit for bit."""
    from pyclipq.nn.linear import rotate_input_dim

    torch.manual_seed(0)
    layer = LayerConfig("int4", 32, activation=activation, rotation=rotation)
    lin = nn.Linear(64, 24)
    fake = FakeQuantLinear.from_parameters(lin.weight, lin.bias, layer, exact=False, learn_scales=learn_scales)
    x = torch.randn(5, 64) * 1.2
    upstream = torch.randn(5, 24)
    quantized = fake(x)

    def run(blend):
        for p in fake.parameters():
            p.grad = None
        fake.set_blend(blend)
        out = fake(x)
        (out * upstream).sum().backward()
        return out.detach(), lin.weight.grad.clone(), None if fake.log_scale is None else fake.log_scale.grad.clone()

    block = fake.rotation_block
    w = rotate_input_dim(lin.weight.detach(), block)
    w_fq = fake.quantized_weight().dequantize()
    x_in = rotate_input_dim(x, block)
    x_fq = x_in if activation == "none" else fake_quantize_activation(x_in)
    full, full_grad, full_scale_grad = run(1.0)
    assert torch.equal(full, quantized)
    _, float_grad, _ = run(0.0)
    if not learn_scales:  # the identity STE: the latent's gradient is the float layer's whatever the blend
        torch.testing.assert_close(float_grad, full_grad, rtol=1e-5, atol=1e-5)
    for blend in (0.0, 0.25, 0.5):
        out, grad, scale_grad = run(blend)
        torch.testing.assert_close(out, F.linear(x_fq, w + blend * (w_fq - w), lin.bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out, full, rtol=1e-3, atol=1e-3)  # a blend < 1 changes the output
        # LSQ's STE passes nothing where a weight clips: the blend mixes the float and the quantized gradient
        torch.testing.assert_close(grad, (1 - blend) * float_grad + blend * full_grad, rtol=1e-5, atol=1e-5)
        if learn_scales:
            torch.testing.assert_close(scale_grad, blend * full_scale_grad, rtol=1e-4, atol=1e-7)


def test_an_exact_layer_takes_the_float_path_while_blended_and_blends_are_checked():
    lin = nn.Linear(40, 8)
    fake = FakeQuantLinear.from_linear(lin, LayerConfig("ternary"), exact=True)
    x = torch.randn(3, 40)
    exact = fake(x)
    torch.testing.assert_close(exact, reference_linear(LayerConfig("ternary"), x, lin.weight.detach(), lin.bias.detach()),
                               rtol=0, atol=0)
    fake.set_blend(0.0)
    torch.testing.assert_close(fake(x), F.linear(fake_quantize_activation(x), lin.weight, lin.bias))
    fake.set_blend(1)
    assert torch.equal(fake(x), exact)
    for bad in (1.5, -0.1, True, "half", float("nan")):
        with pytest.raises(ValueError, match="blend must be a number in \\[0, 1\\]"):
            fake.set_blend(bad)
    parameter = FakeQuantParameter("out_rows", LayerConfig("int8"))
    table = torch.randn(6, 10)
    quantized = parameter(table)
    parameter.set_blend(0.5)
    torch.testing.assert_close(parameter(table), table + 0.5 * (quantized - table))
    with pytest.raises(ValueError, match="blend must be a number in"):
        parameter.set_blend(2)


def test_fake_quant_linear_shares_parameters_and_rejects_bad_input():
    lin = nn.Linear(8, 4)
    fake = FakeQuantLinear.from_linear(lin, LayerConfig("ternary"))
    assert fake.weight is lin.weight and fake.bias is lin.bias
    with pytest.raises(ValueError, match="linear must be a torch.nn.Linear"):
        FakeQuantLinear.from_linear(nn.Conv1d(1, 1, 1), LayerConfig("int8"))
    with pytest.raises(ValueError, match="layer must be a pyclipq.configs.LayerConfig"):
        FakeQuantLinear.from_linear(lin, "int8")


def test_weight_cache_follows_in_place_updates():
    lin = nn.Linear(16, 4)
    fake = FakeQuantLinear.from_linear(lin, LayerConfig("int8"))
    x = torch.randn(2, 16)
    before = fake(x)
    with torch.no_grad():
        lin.weight.mul_(2)  # what an optimizer step does
    assert not torch.equal(fake(x), before)
    assert torch.equal(fake(x), FakeQuantLinear.from_linear(lin, LayerConfig("int8"))(x))


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("batch_first", [True, False])
def test_fake_quant_attention_reproduces_multihead_attention(batch_first):
    float_layer = LayerConfig("float")
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    fake = fake_quant_multihead_attention(mha, float_layer, float_layer)
    x = torch.randn(2, 6, 32) if batch_first else torch.randn(6, 2, 32)
    kv = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False] * 5 + [True], [False] * 6])
    cases = [
        dict(args=(x, x, x), kwargs=dict(need_weights=False, attn_mask=causal)),
        dict(args=(x, x, x), kwargs=dict(need_weights=True, key_padding_mask=padding)),
        dict(args=(x, x, x), kwargs=dict(need_weights=True, average_attn_weights=False, attn_mask=causal.float() * -1e4)),
        dict(args=(x, kv, kv), kwargs=dict(need_weights=False)),
    ]
    for case in cases:
        want, want_w = mha(*case["args"], **case["kwargs"])
        got, got_w = fake(*case["args"], **case["kwargs"])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if want_w is None:
            assert got_w is None
        else:
            torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    unbatched = torch.randn(6, 32)
    torch.testing.assert_close(fake(unbatched, unbatched, unbatched)[0], mha(unbatched, unbatched, unbatched)[0], rtol=1e-5, atol=1e-6)


def test_fake_quant_attention_rejects_unsupported():
    with pytest.raises(ValueError, match="kdim/vdim differ from embed_dim"):
        fake_quant_multihead_attention(nn.MultiheadAttention(8, 2, kdim=4), LayerConfig("int8"), LayerConfig("int8"))
    with pytest.raises(ValueError, match="add_bias_kv"):
        fake_quant_multihead_attention(nn.MultiheadAttention(8, 2, add_bias_kv=True), LayerConfig("int8"), LayerConfig("int8"))


def test_one_attention_class_for_packed_and_fake_projections():
    """QAT's attention is convert's QuantMultiheadAttention with FakeQuantLinear projections sharing mha's Parameters."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4)
    fake = fake_quant_multihead_attention(mha, LayerConfig("int8"), LayerConfig("int4", 32))
    assert type(fake) is QuantMultiheadAttention and isinstance(fake.in_proj, FakeQuantLinear)
    assert fake.in_proj.weight is mha.in_proj_weight and fake.out_proj.weight is mha.out_proj.weight
    assert fake.float_module is mha
    # the same function as the packed module (they differ by the kernels' epilogue rounding only)
    packed = QuantMultiheadAttention.from_float(mha, LayerConfig("int8"), LayerConfig("int4", 32))
    x = torch.randn(5, 2, 32)
    torch.testing.assert_close(fake(x, x, x, need_weights=False)[0], packed(x, x, x, need_weights=False)[0],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="either in_proj_layer and out_proj_layer .* or in_proj and out_proj"):
        QuantMultiheadAttention(32, 4, in_proj_layer=LayerConfig("int8"), out_proj=fake.out_proj)
    with pytest.raises(ValueError, match="in_proj must map 32 features to 96"):
        QuantMultiheadAttention(32, 4, in_proj=fake.out_proj, out_proj=fake.out_proj)


def test_fake_quant_multihead_attention_name_is_gone():
    """QAT's attention is QuantMultiheadAttention with fake-quant projections; the old class name is retired."""
    import pyclipq.train as train
    from pyclipq.train import fake_quant

    assert not hasattr(train, "FakeQuantMultiheadAttention") and not hasattr(fake_quant, "FakeQuantMultiheadAttention")
    fake = fake_quant.fake_quant_multihead_attention(nn.MultiheadAttention(16, 2), LayerConfig("int8"), LayerConfig("int8"))
    assert type(fake) is QuantMultiheadAttention


# ---------------------------------------------------------------- prepare / convert


@pytest.mark.parametrize("preset", ["ternary-qall-embeddings", "ternary-qffn", "int4"])
def test_prepare_then_convert_matches_layer_by_layer(preset):
    model = tiny_clip().eval()
    images, tokens = tiny_batch(6)
    fake = qat.prepare_qat(model, preset)
    real = qat.convert_qat(fake)
    matches = qat.compare_layers(fake, real, lambda m: m(images, tokens))
    assert matches and all(m.ok for m in matches), [m for m in matches if not m.ok]
    linears = {n for n, m in fake.named_modules() if isinstance(m, FakeQuantLinear) and not m.layer.is_float}
    assert linears and linears <= {m.name for m in matches}  # every quantized linear was checked
    # Same codes: every packed weight dequantizes to exactly the fake-quant weight.
    for name, module in real.named_modules():
        if isinstance(module, pyclipq.nn.QuantLinear) and not module.layer.is_float:
            twin = fake.get_submodule(name)
            assert torch.equal(module.dequantize_weight(torch.float32), twin.quantized_weight().dequantize()), name
    # End to end: a last-bit difference can flip a later activation rounding (one step), no more.
    with torch.no_grad():
        for a, b in zip(fake(images, tokens)[:2], real(images, tokens)[:2]):
            assert F.cosine_similarity(a, b, dim=-1).min() > 0.9999


def test_prepare_leaves_the_original_alone_and_strip_undoes_it():
    model = tiny_clip().eval()
    images, tokens = tiny_batch(4)
    with torch.no_grad():
        before = model(images, tokens)[0].clone()
        fake = qat.prepare_qat(model, "ternary-qall")
        assert not torch.equal(fake(images, tokens)[0], before)  # it does quantize
        assert torch.equal(model(images, tokens)[0], before)
        stripped = qat.strip(fake)
        assert torch.equal(stripped(images, tokens)[0], before)
        assert fake(images, tokens)[0].shape == before.shape  # strip copied: fake still works
    assert sum(isinstance(m, nn.Linear) and not isinstance(m, FakeQuantLinear) for m in stripped.modules()) > 0
    assert not any(isinstance(m, (FakeQuantLinear, QuantMultiheadAttention)) for m in stripped.modules())


def test_prepare_and_convert_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        qat.prepare_qat("model", "int8")
    with pytest.raises(ValueError, match="config must be a QuantConfig or one of"):
        qat.prepare_qat(model, "int3")
    fake = qat.prepare_qat(model, "int8")
    with pytest.raises(ValueError, match="already prepared"):
        qat.prepare_qat(fake, "int8")
    with pytest.raises(ValueError, match="not prepared"):
        qat.convert_qat(model)
    with pytest.raises(ValueError, match="already converted"):
        qat.prepare_qat(qat.convert_qat(fake), "int8")


def test_static_act_scales_survive_convert():
    model = tiny_clip().eval()
    images, tokens = tiny_batch(3)
    config = QuantConfig("int8", activation="static", include=("*.mlp.*",), quantize_projections=False)
    fake = qat.prepare_qat(model, config)
    for m in fake.modules():
        if isinstance(m, FakeQuantLinear):
            m.set_act_scale(0.02)
    real = qat.convert_qat(fake)
    scales = [float(m.act_scale) for m in real.modules() if isinstance(m, pyclipq.nn.QuantLinear)]
    assert scales and all(s == pytest.approx(0.02) for s in scales)
    matches = qat.compare_layers(fake, real, lambda m: m(images, tokens))
    assert matches and all(m.ok for m in matches)


def test_differentiable_twin_matches_packed_model_and_passes_gradients():
    model = tiny_clip().eval()
    images, tokens = tiny_batch(4)
    packed = convert(qat.deepcopy_model(model), "int4")
    twin = qat.differentiable_twin(packed)
    with torch.no_grad():
        assert F.cosine_similarity(twin.encode_text(tokens), packed.encode_text(tokens)).min() > 0.9999
    embeddings = twin.token_embedding(tokens).detach().requires_grad_(True)
    from pyclipq.train.prompt import encode_text_embeddings

    encode_text_embeddings(twin, embeddings, tokens).sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in twin.parameters())
    with pytest.raises(ValueError, match="convert it first"):
        qat.differentiable_twin(model)


def test_fake_quant_attention_takes_masks_as_the_packed_one_does():
    """One mask builder for QuantMultiheadAttention and its fake-quant twin: same errors, same hint rule."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    fake = fake_quant_multihead_attention(mha, LayerConfig("int8"), LayerConfig("int8"))
    x = torch.randn(3, 6, 8)
    with pytest.raises(ValueError, match="is_causal=True needs the causal attn_mask"):
        fake(x, x, x, is_causal=True)  # nn.MultiheadAttention's rule: the flag is only a hint
    with pytest.raises(ValueError, match=r"attn_mask 2-D must be \[L, S\] = \[6, 6\]"):
        fake(x, x, x, attn_mask=torch.zeros(6, 7))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, S\]"):
        fake(x, x, x, key_padding_mask=torch.zeros(3, 8, dtype=torch.bool))
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    with torch.no_grad():
        got = fake(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        bool_vs_float = fake(x, x, x, attn_mask=torch.zeros(6, 6).masked_fill(causal, float("-inf")), need_weights=False)[0]
    assert torch.equal(got, bool_vs_float)


def test_qat_entry_points_have_one_public_name():
    """pyclipq.prepare_qat / convert_qat, apart from pyclipq.convert; the old names are retired."""
    import importlib

    import pyclipq

    assert pyclipq.prepare_qat is qat.prepare_qat and pyclipq.convert_qat is qat.convert_qat
    assert pyclipq.convert is not pyclipq.convert_qat
    assert not hasattr(qat, "prepare") and not hasattr(qat, "convert")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pyclipq.qat")


@pytest.mark.parametrize("block", [dict(block_type="custom"), dict(qk_norm=True, scale_heads=True, scale_attn=True)])
def test_qat_covers_open_clip_custom_attention_as_convert_does(block):
    """open_clip's own Attention class: prepare_qat swaps it (the module convert builds, fake-quant
    projections sharing the Parameters), strip puts the original back, convert_qat packs it."""
    from clip_builders import sample_inputs, small_open_clip
    from pyclipq.nn import QuantOpenClipAttention

    model = small_open_clip(**block)
    images, tokens = sample_inputs()
    fake = qat.prepare_qat(model, "int8")
    attentions = [m for m in fake.modules() if isinstance(m, QuantOpenClipAttention)]
    assert attentions and all(isinstance(a.in_proj, FakeQuantLinear) for a in attentions)
    # the latent weights are the float model's Parameters: training them trains the model
    assert attentions[0].in_proj.weight is attentions[0].float_module.in_proj_weight
    loss = fake(images, tokens)[0].square().sum()
    loss.backward()
    assert attentions[0].in_proj.weight.grad is not None and attentions[0].in_proj.weight.grad.abs().sum() > 0
    stripped = qat.strip(fake)
    assert not any(isinstance(m, QuantOpenClipAttention) for m in stripped.modules())
    with torch.no_grad():
        torch.testing.assert_close(stripped(images, tokens)[0], model(images, tokens)[0])
    real = qat.convert_qat(fake)
    matches = qat.compare_layers(fake, real, lambda m: m(images, tokens))
    assert matches and all(m.ok for m in matches), [m for m in matches if not m.ok]
    assert {m.name for m in matches} >= {n for n, m in real.named_modules()
                                        if isinstance(m, pyclipq.nn.QuantLinear) and n.endswith("attn.in_proj")}
    # and a converted model with it has a differentiable twin (P4Q trains on top of one)
    twin = qat.differentiable_twin(real)
    x = images.clone().requires_grad_(True)
    twin.encode_image(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- learned scales (LSQ)


def weight_off_its_rule_scale(layer: LayerConfig):
    """(format, a random [12, 100] weight, scales 0.6-1.6x its rule's, each weight's own scale [12, 100])."""
    torch.manual_seed(0)
    fmt = formats.get_format(layer.format)
    weight = torch.randn(12, 100)
    scale = primitives.format_scales(weight, fmt, layer.group_size, layer.threshold_rule) * (0.6 + torch.rand(1))
    k_pad = formats.padded_k(100)
    per_weight_scale = (scale[:, :, None].expand(-1, -1, k_pad // scale.shape[1]).reshape(12, k_pad)[:, :100]
                        if scale.dim() == 2 else scale[:, None].expand(-1, 100))
    return fmt, weight, scale, per_weight_scale


@pytest.mark.parametrize("layer", LAYERS[:5], ids=IDS[:5])
def test_learnable_fake_quantize_has_the_values_and_lsq_gradients(layer):
    fmt, weight, scale, per_weight_scale = weight_off_its_rule_scale(layer)
    w = weight.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True)
    out = primitives.learnable_fake_quantize(w, fmt, s, layer.group_size)
    assert torch.equal(out, primitives.fake_quantize_with_scales(weight, fmt, scale, layer.group_size))
    g = torch.randn_like(out)
    (out * g).sum().backward()
    # LSQ: d/dw = 1 where the level is not clamped, else 0; d/ds = level - w/s inside, the level outside
    k_pad = formats.padded_k(100)
    groups = scale.shape[1] if scale.dim() == 2 else 1
    ratio = weight / per_weight_scale
    levels = primitives.nearest_levels(ratio, fmt)
    inside = ratio.abs() <= fmt.qmax
    torch.testing.assert_close(w.grad, g * inside)
    per_weight = g * (levels - inside * ratio)
    expected = (F.pad(per_weight, (0, k_pad - 100)).view(12, groups, -1).sum(-1) if scale.dim() == 2
                else per_weight.sum(1))
    torch.testing.assert_close(s.grad, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="scale must have shape"):
        primitives.learnable_fake_quantize(weight, fmt, scale.reshape(-1)[:5], layer.group_size)


@pytest.mark.parametrize("layer", LAYERS[:5], ids=IDS[:5])
def test_grid_distance_is_the_mean_squared_distance_to_the_levels_in_scale_units(layer):
    fmt, weight, scale, per_weight_scale = weight_off_its_rule_scale(layer)
    # by hand: the dequantized weight is level x scale, so (w - dequantized) / scale = w / s - level
    offset = (weight - primitives.fake_quantize_with_scales(weight, fmt, scale, layer.group_size)) / per_weight_scale
    w = weight.clone().requires_grad_(True)
    distance = primitives.grid_distance(w, fmt, scale, layer.group_size)
    torch.testing.assert_close(distance, offset.square().mean())
    distance.backward()  # d/dw (w / s - level)^2 / numel, the level and the scale held
    torch.testing.assert_close(w.grad, 2 * offset / per_weight_scale / weight.numel())
    on_grid = primitives.fake_quantize_with_scales(weight, fmt, scale, layer.group_size)
    assert float(primitives.grid_distance(on_grid, fmt, scale, layer.group_size)) < 1e-10
    with pytest.raises(ValueError, match="scale must have shape"):
        primitives.grid_distance(weight, fmt, scale.reshape(-1)[:5], layer.group_size)


@pytest.mark.parametrize("preset", ["ternary-qall", "int4"])
def test_a_fake_quant_layers_grid_distance_is_that_of_the_weight_it_quantizes(preset):
    model = tiny_clip().eval()
    fake = qat.prepare_qat(model, QuantConfig.preset(preset, rotation=32), exact=False, learn_scales=preset == "int4")
    layers = [m for m in fake.modules() if isinstance(m, FakeQuantLinear) and not m.layer.is_float]
    assert layers and all(m.rotation_block > 1 for m in layers)
    for m in layers:
        group_size = m.layer.group_size if m.layer.spec.grouped else 0
        stored = m.stored_weight().detach()
        scale = m.learned_scale() if m.log_scale is not None else primitives.format_scales(stored, m.layer.spec, group_size)
        want = primitives.grid_distance(stored, m.layer.spec, scale, group_size)
        torch.testing.assert_close(m.grid_distance(), want)
    total = qat.grid_distance(fake)
    torch.testing.assert_close(total, torch.stack([m.grid_distance() for m in layers]).mean())
    total.backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in layers)
    with pytest.raises(ValueError, match="prepared for QAT"):
        qat.grid_distance(model)
    nothing_quantized = qat.prepare_qat(model, QuantConfig.preset(preset, exclude=("*",)), exact=False)
    with pytest.raises(ValueError, match="no quantized FakeQuantLinear whose latent weight trains"):
        qat.grid_distance(nothing_quantized)


@pytest.mark.parametrize("preset", ["ternary-qall", "int2", "int4"])
def test_learned_scales_train_and_convert_to_the_same_codes(preset):
    model = tiny_clip().eval()
    images, tokens = tiny_batch(6)
    rule = qat.prepare_qat(model, preset, exact=False)
    fake = qat.prepare_qat(model, preset, exact=False, learn_scales=True)
    learners = [m for m in fake.modules() if isinstance(m, FakeQuantLinear) and m.log_scale is not None]
    assert learners and all(not m.layer.is_float for m in learners)
    with torch.no_grad():  # the learned scales start at the format rule's
        for a, b in zip(rule(images, tokens)[:2], fake(images, tokens)[:2]):
            torch.testing.assert_close(a, b)
    fake.train()
    loss = sum(out.pow(2).mean() for out in fake(images, tokens)[:2])
    loss.backward()
    assert all(m.log_scale.grad is not None and m.log_scale.grad.abs().sum() > 0 for m in learners)
    with torch.no_grad():  # move every scale away from the rule's, as training does
        for i, m in enumerate(learners):
            m.log_scale.add_(0.3 * torch.sin(torch.arange(m.log_scale.numel()).view_as(m.log_scale) + i))
    fake.eval()
    real = qat.convert_qat(fake)
    matches = qat.compare_layers(fake, real, lambda m: m(images, tokens))
    assert matches and all(m.ok for m in matches), [m for m in matches if not m.ok]
    for name, module in real.named_modules():
        if isinstance(module, pyclipq.nn.QuantLinear) and not module.layer.is_float:
            twin = fake.get_submodule(name)
            assert torch.equal(module.weight_scale, twin.learned_scale().detach()), name
            assert torch.equal(module.dequantize_weight(torch.float32), twin.quantized_weight().dequantize()), name
    with torch.no_grad():
        for a, b in zip(fake(images, tokens)[:2], real(images, tokens)[:2]):
            assert F.cosine_similarity(a, b, dim=-1).min() > 0.9999


def test_learned_scale_errors():
    model = tiny_clip().eval()
    with pytest.raises(ValueError, match="learn_scales=True needs exact=False"):
        qat.prepare_qat(model, "ternary-qall", learn_scales=True)
    with pytest.raises(ValueError, match="learn_scales needs a quantized layer and the float fake-quant path"):
        FakeQuantLinear(8, 4, layer=LayerConfig("ternary"), exact=True, learn_scales=True)
    with pytest.raises(ValueError, match="learn_scales needs a quantized layer"):
        FakeQuantLinear(8, 4, layer=LayerConfig("float"), exact=False, learn_scales=True)
    made = FakeQuantLinear(100, 6, layer=LayerConfig("int2", 64), exact=False, learn_scales=True)
    assert made.log_scale.shape == (6, 2) and "learn_scales" in repr(made)
    torch.testing.assert_close(made.learned_scale().detach(), primitives.format_scales(made.weight, "int2", 64))
    with pytest.raises(ValueError, match="does not learn its scales"):
        FakeQuantLinear(8, 4, layer=LayerConfig("ternary"), exact=False).reset_scales_()
