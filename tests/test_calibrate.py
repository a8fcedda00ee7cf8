"""pyclipq.calibrate: static activation scales from calibration batches, weight observers, GPTQ."""
from __future__ import annotations

import copy

import pytest
import torch
from calibration_fixtures import one_intra_op_thread  # noqa: F401  (autouse)
import torch.nn.functional as F
from torch import nn

import pyclipq
from pyclipq.calibrate import calibrate
from pyclipq.configs import QuantConfig
from pyclipq.convert import convert

pytest.importorskip("open_clip")
from clip_builders import small_open_clip  # noqa: E402



def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 24)).eval()


def converted(model, fmt="int8", **kwargs):
    return convert(model, QuantConfig(fmt, activation="static", **kwargs))


def batches(n=3, seed=0, rows=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 48, generator=g) * (1 + i) for i in range(n)]


def test_minmax_scale_of_the_first_layer_is_the_input_absmax():
    model = converted(mlp())
    data = batches()
    report = calibrate(model, data, observer="minmax", progress=False)
    expected = max(float(b.abs().max()) for b in data) / 127
    assert float(model[0].act_scale) == pytest.approx(expected, rel=1e-6)
    assert float(model[2].act_scale) > 0
    assert [l.name for l in report.layers] == ["0", "2"]
    assert report.layers[0].act_scale == pytest.approx(expected, rel=1e-6)
    assert report.num_batches == 3 and report.passes == 1


def test_num_batches_limits_the_data_and_generators_work():
    model = converted(mlp())
    data = batches(5)
    calibrate(model, (b for b in data), observer="minmax", num_batches=2, progress=False)
    expected = max(float(b.abs().max()) for b in data[:2]) / 127
    assert float(model[0].act_scale) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("observer", ["minmax", "ema", "percentile", "omse"])
def test_every_observer_calibrates_and_stays_close_to_float(observer):
    float_model = mlp()
    model = converted(copy.deepcopy(float_model))
    calibrate(model, batches(), observer=observer, progress=False)
    x = batches(1, seed=9)[0]
    assert F.cosine_similarity(model(x), float_model(x)).mean() > 0.99


def test_percentile_clips_an_activation_outlier():
    model = converted(mlp())
    data = batches(2, rows=256)
    data[0][0, 0] = 500.0  # one huge activation
    calibrate(model, data, observer="percentile", observer_kwargs={"percentile": 99.0}, progress=False)
    assert float(model[0].act_scale) < 10.0 / 127
    calibrate(model, data, observer="minmax", progress=False)
    assert float(model[0].act_scale) == pytest.approx(500.0 / 127)


def test_custom_observer_factory():
    from pyclipq.calibrate import MinMaxObserver

    model = converted(mlp())
    calibrate(model, batches(), observer=MinMaxObserver, progress=False)
    assert float(model[0].act_scale) > 0


def test_calibrate_is_callable_from_the_package_every_time():
    model = converted(mlp())
    import pyclipq.calibrate  # noqa: F401  (makes pyclipq.calibrate the subpackage)

    pyclipq.calibrate(model, batches(), progress=False)
    pyclipq.calibrate(model, batches(), progress=False)
    assert float(model[0].act_scale) > 0


# ------------------------------------------------------------------ errors


def test_zero_batches_is_an_error():
    model = converted(mlp())
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(model, iter([]), progress=False)
    with pytest.raises(ValueError, match="batches must be an iterable"):
        calibrate(model, torch.randn(4, 48), progress=False)


def test_nan_activations_are_an_error_naming_the_layer():
    model = converted(mlp())
    data = batches()
    data[1][3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"activations entering 0 contain NaN.*batch 1"):
        calibrate(model, data, progress=False)


def test_model_without_static_activations_is_an_error():
    with pytest.raises(ValueError, match="not converted with static activations"):
        calibrate(mlp(), batches(), progress=False)
    dynamic = convert(mlp(), QuantConfig("int8"))
    with pytest.raises(ValueError, match=r"not converted with static activations.*'dynamic'"):
        calibrate(dynamic, batches(), progress=False)
    with pytest.raises(ValueError, match="model must be"):
        calibrate("model", batches(), progress=False)


def test_bad_arguments_name_themselves():
    model = converted(mlp())
    with pytest.raises(ValueError, match="num_batches"):
        calibrate(model, batches(), num_batches=0, progress=False)
    with pytest.raises(ValueError, match="observer must be one of"):
        calibrate(model, batches(), observer="kl", progress=False)
    with pytest.raises(ValueError, match="weight_observer must be one of"):
        calibrate(model, batches(), weight_observer="kl", float_model=mlp(), progress=False)
    with pytest.raises(ValueError, match="float_model is required"):
        calibrate(model, batches(), gptq=True, progress=False)
    with pytest.raises(ValueError, match="float_model is required"):
        calibrate(model, batches(), weight_observer="omse", progress=False)
    with pytest.raises(ValueError, match="float_model has no float weight"):
        calibrate(model, batches(), gptq=True, float_model=nn.Sequential(nn.Linear(3, 3)), progress=False)
    with pytest.raises(ValueError, match="observe per tensor"):
        calibrate(model, batches(), observer="minmax", observer_kwargs={"symmetric": False}, progress=False)
    with pytest.raises(ValueError, match="observe per tensor"):
        calibrate(model, batches(), observer="omse", observer_kwargs={"axis": 0}, progress=False)
    with pytest.raises(ValueError, match="strings"):
        calibrate(model, [(torch.randn(2, 48), ["a cat"])], progress=False)


