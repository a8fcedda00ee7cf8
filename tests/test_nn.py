"""pyclipq.nn: QuantLinear vs the reference ops, QuantMultiheadAttention vs nn.MultiheadAttention,
QuantEmbedding and PackedParameter vs their dequantized tables."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import linear_tolerance, reference_accumulators
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from pyclipq import formats, ops, primitives
from pyclipq.configs import FLOAT_LAYER, LayerConfig
from pyclipq.nn import PackedParameter, PatchConv2d, QuantEmbedding, QuantLinear, QuantMultiheadAttention
from pyclipq.nn.parameter import quantize_parameter_
from pyclipq.ops import reference

FORMAT_GROUPS = [("int8", 0), ("int4", 32), ("int4", 128), ("int4", 0), ("int2", 64), ("int2", 0), ("ternary", 0)]


def reference_linear(layer: QuantLinear, x: torch.Tensor, act_scale=None) -> torch.Tensor:
    fmt = layer.layer.format
    grouped = (layer.layer.group_size,) if fmt in ("int4", "int2") else ()
    op = getattr(reference, f"{fmt}_linear")
    return op(x, layer.packed_weight, layer.weight_scale, *grouped, layer.bias, act_scale)


def assert_matches_reference(layer: QuantLinear, x: torch.Tensor, act_scale=None):
    got = layer(x)
    expected = reference_linear(layer, x, act_scale)
    acc, x_scale = reference_accumulators(layer.layer.format, x, layer.packed_weight, layer.layer.group_size, act_scale)
    tol = linear_tolerance(x, acc, x_scale, layer.weight_scale, layer.bias, layer.out_features)
    assert got.dtype == x.dtype and got.shape == expected.shape
    err = (got.to(torch.float64) - expected.to(torch.float64)).abs().reshape(tol.shape)
    assert (err <= tol).all(), f"max error {err.max().item():.3g} above tolerance"


def float_linear(k: int, n: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


# ------------------------------------------------------------------ QuantLinear


@pytest.mark.parametrize("fmt, group_size", FORMAT_GROUPS)
@pytest.mark.parametrize("k, bias", [(1, True), (77, False), (300, True)])
def test_quant_linear_matches_reference_op(fmt, group_size, k, bias):
    layer = QuantLinear.from_float(float_linear(k, 24, bias), LayerConfig(fmt, group_size))
    x = torch.randn(2, 5, k, generator=torch.Generator().manual_seed(1))
    assert_matches_reference(layer, x)


@settings(max_examples=20, deadline=None)
@given(
    fmt_group=st.sampled_from(FORMAT_GROUPS),
    m=st.integers(1, 9),
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**16),
)
def test_quant_linear_matches_reference_for_any_shape(fmt_group, m, n, k, seed):
    fmt, group_size = fmt_group
    layer = QuantLinear.from_float(float_linear(k, n, seed=seed), LayerConfig(fmt, group_size))
    assert_matches_reference(layer, torch.randn(m, k, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("fmt, group_size", [("int8", 0), ("int4", 64), ("ternary", 0)])
def test_quant_linear_keeps_a_bfloat16_input_dtype(fmt, group_size):
    layer = QuantLinear.from_float(float_linear(96, 16), LayerConfig(fmt, group_size))
    assert_matches_reference(layer, torch.randn(3, 96).to(torch.bfloat16))


@pytest.mark.parametrize("fmt, group_size", FORMAT_GROUPS)
def test_weight_only_layer_is_f_linear_with_the_dequantized_weight(fmt, group_size):
    linear = float_linear(200, 20)
    layer = QuantLinear.from_float(linear, LayerConfig(fmt, group_size, activation="none"))
    codes, scale = primitives.quantize_weight(linear.weight, fmt, group_size)
    weight = primitives.dequantize_codes(codes, scale, fmt, 200)
    x = torch.randn(4, 200)
    assert torch.equal(layer(x), F.linear(x, weight, linear.bias))
    assert torch.equal(layer.dequantize_weight(), weight)




@pytest.mark.parametrize("fmt,group_size", [("int8", 0), ("ternary", 0), ("int4", 128), ("int2", 64)])
def test_quant_linear_keeps_the_tile_layout_in_step(fmt, group_size, tmp_path):
    """Where the CPU table reads the tile layout for the format (AMX: every format, AVX-512 VNNI:
    int8) the layer builds it once from its weight,
    rebuilds it when the weight is written in place, loaded or moved, and never saves it; outputs
    equal the op on the compute layout alone. Elsewhere it keeps none."""
    torch.manual_seed(0)
    w, b = torch.randn(40, 200), torch.randn(40)
    layer = QuantLinear.from_weight(w, b, LayerConfig(fmt, group_size))
    spec = formats.get_format(fmt)
    x = torch.randn(33, 200)

    def expected(module):
        args = (module.packed_weight, module.weight_scale) + ((group_size,) if spec.grouped else ())
        return getattr(ops, f"{fmt}_linear")(x, *args, module.bias)

    if not ops.cpu_reads_tile_layout(fmt):
        assert layer.tile_weight is None and torch.equal(layer(x), expected(layer))
        return
    assert torch.equal(layer.tile_weight, formats.tile_layout(layer.packed_weight, spec))
    assert torch.equal(layer(x), expected(layer))
    assert "tile_weight" not in layer.state_dict()
    # an in-place write to the weight (calibration does this) is seen at the next call
    other = QuantLinear.from_weight(torch.randn(40, 200), b, LayerConfig(fmt, group_size))
    with torch.no_grad():
        layer.packed_weight.copy_(other.packed_weight)
        layer.weight_scale.copy_(other.weight_scale)
    assert torch.equal(layer(x), expected(other))
    assert torch.equal(layer.tile_weight, other.tile_weight)
    # load_state_dict, deepcopy and a round trip through another device type keep it right
    fresh = QuantLinear.from_weight(torch.randn(40, 200), b, LayerConfig(fmt, group_size))
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.tile_weight, layer.tile_weight) and torch.equal(fresh(x), layer(x))
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    on_meta = copy.deepcopy(layer).to("meta")
    assert on_meta.tile_weight is None
    # q, k, v rows of a packed in_proj: whole panels of 16 use the tile layout's rows
    assert torch.equal(layer.forward_rows(x, 16, 32), expected(layer)[:, 16:32])
    assert torch.equal(layer.forward_rows(x, 8, 24), expected(layer)[:, 8:24])


@pytest.mark.skipif(not ops.cpu_reads_tile_layout("int8"),
                    reason="this CPU's kernel table reads no int8 tile layout (the AMX and AVX-512 VNNI tables do)")
def test_quant_linear_tile_layout_under_torch_compile():
    torch.manual_seed(1)
    layer = QuantLinear.from_weight(torch.randn(48, 128), torch.randn(48), LayerConfig("int8"))
    x = torch.randn(20, 128)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))


def test_passthrough_layer_equals_the_float_linear():
    linear = float_linear(70, 30)
    layer = QuantLinear.from_float(linear, FLOAT_LAYER)
    x = torch.randn(3, 70)
    assert torch.equal(layer(x), linear(x))


def test_forward_rows_equals_a_slice_of_the_full_output():
    layer = QuantLinear.from_float(float_linear(64, 48), LayerConfig("int4", 32))
    x = torch.randn(5, 64)
    assert torch.allclose(layer.forward_rows(x, 16, 32), layer(x)[:, 16:32], rtol=1e-6, atol=1e-6)


def test_static_layer_refuses_to_run_before_calibration():
    layer = QuantLinear.from_float(float_linear(32, 8), LayerConfig("int8", activation="static"))
    layer.layer_name = "blocks.0.mlp.c_fc"
    with pytest.raises(RuntimeError, match="blocks.0.mlp.c_fc uses activation='static' but its act_scale is not calibrated"):
        layer(torch.randn(2, 32))


@pytest.mark.parametrize("fmt, group_size", [("int8", 0), ("int2", 32), ("ternary", 0)])
def test_static_layer_uses_its_calibrated_scale(fmt, group_size):
    layer = QuantLinear.from_float(float_linear(160, 12), LayerConfig(fmt, group_size, activation="static"))
    layer.set_act_scale(0.02)
    assert_matches_reference(layer, torch.randn(4, 160), act_scale=torch.tensor(0.02))


def test_static_scale_restored_from_a_state_dict_enables_the_layer():
    calibrated = QuantLinear.from_float(float_linear(32, 8), LayerConfig("int8", activation="static"))
    calibrated.set_act_scale(0.05)
    fresh = QuantLinear(32, 8, layer=LayerConfig("int8", activation="static"))
    fresh.load_state_dict(calibrated.state_dict())
    x = torch.randn(2, 32)
    assert torch.equal(fresh(x), calibrated(x))


def test_set_act_scale_rejects_bad_scales_and_dynamic_layers():
    static = QuantLinear.from_float(float_linear(32, 8), LayerConfig("int8", activation="static"))
    for bad in (0.0, -1.0, float("nan"), [0.1, 0.2]):
        with pytest.raises(ValueError, match="scale must be one finite positive number"):
            static.set_act_scale(bad)
    dynamic = QuantLinear.from_float(float_linear(32, 8), LayerConfig("int8"))
    with pytest.raises(ValueError, match="set_act_scale needs activation='static'"):
        dynamic.set_act_scale(0.1)


def test_half_precision_moves_bias_but_keeps_scales_float32_and_unrounded():
    layer = QuantLinear.from_float(float_linear(64, 16), LayerConfig("int4", 32))
    scale = layer.weight_scale.clone()
    layer.half()
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.float16
    assert layer.int8_original_dtype == torch.float16
    layer.float()
    assert layer.int8_original_dtype == torch.float32



@pytest.mark.parametrize("fmt", ["int8", "ternary", "float"])
def test_quant_linear_refuses_inputs_of_another_width(fmt):
    """700 features pad to the same K block as 768: the layer, not the op, must refuse them (as nn.Linear does)."""
    layer = QuantLinear.from_float(nn.Linear(768, 512), LayerConfig(fmt))
    with pytest.raises(ValueError, match=r"x must have in_features = 768 features in its last dimension, got shape \[2, 700\]"):
        layer(torch.randn(2, 700))
    assert layer(torch.randn(2, 768)).shape == (2, 512)


def test_from_float_rejects_non_linears_and_bad_layer_configs():
    with pytest.raises(ValueError, match="linear must be a torch.nn.Linear"):
        QuantLinear.from_float(nn.Conv1d(3, 3, 1), LayerConfig("int8"))
    with pytest.raises(ValueError, match="layer must be a pyclipq.configs.LayerConfig"):
        QuantLinear(8, 8, layer="int8")


def test_extra_repr_names_the_format_and_mode():
    layer = QuantLinear.from_float(float_linear(64, 16), LayerConfig("int4", 32))
    assert repr(layer) == (
        "QuantLinear(in_features=64, out_features=16, bias=True, format=int4, group_size=32, activation=dynamic)"
    )


# ------------------------------------------------------------------ QuantMultiheadAttention

EMBED, HEADS, L, S, B = 32, 4, 6, 5, 3


def float_mha(batch_first: bool, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha


def passthrough(mha: nn.MultiheadAttention) -> QuantMultiheadAttention:
    return QuantMultiheadAttention.from_float(mha, FLOAT_LAYER, FLOAT_LAYER).eval()


def masks(kind: str, g: torch.Generator):
    attn = torch.rand(L, S, generator=g) < 0.3
    attn[:, 0] = False  # every query keeps one key, so no row is all -inf
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, -2:] = True
    if kind == "none":
        return {}
    if kind == "bool_attn":
        return {"attn_mask": attn}
    if kind == "float_attn":
        return {"attn_mask": torch.randn(L, S, generator=g)}
    if kind == "attn_3d":
        return {"attn_mask": torch.randn(B * HEADS, L, S, generator=g)}
    if kind == "bool_padding":
        return {"key_padding_mask": padding}
    if kind == "float_padding":
        return {"key_padding_mask": torch.randn(B, S, generator=g)}
    return {"attn_mask": attn, "key_padding_mask": padding}  # "both"


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "bool_attn", "float_attn", "attn_3d", "bool_padding", "float_padding", "both"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_passthrough_attention_matches_nn_multihead_attention(batch_first, mask_kind, need_weights):
    mha = float_mha(batch_first)
    g = torch.Generator().manual_seed(2)
    shape_q = (B, L, EMBED) if batch_first else (L, B, EMBED)
    shape_kv = (B, S, EMBED) if batch_first else (S, B, EMBED)
    query, key = torch.randn(shape_q, generator=g), torch.randn(shape_kv, generator=g)
    value = torch.randn(shape_kv, generator=g)
    # per-head weights where they are asked for; averaged ones are checked on unbatched input below
    kwargs = dict(need_weights=need_weights, average_attn_weights=False, **masks(mask_kind, g))
    with torch.no_grad():
        expected, expected_weights = mha(query, key, value, **kwargs)
        got, weights = passthrough(mha)(query, key, value, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-5)
    else:
        assert weights is None and expected_weights is None


@pytest.mark.parametrize("batch_first", [True, False])
def test_passthrough_self_attention_with_a_causal_mask_matches(batch_first):
    mha = float_mha(batch_first)
    x = torch.randn((B, L, EMBED) if batch_first else (L, B, EMBED))
    causal = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)[0]
        got = passthrough(mha)(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_passthrough_attention_on_unbatched_input_matches():
    mha = float_mha(batch_first=False)
    x, padding = torch.randn(L, EMBED), torch.tensor([False] * (L - 1) + [True])
    with torch.no_grad():
        expected = mha(x, x, x, key_padding_mask=padding)
        got = passthrough(mha)(x, x, x, key_padding_mask=padding)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def reference_attention(module: QuantMultiheadAttention, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    """Batch-first self-attention composed from the reference ops (int8 in_proj and out_proj)."""
    qkv = reference.int8_linear(x, module.in_proj.packed_weight, module.in_proj.weight_scale, module.in_proj.bias)
    heads = [t.reshape(B, L, HEADS, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]
    out = F.scaled_dot_product_attention(*heads, attn_mask=attn_mask)
    out = out.transpose(1, 2).reshape(B, L, EMBED)
    return reference.int8_linear(out, module.out_proj.packed_weight, module.out_proj.weight_scale, module.out_proj.bias)


def test_quantized_attention_matches_the_reference_ops_composition():
    int8 = LayerConfig("int8")
    module = QuantMultiheadAttention.from_float(float_mha(batch_first=True), int8, int8).eval()
    x = torch.randn(B, L, EMBED)
    causal = torch.triu(torch.full((L, L), float("-inf")), diagonal=1)
    with torch.no_grad():
        got = module(x, x, x, need_weights=False, attn_mask=causal)[0]
    torch.testing.assert_close(got, reference_attention(module, x, causal), rtol=1e-5, atol=1e-5)


def test_cross_attention_projects_q_k_v_with_their_own_rows():
    ternary = LayerConfig("ternary")
    module = QuantMultiheadAttention.from_float(float_mha(batch_first=True), ternary, ternary).eval()
    x = torch.randn(B, L, EMBED)
    with torch.no_grad():
        fused = module(x, x, x, need_weights=False)[0]  # one in_proj call for q, k and v
        split = module(x, x.clone(), x.clone(), need_weights=False)[0]  # three row-slice calls
    torch.testing.assert_close(split, fused, rtol=1e-6, atol=1e-6)


def test_attention_with_one_float_projection_keeps_it_exact():
    mha = float_mha(batch_first=True)
    module = QuantMultiheadAttention.from_float(mha, LayerConfig("int8"), FLOAT_LAYER)
    assert torch.equal(module.out_proj.weight, mha.out_proj.weight)
    assert module.in_proj.layer.format == "int8"


def test_attention_mask_errors_name_the_argument_and_shape():
    module = passthrough(float_mha(batch_first=True))
    x = torch.randn(B, L, EMBED)
    with pytest.raises(ValueError, match=r"attn_mask 2-D must be \[L, S\] = \[6, 6\]"):
        module(x, x, x, attn_mask=torch.zeros(L, L + 1))
    with pytest.raises(ValueError, match=r"attn_mask 3-D must be \[B\*num_heads, L, S\]"):
        module(x, x, x, attn_mask=torch.zeros(B, L, L))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, S\]"):
        module(x, x, x, key_padding_mask=torch.zeros(B, L + 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be a bool or floating-point tensor"):
        module(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="is_causal=True needs the causal attn_mask"):
        module(x, x, x, is_causal=True)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(kdim=16, vdim=16), "kdim/vdim differ"),
        (dict(add_bias_kv=True), "add_bias_kv=True"),
        (dict(add_zero_attn=True), "add_zero_attn=True"),
    ],
)
def test_unsupported_attention_variants_are_refused_with_the_reason(kwargs, reason):
    with pytest.raises(ValueError, match=f"cannot replace this nn.MultiheadAttention: {reason}"):
        QuantMultiheadAttention.from_float(nn.MultiheadAttention(EMBED, HEADS, **kwargs), FLOAT_LAYER, FLOAT_LAYER)


# ------------------------------------------------------------------ QuantEmbedding, PackedParameter


@pytest.mark.parametrize("fmt, group_size", FORMAT_GROUPS)
def test_embedding_lookup_equals_rows_of_the_dequantized_table(fmt, group_size):
    torch.manual_seed(0)
    table = nn.Embedding(50, 72)
    module = QuantEmbedding.from_float(table, LayerConfig(fmt, group_size))
    codes, scale = primitives.quantize_weight(table.weight, fmt, group_size)
    dequantized = primitives.dequantize_codes(codes, scale, fmt, 72)
    ids = torch.randint(0, 50, (3, 11))
    assert torch.equal(module(ids), F.embedding(ids, dequantized))
    assert module.layer.activation == "none"


def test_passthrough_embedding_equals_the_original():
    table = nn.Embedding(20, 8)
    ids = torch.randint(0, 20, (4, 5))
    assert torch.equal(QuantEmbedding.from_float(table, FLOAT_LAYER)(ids), table(ids))


def test_embedding_with_max_norm_is_refused():
    with pytest.raises(ValueError, match="max_norm=1.0"):
        QuantEmbedding.from_float(nn.Embedding(10, 4, max_norm=1.0), LayerConfig("int8"))


class Projector(nn.Module):
    """A model that uses a bare Parameter as `x @ proj`, like CLIP's projections."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(40, 24))

    def forward(self, x):
        return x @ self.proj


