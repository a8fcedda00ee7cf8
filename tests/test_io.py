"""pyclipq.save / pyclipq.load: exact round trips, the ternary storage layout, and one clear error per bad file."""
from __future__ import annotations

import copy
import json
import os
import pickle
import struct

import pytest
import torch
from clip_builders import BUILDERS, encode, sample_inputs, small_hf_clip, small_open_clip
from safetensors import safe_open
from safetensors.torch import save_file

import pyclipq
from pyclipq import formats
from pyclipq.configs import QuantConfig
from pyclipq.convert import convert
from pyclipq.io import (
    CHECKPOINT_VERSION,
    ArchitectureMismatchError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    TruncatedCheckpointError,
    UnsupportedCheckpointVersionError,
    load,
    read_metadata,
    save,
)
from pyclipq.nn import QuantLinear


def saved(tmp_path, name="open_clip", config="int8", **kwargs):
    """(converted model, checkpoint path)."""
    model = convert(BUILDERS[name](**kwargs), config)
    path = tmp_path / "model.safetensors"
    save(model, path)
    return model, path


def fresh(name="open_clip", **kwargs):
    # A different seed: every weight differs until load fills it.
    return BUILDERS[name](seed=123, **kwargs)


def rewrite_header(path, out, edit):
    """Copy a safetensors file to `out` with its JSON header changed by edit(header)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    return out


def edit_metadata(**changes):
    def edit(header):
        metadata = json.loads(header["__metadata__"]["pyclipq"])
        metadata.update(changes)
        header["__metadata__"]["pyclipq"] = json.dumps(metadata)

    return edit


@pytest.mark.parametrize(
    "name, config",
    [
        ("open_clip", "ternary-qall-embeddings"),
        ("hf", "int4"),
        ("openai", "int2"),
        ("open_clip", QuantConfig("int8", exclude=("*.attn.out_proj",))),
        ("hf", "passthrough"),
    ],
)
def test_round_trip_rebuilds_identical_outputs(tmp_path, name, config):
    model, path = saved(tmp_path, name, config)
    images, tokens = sample_inputs()
    before = encode(model, images, tokens)
    loaded = load(path, fresh(name))
    for got, expected in zip(encode(loaded, images, tokens), before):
        assert torch.equal(got, expected)
    expected_state, state = model.state_dict(), loaded.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[k], expected_state[k]) for k in state)


def test_ternary_weights_are_stored_base3_five_trits_per_byte(tmp_path):
    model, path = saved(tmp_path, "open_clip", "ternary")
    layer = model.transformer.resblocks[0].mlp.c_fc
    key = "transformer.resblocks.0.mlp.c_fc.packed_weight"
    with safe_open(str(path), "pt") as f:
        stored = f.get_tensor(key)
    codes = formats.unpack_codes_reference(layer.packed_weight, 2)
    assert stored.shape == (layer.out_features, -(-layer.in_features // 5)) and stored.dtype == torch.uint8
    assert torch.equal(stored, formats.pack_trits_reference(codes, layer.in_features))
    assert read_metadata(path)["storage_layouts"][key]["in_features"] == layer.in_features


def test_metadata_records_versions_source_and_per_layer_config(tmp_path):
    _, path = saved(tmp_path, "open_clip", QuantConfig("int4", group_size=32))
    metadata = read_metadata(path)
    assert metadata["checkpoint_version"] == CHECKPOINT_VERSION
    assert metadata["format_version"] == formats.FORMAT_VERSION
    assert metadata["pyclipq_version"] == pyclipq.__version__
    assert (metadata["source"], metadata["model_class"]) == ("open_clip", "open_clip.model.CLIP")
    assert metadata["config"]["group_size"] == 32
    targets = {t["name"]: t for t in metadata["targets"]}
    attn = targets["visual.transformer.resblocks.0.attn"]
    assert attn["target"] == "multihead_attention"
    assert attn["layers"]["in_proj"] == {"format": "int4", "group_size": 32, "activation": "dynamic", "threshold_rule": "absmean"}
    assert targets["visual.proj"]["layers"][""]["activation"] == "none"


def static_model():
    model = convert(small_open_clip(), QuantConfig("int8", activation="static"))
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, QuantLinear)):
        layer.set_act_scale(0.01 + 0.001 * i)
    return model


def test_calibrated_static_scales_survive_a_round_trip(tmp_path):
    model = static_model()
    save(model, tmp_path / "static.safetensors")
    loaded = load(tmp_path / "static.safetensors", fresh())
    images, tokens = sample_inputs()
    for got, expected in zip(encode(loaded, images, tokens), encode(model, images, tokens)):
        assert torch.equal(got, expected)


def test_uncalibrated_static_layers_stay_refused_after_loading(tmp_path):
    model = convert(small_open_clip(), QuantConfig("int8", activation="static"))
    save(model, tmp_path / "static.safetensors")
    loaded = load(tmp_path / "static.safetensors", fresh())
    with pytest.raises(RuntimeError, match="act_scale is not calibrated"):
        encode(loaded, *sample_inputs())


def test_load_never_unpickles(tmp_path, monkeypatch):
    _, path = saved(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pyclipq.load unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load(path, fresh())


def test_smaller_formats_give_smaller_files(tmp_path):
    sizes = {}
    for config in ("int8", "int4", "ternary", "ternary-qall-embeddings"):
        path = tmp_path / f"{config}.safetensors"
        save(convert(small_open_clip(), config), path)
        sizes[config] = os.path.getsize(path)
    assert sizes["int8"] > sizes["int4"] > sizes["ternary"] > sizes["ternary-qall-embeddings"]


# ------------------------------------------------------------------ bad files


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_file_is_reported_as_truncated(tmp_path, keep):
    _, path = saved(tmp_path)
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:keep])
    with pytest.raises(TruncatedCheckpointError, match="is truncated"):
        load(cut, fresh())


def test_corrupted_header_is_reported_as_corrupted(tmp_path):
    _, path = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8:24] = b"\xff" * 16  # inside the JSON header
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="corrupted header"):
        load(bad, fresh())


def test_corrupted_header_length_is_reported_as_corrupted(tmp_path):
    _, path = saved(tmp_path)
    raw = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    with pytest.raises(CorruptCheckpointError, match="length field"):
        load(bad, fresh())


def test_corrupted_tensor_data_fails_the_checksum(tmp_path):
    _, path = saved(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x5A
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="does not match the recorded sha256"):
        load(bad, fresh())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5])
@pytest.mark.parametrize("config", ["int8", "int4"])
def test_invalid_scales_with_a_valid_checksum_are_corrupt(tmp_path, config, value):
    """A NaN, infinite or negative scale is named at load, not found layers later as 'x contains NaN'."""
    from safetensors import safe_open

    from pyclipq.io import _checksum

    _, path = saved(tmp_path, config=config)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    key = next(k for k in sorted(tensors) if k.endswith("weight_scale"))
    tensors[key].view(-1)[3] = value
    pyclipq_meta = json.loads(metadata["pyclipq"])
    pyclipq_meta["sha256"] = _checksum(tensors)  # the file is consistent: only the value is wrong
    metadata["pyclipq"] = json.dumps(pyclipq_meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CorruptCheckpointError, match=f"invalid scale tensor '{key}'.*1 of its"):
        load(bad, fresh())


def test_zero_scales_of_all_zero_rows_load(tmp_path):
    """Scale 0 is valid (an all-zero row, docs/FORMATS.md): such a checkpoint loads and computes zeros there."""
    model = BUILDERS["open_clip"]()
    with torch.no_grad():
        model.visual.transformer.resblocks[0].mlp.c_fc.weight[5].zero_()
    model = convert(model, "int8")
    path = tmp_path / "zero.safetensors"
    save(model, path)
    loaded = load(path, fresh())
    assert loaded.visual.transformer.resblocks[0].mlp.c_fc.weight_scale[5] == 0


def test_foreign_safetensors_file_is_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.randn(4, 4)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ForeignCheckpointError, match="not a pyclipq checkpoint"):
        load(foreign, fresh())


def test_a_pickle_file_is_refused_without_unpickling(tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save(small_open_clip().state_dict(), pickled)
    with pytest.raises(CorruptCheckpointError):
        load(pickled, fresh())


@pytest.mark.parametrize("field", ["format_version", "checkpoint_version", "config_version"])
def test_future_versions_are_refused(tmp_path, field):
    _, path = saved(tmp_path)
    future = rewrite_header(path, tmp_path / "future.safetensors", edit_metadata(**{field: 99}))
    with pytest.raises(UnsupportedCheckpointVersionError, match=f"{field} 99, this pyclipq reads up to"):
        load(future, fresh())


def test_corrupted_metadata_json_is_reported(tmp_path):
    _, path = saved(tmp_path)

    def break_json(header):
        header["__metadata__"]["pyclipq"] = "{not json"

    bad = rewrite_header(path, tmp_path / "bad.safetensors", break_json)
    with pytest.raises(CorruptCheckpointError, match="corrupted pyclipq metadata"):
        load(bad, fresh())


def test_other_implementation_is_an_architecture_mismatch(tmp_path):
    _, path = saved(tmp_path, "open_clip")
    with pytest.raises(ArchitectureMismatchError, match="saved from a open_clip.model.CLIP"):
        load(path, small_hf_clip())


def test_fewer_layers_is_an_architecture_mismatch(tmp_path):
    _, path = saved(tmp_path, "open_clip")
    import open_clip.model as ocm

    smaller = ocm.CLIP(
        embed_dim=32,
        vision_cfg=ocm.CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=ocm.CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=2, layers=2),
    )
    with pytest.raises(ArchitectureMismatchError, match="visual.transformer.resblocks.1"):
        load(path, smaller)


def test_other_width_is_an_architecture_mismatch(tmp_path):
    _, path = saved(tmp_path, "open_clip")
    with pytest.raises(ArchitectureMismatchError, match="size mismatch"):
        load(path, small_open_clip(vocab_size=120))


def test_save_needs_a_converted_model_and_load_a_float_one(tmp_path):
    with pytest.raises(ValueError, match="convert it with pyclipq.convert before saving"):
        save(small_open_clip(), tmp_path / "float.safetensors")
    model, path = saved(tmp_path)
    with pytest.raises(ValueError, match="freshly built float model"):
        load(path, copy.deepcopy(model))
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors", fresh())


@pytest.mark.slow
def test_vit_b32_ternary_checkpoint_is_at_least_16x_smaller_than_float32(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    float32_bytes = sum(p.numel() * 4 for p in model.state_dict().values())
    convert(model, "ternary-qall-embeddings")
    save(model, tmp_path / "vit_b32_ternary.safetensors")
    ratio = float32_bytes / os.path.getsize(tmp_path / "vit_b32_ternary.safetensors")
    assert ratio >= 16, f"only {ratio:.2f}x smaller than float32"