# ------------------------------------------------------------------ weights


def correlated_batches(n, seed, rows=64):
    """Inputs with correlated features (one fixed mixing matrix), as transformer activations have."""
    mix = torch.randn(48, 48, generator=torch.Generator().manual_seed(100)) / 48**0.5 + torch.eye(48)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 48, generator=g) @ mix for _ in range(n)]


def test_gptq_lowers_every_layer_error_and_the_output_error():
    float_model = mlp(1)
    data = correlated_batches(4, seed=0)
    rtn = converted(copy.deepcopy(float_model), "int2", group_size=32)
    calibrate(rtn, data, progress=False)
    gptq = converted(copy.deepcopy(float_model), "int2", group_size=32)
    report = calibrate(gptq, data, gptq=True, float_model=float_model, progress=False)
    assert report.passes == 3  # activations, one GPTQ chunk, activations again
    assert set(report.stage_seconds) == {"activations", "gptq", "gptq_rounding"}
    for layer in report.layers:
        assert layer.weights == "gptq"
        assert layer.proxy_error < layer.proxy_error_rtn
    x = torch.cat(correlated_batches(2, seed=7))  # held-out rows
    ref = float_model(x)
    assert (gptq(x) - ref).norm() < (rtn(x) - ref).norm()


def test_gptq_in_chunks_with_a_small_hessian_budget():
    float_model = mlp(2)
    model = converted(copy.deepcopy(float_model), "int4", group_size=32)
    # 48*48*4 bytes fits one Hessian per chunk: two GPTQ passes.
    report = calibrate(model, batches(), gptq=True, float_model=float_model, max_hessian_bytes=48 * 48 * 4, progress=False)
    assert report.passes == 4
    assert all(l.proxy_error < l.proxy_error_rtn for l in report.layers)


def test_weight_observer_requantizes_from_the_float_model():
    float_model = mlp(3)
    with torch.no_grad():
        float_model[0].weight[:, 0] = 2.0  # an outlier input column
    plain = converted(copy.deepcopy(float_model), "int4", group_size=0)
    omse = converted(copy.deepcopy(float_model), "int4", group_size=0)
    calibrate(plain, batches(), progress=False)
    report = calibrate(omse, batches(), weight_observer="omse", float_model=float_model, progress=False)
    assert report.layers[0].weights == "observer:omse"
    w = float_model[0].weight
    assert (omse[0].dequantize_weight() - w).norm() < (plain[0].dequantize_weight() - w).norm()


# ------------------------------------------------------------------ CLIP


def clip_batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        images = torch.randn(4, 3, 32, 32, generator=g)
        tokens = torch.randint(1, 98, (4, 16), generator=g)
        tokens[:, 10] = 99  # end of text (argmax pooling)
        tokens[:, 11:] = 0
        out.append((images, tokens, torch.arange(4)))  # (images, token ids, labels)
    return out


def test_open_clip_pairs_calibrate_both_towers():
    float_model = small_open_clip()
    model = converted(copy.deepcopy(float_model))
    data = clip_batches()
    report = calibrate(model, data, progress=False)
    static = [l for l in report.layers if l.act_scale is not None]
    # every linear of both towers, attention in_proj / out_proj included
    assert len(static) == len(report.layers) >= 16
    assert all(l.act_scale > 0 for l in static)
    images, tokens, _ = clip_batches(1, seed=5)[0]
    with torch.no_grad():
        assert F.cosine_similarity(model.encode_image(images), float_model.encode_image(images)).mean() > 0.98
        assert F.cosine_similarity(model.encode_text(tokens), float_model.encode_text(tokens)).mean() > 0.98


def test_open_clip_images_only_leaves_the_text_tower_uncalibrated():
    model = converted(small_open_clip())
    images = [b[0] for b in clip_batches()]
    with pytest.raises(ValueError, match=r"no calibration batch reached .*transformer"):
        calibrate(model, images, progress=False)


def test_open_clip_gptq_ternary():
    float_model = small_open_clip()
    model = converted(copy.deepcopy(float_model), "ternary")
    report = calibrate(model, clip_batches(), gptq=True, weight_observer="omse", float_model=float_model, progress=False)
    gptq_layers = [l for l in report.layers if l.proxy_error is not None]
    assert len(gptq_layers) == len(report.layers)
    assert sum(l.proxy_error for l in gptq_layers) < sum(l.proxy_error_rtn for l in gptq_layers)