@pytest.mark.parametrize("fmt, group_size", [("int8", 0), ("int4", 32), ("ternary", 0)])
def test_packed_projection_parameter_reads_back_its_dequantized_value(fmt, group_size):
    torch.manual_seed(0)
    model = Projector()
    original = model.proj.detach().clone()
    quantize_parameter_(model, "proj", PackedParameter.from_float(model.proj, "in_out", LayerConfig(fmt, group_size)))
    # Each output column of P is one output channel of the format.
    codes, scale = primitives.quantize_weight(original.t(), fmt, group_size)
    expected = primitives.dequantize_codes(codes, scale, fmt, 40).t()
    assert torch.equal(model.proj, expected)
    x = torch.randn(3, 40)
    assert torch.equal(model(x), x @ expected)
    assert parametrize.is_parametrized(model, "proj")
    assert model.parametrizations.proj.original.numel() == 0  # no float copy kept


def test_packed_parameter_is_dequantized_once_for_inference_and_follows_buffer_writes():
    torch.manual_seed(0)
    model = Projector()
    packed = PackedParameter.from_float(model.proj, "in_out", LayerConfig("int4", 32))
    quantize_parameter_(model, "proj", packed)
    with torch.inference_mode():
        first = model.proj
        assert model.proj is first  # no second dequantization
    with torch.no_grad():
        assert model.proj is not first and torch.equal(model.proj, first)  # another mode, same value
        again = model.proj
        # a write into the packed buffers (e.g. load_state_dict) must show through
        packed.weight_scale.mul_(2)
        assert torch.equal(model.proj, 2 * again)
        packed.packed_weight.zero_()
        assert torch.equal(model.proj, primitives.dequantize_codes(
            torch.zeros(24, 128, dtype=torch.uint8), packed.weight_scale, "int4", 40).t())
    model.double()
    with torch.no_grad():
        assert model.proj.dtype == torch.float64
    # with autograd on it is recomputed on every access (no tensor outlives a graph)
    assert model.proj is not model.proj


