"""The swap registry (pyclipq.transform): each kind's facts, the projection factories, the errors."""
import pytest
import torch
from torch import nn

from pyclipq import prepare_qat
from pyclipq.configs import FLOAT_LAYER, LayerConfig
from pyclipq.nn import QuantLinear, QuantMultiheadAttention
from pyclipq.train.fake_quant import FakeQuantLinear
from pyclipq.train.qat import FakeQuantProjections, strip
from pyclipq.transform import (
    BUILDERS,
    PackedProjections,
    QATHandlers,
    Target,
    TargetError,
    apply_target,
    float_weight_of_layer,
    float_weights,
    register_qat_handlers,
    subtarget,
    targets_in_model,
)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 32)
        self.embed = nn.Embedding(10, 16)

    def forward(self, tokens):
        x = self.embed(tokens)
        return self.fc(x + self.attn(x, x, x, need_weights=False)[0])


def test_every_kind_states_its_sub_layers_and_float_weights():
    block = Block()
    attention = subtarget("attn", "multihead_attention", {"in_proj": LayerConfig("int8")},
                          {"in_proj": "attn_qkv", "out_proj": "attn_out"})
    assert attention.layers == {"in_proj": LayerConfig("int8"), "out_proj": FLOAT_LAYER}
    assert attention.linears == {"in_proj": 3} and attention.linear_count("out_proj") == 1
    weights = float_weights(block, attention)
    assert weights["in_proj"][0] is block.attn.in_proj_weight and weights["out_proj"][1] is block.attn.out_proj.bias
    assert float_weights(block, Target("fc", "linear", {"": LayerConfig("int8")}, {"": "mlp"}))[""][0] is block.fc.weight
    for kind, builder in BUILDERS.items():
        assert builder.sub_layers, kind


def test_the_float_weight_behind_each_converted_layer_is_found_by_kind():
    block = Block()
    assert float_weight_of_layer(block, "attn.in_proj") is block.attn.in_proj_weight
    assert float_weight_of_layer(block, "attn.out_proj") is block.attn.out_proj.weight
    assert float_weight_of_layer(block, "fc") is block.fc.weight
    assert float_weight_of_layer(block, "attn.nothing") is None and float_weight_of_layer(block, "missing") is None


def test_packed_projections_build_what_convert_builds_and_targets_read_back():
    block = Block().eval()
    target = subtarget("attn", "multihead_attention", {"in_proj": LayerConfig("int8"), "out_proj": LayerConfig("int4", 32)},
                       {"in_proj": "attn_qkv", "out_proj": "attn_out"})
    apply_target(block, target)
    assert isinstance(block.attn, QuantMultiheadAttention) and not block.attn.training
    assert block.attn.in_proj.layer_name == "attn.in_proj" and block.attn.out_proj.kind == "attn_out"
    assert not hasattr(block.attn, "float_module")  # convert keeps no float copy
    assert targets_in_model(block) == [target]
    empty = Block()
    apply_target(empty, target, quantize=False)
    assert isinstance(empty.attn.in_proj, QuantLinear) and empty.attn.in_proj.layer.format == "int8"


def test_qat_builds_projection_kinds_with_the_same_builders_and_strips_back_to_the_originals():
    block = Block()
    original_fc, original_attn = block.fc, block.attn
    target = Target("fc", "linear", {"": LayerConfig("ternary")}, {"": "mlp"})
    apply_target(block, target, projections=FakeQuantProjections(exact=True))
    assert isinstance(block.fc, FakeQuantLinear) and block.fc.weight is original_fc.weight
    assert block.fc.float_module is original_fc
    prepared = prepare_qat(Block(), "int8")
    assert isinstance(prepared.attn.in_proj, FakeQuantLinear) and isinstance(prepared.fc, FakeQuantLinear)
    stripped = strip(prepared)
    assert type(stripped.fc) is nn.Linear and type(stripped.attn) is nn.MultiheadAttention
    assert type(original_attn) is nn.MultiheadAttention


def test_registry_errors_name_the_problem():
    block = Block()
    with pytest.raises(TargetError, match="unknown conversion target kind 'conv'"):
        apply_target(block, Target("fc", "conv", {"": LayerConfig("int8")}, {"": "linear"}))
    with pytest.raises(TargetError, match="'embed' must be torch.nn.Linear, the model has Embedding"):
        apply_target(block, Target("embed", "linear", {"": LayerConfig("int8")}, {"": "linear"}))
    with pytest.raises(TargetError, match="the model has no module 'nowhere'"):
        apply_target(block, Target("nowhere.fc", "linear", {"": LayerConfig("int8")}, {"": "linear"}))
    handlers = QATHandlers(lambda *a: None, lambda *a: None)
    with pytest.raises(ValueError, match="'linear' computes with projections"):
        register_qat_handlers("linear", handlers)
    with pytest.raises(ValueError, match="target kind 'conv' has no builder"):
        register_qat_handlers("conv", handlers)
    assert PackedProjections().quantize and not PackedProjections().keeps_float
