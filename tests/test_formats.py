"""The Python format reference against values worked out by hand from docs/FORMATS.md."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyclipq import formats, primitives


def test_padded_k_and_groups():
    assert [formats.padded_k(k) for k in (1, 127, 128, 129, 768)] == [128, 128, 128, 256, 768]
    assert formats.num_groups(256, 0) == 1
    assert formats.num_groups(256, 32) == 8
    with pytest.raises(ValueError, match="in_features"):
        formats.padded_k(0)
    with pytest.raises(ValueError, match="group_size must be one of"):
        formats.num_groups(256, 48)


def test_int8_weight_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    codes, scale = primitives.quantize_weight(w, "int8")
    assert codes.dtype == torch.int8 and codes.shape == (2, 128)
    assert torch.allclose(scale, torch.tensor([2.0 / 127, 0.0]))
    assert codes[0, :3].tolist() == [64, -127, 32]  # 63.5 -> 64 (half to even), 31.75 -> 32
    assert codes[0, 3:].abs().sum() == 0 and codes[1].abs().sum() == 0


def test_int4_weight_by_hand():
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([7.0, -14.0, 3.0, 1.0])  # absmax 14 -> scale 2
    codes, scale = primitives.quantize_weight(w, "int4", group_size=32)
    assert scale.shape == (1, 4)
    assert scale[0, 0] == 2.0 and scale[0, 1:].abs().sum() == 0
    # 3.5 -> 4 (half to even) + 8; -7 + 8; 1.5 -> 2 + 8; 0.5 -> 0 + 8
    assert codes[0, :4].tolist() == [12, 1, 10, 8]
    assert (codes[0, 32:] == 8).all()  # empty groups and padding hold the pad code (zero)


def test_int2_weight_by_hand():
    w = torch.tensor([[3.0, -3.0, 1.2, -0.9, 0.1]])  # absmax 3 -> scale 1, levels -3,-1,1,3
    codes, scale = primitives.quantize_weight(w, "int2", group_size=0)
    assert scale.tolist() == [[1.0]]
    assert codes[0, :5].tolist() == [3, 0, 2, 1, 2]
    levels = formats.INT2.level(codes[0, :5])
    assert levels.tolist() == [3, -3, 1, -1, 1]


@pytest.mark.parametrize("rule,expected_scale,expected", [
    ("absmean", 1.0, [1, -1, 1, 0]),      # w / 1: 2, -1.4, 0.55, 0.05
    ("twice_mean", 2.0, [1, -1, 0, 0]),   # w / 2: 1, -0.7, 0.275, 0.025
])
def test_ternary_threshold_rules(rule, expected_scale, expected):
    w = torch.tensor([[2.0, -1.4, 0.55, 0.05]])  # |w| sums to 4 -> mean 1
    codes, scale = primitives.quantize_weight(w, "ternary", threshold_rule=rule)
    assert scale.tolist() == pytest.approx([expected_scale])
    assert (codes[0, :4].to(torch.int32) - 1).tolist() == expected
    with pytest.raises(ValueError, match="threshold_rule must be one of"):
        primitives.quantize_weight(w, "ternary", threshold_rule="median")


@pytest.mark.parametrize("fmt, group, code", [("int8", 0, 0), ("int4", 32, 8), ("int2", 32, 2), ("ternary", 0, 1)])
def test_all_zero_rows_and_groups_get_the_documented_codes_and_stay_zero(fmt, group, code):
    """docs/FORMATS.md: a scale of 0 writes the format's zero code (int2, without one, code 2)."""
    w = torch.randn(3, 96)
    w[1] = 0.0  # an all-zero row
    if group:
        w[2, 32:64] = 0.0  # an all-zero group in a non-zero row
    codes, scale = primitives.quantize_weight(w, fmt, group)
    assert (codes[1, :96] == code).all() and (scale[1] == 0).all()
    if group:
        assert (codes[2, 32:64] == code).all() and scale[2, 1] == 0
    back = primitives.dequantize_codes(codes, scale, fmt, 96)
    assert (back[1] == 0).all() and (not group or (back[2, 32:64] == 0).all())


