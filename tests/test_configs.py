"""QuantConfig / LayerConfig: presets, validation errors that name the valid choices, round trips."""
from __future__ import annotations

import dataclasses

import pytest

from pyclipq import formats
from pyclipq.configs import (
    ACTIVATION_MODES,
    CONFIG_VERSION,
    FLOAT_FORMAT,
    PRESETS,
    WEIGHT_FORMATS,
    LayerConfig,
    QuantConfig,
    resolve_config,
)


@pytest.mark.parametrize(
    "name, fmt, group_size, activation",
    [
        ("int8", "int8", 0, "dynamic"),
        ("int4", "int4", 128, "dynamic"),
        ("int2", "int2", 64, "dynamic"),
        ("ternary", "ternary", 0, "dynamic"),
        ("int8-weight-only", "int8", 0, "none"),
        ("passthrough", FLOAT_FORMAT, 0, "none"),
    ],
)
def test_string_aliases_resolve_to_their_default_configs(name, fmt, group_size, activation):
    config = resolve_config(name)
    assert (config.format, config.group_size, config.activation) == (fmt, group_size, activation)
    assert config.version == CONFIG_VERSION


def test_ternary_qffn_selects_only_mlp_layers_and_no_projections():
    qffn = PRESETS["ternary-qffn"]
    assert qffn.format == "ternary" and not qffn.quantize_projections
    assert qffn.selects("visual.transformer.resblocks.3.mlp.c_fc")
    assert qffn.selects("text_model.encoder.layers.0.mlp.fc2")
    assert not qffn.selects("visual.transformer.resblocks.3.attn.in_proj")
    assert not qffn.selects("vision_model.encoder.layers.0.self_attn.q_proj")


def test_ternary_qall_selects_attention_and_projections():
    qall = PRESETS["ternary-qall"]
    assert qall.quantize_projections and qall.selects("transformer.resblocks.0.attn.in_proj")
    smallest = PRESETS["ternary-qall-embeddings"]
    assert smallest.quantize_token_embedding and smallest.quantize_patch_embedding


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        resolve_config("int3")
    message = str(info.value)
    assert "'int3'" in message
    for name in ("int8", "int4", "int2", "ternary", "ternary-qffn", "ternary-qall"):
        assert name in message


def test_config_of_the_wrong_type_is_rejected():
    with pytest.raises(ValueError, match="QuantConfig or one of"):
        resolve_config(8)


def test_unknown_format_lists_the_formats():
    with pytest.raises(ValueError) as info:
        QuantConfig("int3")
    assert str(info.value).startswith("format must be one of")
    for fmt in WEIGHT_FORMATS:
        assert repr(fmt) in str(info.value)


@pytest.mark.parametrize("fmt", ["int4", "int2"])
def test_grouped_formats_reject_an_unsupported_group_size(fmt):
    with pytest.raises(ValueError, match=r"group_size must be one of \(0, 32, 64, 128\)"):
        QuantConfig(fmt, group_size=16)


@pytest.mark.parametrize("fmt", ["int8", "ternary", FLOAT_FORMAT])
def test_per_channel_formats_reject_a_group_size(fmt):
    with pytest.raises(ValueError, match=f"group_size must be 0 for format '{fmt}'"):
        QuantConfig(fmt, group_size=32)


@pytest.mark.parametrize("group_size", [32, 64, 128, 0])
def test_grouped_formats_keep_an_explicit_group_size(group_size):
    assert QuantConfig("int4", group_size=group_size).group_size == group_size


def test_group_size_must_be_an_int():
    with pytest.raises(ValueError, match="group_size must be an int"):
        QuantConfig("int4", group_size="64")


def test_unknown_activation_mode_lists_the_modes():
    with pytest.raises(ValueError) as info:
        QuantConfig("int8", activation="per_tensor")
    for mode in ACTIVATION_MODES:
        assert repr(mode) in str(info.value)


def test_passthrough_format_needs_activation_none():
    with pytest.raises(ValueError, match="activation must be 'none' for format 'float'"):
        QuantConfig(FLOAT_FORMAT, activation="dynamic")


def test_unknown_threshold_rule_lists_the_rules():
    with pytest.raises(ValueError) as info:
        QuantConfig("ternary", threshold_rule="median")
    for rule in formats.THRESHOLD_RULES:
        assert repr(rule) in str(info.value)


def test_a_single_pattern_string_becomes_a_one_pattern_tuple():
    config = QuantConfig(include="*.mlp.*", exclude="visual.*")
    assert config.include == ("*.mlp.*",) and config.exclude == ("visual.*",)


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_patterns_must_be_strings(argument):
    with pytest.raises(ValueError, match=f"{argument} must hold glob-pattern strings"):
        QuantConfig(**{argument: ["*.mlp.*", 3]})
    with pytest.raises(ValueError, match=f"{argument} must be a glob pattern"):
        QuantConfig(**{argument: 3})


@pytest.mark.parametrize("flag", ["quantize_projections", "quantize_token_embedding", "quantize_patch_embedding"])
def test_flags_must_be_booleans(flag):
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        QuantConfig(**{flag: "yes"})


def test_a_future_config_version_is_rejected():
    with pytest.raises(ValueError, match=f"version must be {CONFIG_VERSION}"):
        QuantConfig(version=CONFIG_VERSION + 1)


def test_include_and_exclude_patterns_select_names():
    config = QuantConfig(include=("visual.*",), exclude=("*.attn.out_proj",))
    assert config.selects("visual.transformer.resblocks.0.mlp.c_fc")
    assert config.selects("visual.transformer.resblocks.0.attn.in_proj")
    assert not config.selects("visual.transformer.resblocks.0.attn.out_proj")
    assert not config.selects("transformer.resblocks.0.mlp.c_fc")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_a_dict(name):
    config = PRESETS[name]
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_from_dict_names_unknown_fields_and_the_valid_ones():
    data = QuantConfig().to_dict() | {"bits": 4}
    with pytest.raises(ValueError, match=r"unknown fields \['bits'\]; valid fields are .*'format'"):
        QuantConfig.from_dict(data)


def test_preset_overrides_replace_fields_and_revalidate():
    config = QuantConfig.preset("int4", group_size=32, exclude=("visual.*",))
    assert (config.format, config.group_size, config.exclude) == ("int4", 32, ("visual.*",))
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig.preset("int4", group_size=48)


def test_configs_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["int8"].format = "int4"


def test_layer_config_weight_only_keeps_the_weight_format():
    layer = QuantConfig("int2", group_size=32, activation="static").layer
    weight_only = layer.weight_only()
    assert (weight_only.format, weight_only.group_size, weight_only.activation) == ("int2", 32, "none")
    assert LayerConfig.from_dict(weight_only.to_dict()) == weight_only