def test_packed_conv_weight_keeps_its_shape_and_follows_the_model_dtype():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, kernel_size=4, stride=4, bias=False)
    reference_conv = copy.deepcopy(conv)
    quantize_parameter_(conv, "weight", PackedParameter.from_float(conv.weight, "out_rows", LayerConfig("int8")))
    assert conv.weight.shape == (16, 3, 4, 4)
    codes, scale = primitives.quantize_weight(reference_conv.weight.reshape(16, -1), "int8")
    assert torch.equal(conv.weight, primitives.dequantize_codes(codes, scale, "int8", 48).reshape(16, 3, 4, 4))
    conv.half()
    assert conv.weight.dtype == torch.float16


def test_packed_parameter_refuses_a_shape_mismatch():
    model = Projector()
    packed = PackedParameter.from_float(torch.randn(8, 8), "in_out", LayerConfig("int8"))
    with pytest.raises(ValueError, match=r"Projector.proj must be a tensor of shape \[8, 8\]"):
        quantize_parameter_(model, "proj", packed)
    with pytest.raises(ValueError, match="layout must be one of"):
        PackedParameter.from_float(torch.randn(8, 8), "columns", LayerConfig("int8"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_quant_linear_moves_to_cuda_and_matches_the_cpu_result():
    layer = QuantLinear.from_float(float_linear(256, 64), LayerConfig("int4", 64))
    x = torch.randn(8, 256)
    cpu = layer(x)
    layer.cuda()
    assert layer.packed_weight.is_cuda and layer.weight_scale.dtype == torch.float32
    torch.testing.assert_close(layer(x.cuda()).cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, size, kernel, bias", [(1, 32, 8, False), (3, 30, 8, True), (2, 28, (4, 7), False)])
def test_patch_conv_is_the_strided_convolution(batch, size, kernel, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, kernel_size=kernel, stride=kernel, bias=bias)
    reference = copy.deepcopy(conv)
    assert PatchConv2d.swap_in_(conv) and isinstance(conv, PatchConv2d)
    assert conv.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(batch, 3, size, size + 3)  # ragged: rows/columns past the last whole patch
    got, expected = conv(x), reference(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(conv(x[0]), reference(x[0]))  # unbatched input takes the convolution itself


def test_patch_conv_swaps_only_non_overlapping_convolutions():
    for conv in (nn.Conv2d(3, 8, 3, stride=1), nn.Conv2d(3, 8, 4, stride=4, padding=1),
                 nn.Conv2d(4, 8, 2, stride=2, groups=2), nn.Conv2d(3, 8, 2, stride=2, dilation=2)):
        assert not PatchConv2d.swap_in_(conv) and type(conv) is nn.Conv2d
    conv = nn.Conv2d(3, 8, 4, stride=4)
    with pytest.raises(RuntimeError, match="expected input.*to have 3 channels"):
        PatchConv2d.swap_in_(conv) and conv(torch.randn(1, 5, 8, 8))