@pytest.mark.parametrize("fmt, group, code", [("int8", 0, 0), ("int4", 32, 8), ("int2", 32, 2), ("ternary", 0, 1)])
def test_rows_too_small_to_invert_get_the_zero_code(fmt, group, code):
    """A scale so small that 1 / scale overflows (an absmax of 1e-40, subnormal) gives the zero code
    like a scale of 0, not +-qmax and NaN codes; a small but invertible row quantizes as usual."""
    w = torch.zeros(3, 96)
    w[:, 1::2] = torch.linspace(-1, 1, 48)  # zeros between nonzeros: 0 * inf was NaN
    w[0] *= 1e-40
    w[1] *= 1e-30
    codes, scale = primitives.quantize_weight(w, fmt, group)
    assert (codes[0, :96] == code).all()
    assert torch.equal(codes[1], codes[2])  # scale-free: 1e-30 quantizes like 1
    back = primitives.dequantize_codes(codes, scale, fmt, 96)
    assert bool(torch.isfinite(back).all()) and float(back[0].abs().max()) <= 1e-40


def test_block_planar_layout_by_hand():
    # int2: byte j of block 0 holds elements j, 32+j, 64+j, 96+j in bits 0-1, 2-3, 4-5, 6-7.
    codes = torch.zeros(1, 128, dtype=torch.uint8)
    codes[0, 5] = 1
    codes[0, 32 + 5] = 2
    codes[0, 96 + 5] = 3
    packed = formats.pack_codes_reference(codes, 2)
    assert packed.shape == (1, 32)
    assert packed[0, 5].item() == 1 | (2 << 2) | (3 << 6)
    assert packed[0].sum().item() == packed[0, 5].item()
    # int4: byte j of 32-byte block b holds 64b + j (low nibble) and 64b + 32 + j (high).
    codes4 = torch.zeros(1, 128, dtype=torch.uint8)
    codes4[0, 64 + 3] = 9
    codes4[0, 64 + 32 + 3] = 4
    packed4 = formats.pack_codes_reference(codes4, 4)
    assert packed4[0, 32 + 3].item() == 9 | (4 << 4)


def test_trits_by_hand():
    codes = torch.tensor([[2, 0, 1, 1, 1, 2, 2]], dtype=torch.uint8)
    packed = formats.pack_trits_reference(codes, 7)
    # 2 + 0*3 + 1*9 + 1*27 + 1*81 = 119; then 2 + 2*3 + 1*(9+27+81) (missing trits are 1) = 125
    assert packed.tolist() == [[119, 125]]
    back = formats.unpack_trits_reference(packed, 7)
    assert back.shape == (1, 128) and torch.equal(back[0, :7], codes[0]) and (back[0, 7:] == 1).all()
    with pytest.raises(ValueError, match="> 242"):
        formats.unpack_trits_reference(torch.tensor([[243, 0]], dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="bytes per row"):
        formats.unpack_trits_reference(packed, 11)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 300), bits=st.sampled_from([2, 4]))
def test_pack_roundtrip(n, k, bits):
    k_pad = formats.padded_k(k)
    codes = torch.randint(0, 1 << bits, (n, k_pad), dtype=torch.uint8)
    assert torch.equal(formats.unpack_codes_reference(formats.pack_codes_reference(codes, bits), bits), codes)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 300), rule=st.sampled_from(formats.THRESHOLD_RULES))
def test_ternary_storage_roundtrip(n, k, rule):
    codes, _ = primitives.quantize_weight(torch.randn(n, k), "ternary", threshold_rule=rule)
    packed = formats.pack_trits_reference(codes, k)
    assert packed.shape == (n, -(-k // 5))
    assert torch.equal(formats.unpack_trits_reference(packed, k), codes)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 300), fmt=st.sampled_from(["int8", "int4", "int2"]), group=st.sampled_from([0, 32, 64, 128]))
