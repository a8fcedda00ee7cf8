"""GPTQ: error-compensating rounding beats round-to-nearest on the layer output, and its
result is a valid pyclipq format."""
from __future__ import annotations

import pytest
import torch
from calibration_fixtures import one_intra_op_thread  # noqa: F401  (autouse)

from pyclipq import formats, primitives
from pyclipq.calibrate.gptq import HessianAccumulator, gptq_quantize, layer_output_error, rtn_quantize

CASES = [("int8", 0), ("int4", 32), ("int4", 0), ("int2", 32), ("ternary", 0)]



def correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features and a few large channels, as in transformer activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, :4] *= 6.0
    return x


@pytest.fixture(scope="module")
def layer():
    k, n = 192, 64
    g = torch.Generator().manual_seed(11)
    w = torch.randn(n, k, generator=g) * 0.05
    x = correlated_inputs(2048, k, seed=12)
    acc = HessianAccumulator(k)
    for chunk in x.split(500):
        acc.add(chunk)
    held_out = correlated_inputs(3072, k, seed=12)[2048:]  # same mixing, rows not in the Hessian
    return w, x, acc.hessian, held_out


@pytest.mark.parametrize("fmt,group_size", CASES)
def test_gptq_beats_round_to_nearest(layer, fmt, group_size):
    w, x, hessian, held_out = layer
    result = gptq_quantize(w, hessian, fmt, group_size)
    _, _, rtn = rtn_quantize(w, fmt, group_size)
    err_gptq = layer_output_error(x, w, result.weight)
    err_rtn = layer_output_error(x, w, rtn)
    assert err_gptq < 0.9 * err_rtn, (err_gptq, err_rtn)
    # Not just fitted to the calibration rows: fresh rows of the same distribution agree.
    assert layer_output_error(held_out, w, result.weight) < layer_output_error(held_out, w, rtn)


@pytest.mark.parametrize("fmt,group_size", [("int4", 32), ("int2", 32), ("ternary", 0)])
def test_gptq_with_omse_scales_and_act_order(layer, fmt, group_size):
    w, x, hessian, _ = layer
    _, _, rtn = rtn_quantize(w, fmt, group_size, observer="omse")
    for act_order in (False, True):
        result = gptq_quantize(w, hessian, fmt, group_size, observer="omse", act_order=act_order)
        assert layer_output_error(x, w, result.weight) < layer_output_error(x, w, rtn)


@pytest.mark.parametrize("fmt,group_size", CASES)
def test_gptq_result_is_a_valid_format(layer, fmt, group_size):
    from pyclipq.calibrate.weights import load_quantized_weight
    from pyclipq.configs import LayerConfig
    from pyclipq.nn import QuantLinear

    w, _, hessian, _ = layer
    w = w[:, :150]  # K not a multiple of the K block or the group
    h = hessian[:150, :150]
    result = gptq_quantize(w, h, fmt, group_size)
    spec = formats.get_format(fmt)
    assert result.codes.shape == (64, formats.padded_k(150))
    if fmt == "int8":
        assert result.codes.dtype == torch.int8 and int(result.codes.abs().max()) <= 127
    else:
        assert result.codes.dtype == torch.uint8 and int(result.codes.max()) <= spec.max_code
        assert bool((result.codes[:, 150:] == spec.pad_code).all())
    torch.testing.assert_close(result.weight, primitives.dequantize_codes(result.codes, result.scale, fmt, 150))
    # The codes and scales load into QuantLinear buffers and compute with exactly that weight.
    module = QuantLinear.from_weight(w, None, LayerConfig(fmt, group_size=group_size, activation="none"))
    load_quantized_weight(module, result.codes, result.scale)
    x = torch.randn(5, 150)
    torch.testing.assert_close(module(x), x @ result.weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,group_size", CASES)
def test_identity_hessian_is_round_to_nearest(fmt, group_size):
    # With uncorrelated unit-variance inputs, H is diagonal: no error can be compensated by
    # another column, so GPTQ must reproduce RTN's codes and scales exactly.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 256, generator=g)
    result = gptq_quantize(w, 2 * torch.eye(256), fmt, group_size)
    codes, scale = primitives.quantize_weight(w, fmt, group_size)
    assert torch.equal(result.scale, scale)
    assert torch.equal(result.codes, codes)


def test_dead_input_columns_and_damping():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 64, generator=g)
    x[:, 10] = 0.0  # a feature no calibration input ever uses
    acc = HessianAccumulator(64)
    acc.add(x)
    w = torch.randn(16, 64, generator=g)
    result = gptq_quantize(w, acc.hessian, "int4", 32)
    assert bool(torch.isfinite(result.weight).all())
    # A rank-deficient Hessian (fewer rows than features) still factorises after damping.
    few = HessianAccumulator(64)
    few.add(x[:8])
    assert bool(torch.isfinite(gptq_quantize(w, few.hessian, "int2", 32).weight).all())


def test_hessian_accumulator_streams_the_mean():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 70, 40, generator=g)
    acc = HessianAccumulator(40)
    acc.add(x[0])
    acc.add(x[1:])  # leading dims are sample rows
    rows = x.reshape(-1, 40).double()
    torch.testing.assert_close(acc.hessian.double(), 2 * rows.t() @ rows / rows.shape[0], rtol=1e-5, atol=1e-5)
    assert acc.num_samples == 210


def test_gptq_bad_inputs():
    w = torch.randn(8, 16)
    h = torch.eye(16)
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(w, torch.eye(15), "int4", 32)
    with pytest.raises(ValueError, match="hessian contains NaN"):
        gptq_quantize(w, torch.full((16, 16), float("nan")), "int4", 32)
    with pytest.raises(ValueError, match="weight"):
        gptq_quantize(torch.randn(16), h, "int4", 32)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, h, "ternary", 32)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(w, h, "int4", 48)
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(w, h, "int4", 32, damp=0)
    with pytest.raises(ValueError, match="format"):
        gptq_quantize(w, h, "int3", 32)
    with pytest.raises(ValueError, match="observer"):
        gptq_quantize(w, h, "int4", 32, observer="kl")
    with pytest.raises(ValueError, match="in_features"):
        HessianAccumulator(0)
    acc = HessianAccumulator(16)
    with pytest.raises(ValueError, match="16 features"):
        acc.add(torch.randn(4, 8))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(torch.full((2, 16), float("inf")))