def test_dequantize_error_is_half_a_step(k, fmt, group):
    w = torch.randn(4, k)
    codes, scale = primitives.quantize_weight(w, fmt, group)
    wq = primitives.dequantize_codes(codes, scale, fmt, k)
    # round-to-nearest: at most half a step; int2's levels are 2 apart in units of scale
    step = scale if scale.dim() == 1 else scale.repeat_interleave(codes.shape[1] // scale.shape[1], dim=1)[:, :k]
    step = step[:, None] if step.dim() == 1 else step
    half = 1.0 if fmt == "int2" else 0.5
    assert ((w - wq).abs() <= half * step * (1 + 1e-6) + 1e-7).all()


def test_bad_weights_rejected():
    with pytest.raises(ValueError, match="2-D"):
        primitives.quantize_weight(torch.randn(3), "int8")
    with pytest.raises(ValueError, match="NaN or Inf"):
        primitives.quantize_weight(torch.tensor([[float("nan"), 1.0]]), "int4")
    with pytest.raises(ValueError, match="format must be one of"):
        primitives.quantize_weight(torch.randn(2, 2), "int3")


def test_cpp_format_traits_agree_with_formats_py():
    """formats.h (through _C) and formats.py define each format once, identically."""
    from pyclipq import _C

    cpp = _C.format_traits()
    assert list(cpp["formats"]) == list(formats.FORMATS)  # same formats, same order (the C++ WeightKind)
    for name, traits in cpp["formats"].items():
        f = formats.get_format(name)
        assert traits == {"bits": f.bits, "level_mul": f.level_mul, "level_offset": f.level_offset,
                          "pad_code": f.pad_code, "max_code": f.max_code}, name
    assert cpp["constants"] == {"format_version": formats.FORMAT_VERSION, "k_block": formats.K_BLOCK,
                                "vector_bytes": formats.VECTOR_BYTES, "act_qmax": formats.ACT_QMAX,
                                "act_min_absmax": formats.ACT_MIN_ABSMAX,
                                "trits_per_byte": formats.TRITS_PER_BYTE, "max_trit_byte": formats.MAX_TRIT_BYTE,
                                "tile_columns": formats.TILE_COLUMNS, "tile_k": formats.TILE_K}


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_a_format_answers_what_code_asks_of_it(name):
    """Code dtype, code range and level bound follow from the table, never from the name."""
    f = formats.get_format(name)
    codes = torch.arange(f.min_code, f.max_code + 1).to(f.code_dtype)
    levels = f.level(codes)
    assert int(levels.abs().max()) == f.max_abs_level
    assert f.qmax <= f.max_abs_level and f.level(torch.tensor([f.pad_code])).abs().item() <= 1
    assert f.bit_packed == (f.codes_per_byte > 1) and f.code_dtype == (torch.int8 if f.min_code < 0 else torch.uint8)
    assert (f.default_group_size in formats.GROUP_SIZES) and (f.default_group_size > 0) == f.grouped


def test_the_math_lives_in_primitives_only():
    """The deprecated aliases formats.quantize_weight / dequantize_codes are gone (0.1.0 had no release)."""
    for name in ("quantize_weight", "dequantize_codes"):
        assert not hasattr(formats, name) and callable(getattr(primitives, name))


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_primitives_take_any_float_dtype_and_keep_the_device(name):
    """The one quantizer: a bf16 or fp64 weight quantizes as its fp32 value does, where it lives."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 200, generator=gen).to(torch.bfloat16)
    group = formats.get_format(name).default_group_size
    want = primitives.quantize_weight(w.float(), name, group)
    for dtype in (torch.bfloat16, torch.float64):
        codes, scale = primitives.quantize_weight(w.to(dtype), name, group)
        assert torch.equal(codes, want[0]) and torch.equal(scale, want[1])
        assert codes.device == w.device and codes.dtype == formats.get_format(name).code_dtype


@pytest.mark.parametrize("name", list(formats.FORMATS))
def test_tile_layout_places_every_code(name):
    """formats.tile_layout against its definition (docs/FORMATS.md): tile (p, t), position 64 r + 4 j + e
    holds the code of column 16 p + j at k = 64 t + 4 r + e, bit-sliced c to a byte; padding rows."""
    spec = formats.get_format(name)
    gen = torch.Generator().manual_seed(7)
    n, k_pad = 21, 256
    codes = torch.randint(spec.min_code, spec.max_code + 1, (n, k_pad), generator=gen).to(spec.code_dtype)
    packed = formats.pack_codes_reference(codes, spec.bits) if spec.bit_packed else codes
    tiles = formats.tile_layout(packed, name)
    assert tuple(tiles.shape) == formats.tile_layout_shape(spec, n, k_pad) == (2, 4, 1024 // spec.codes_per_byte)
    tile_bytes = tiles.shape[2]
    for _ in range(200):
        col, k = int(torch.randint(0, 32, (1,), generator=gen)), int(torch.randint(0, k_pad, (1,), generator=gen))
        p, j, t, r, e = col // 16, col % 16, k // 64, (k % 64) // 4, k % 4
        pos = 64 * r + 4 * j + e
        byte = int(tiles[p, t, pos % tile_bytes].to(torch.int32)) & 0xFF
        code = (byte >> (spec.bits * (pos // tile_bytes))) & ((1 << spec.bits) - 1) if spec.bit_packed else \
            int(tiles[p, t, pos])
        want = int(codes[col, k]) if col < n else spec.pad_code
        assert code == want, (name, col, k)
    with pytest.raises(ValueError, match="packed must be the 2-D"):
        formats.tile_layout(packed.to(torch.int32), name)
