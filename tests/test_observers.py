"""Observers (MinMax, EMA, Percentile, OMSE) on tensors whose right answer is known by hand,
and the weight-code helpers against pyclipq.formats."""
from __future__ import annotations

import pytest
import torch
from calibration_fixtures import one_intra_op_thread  # noqa: F401  (autouse)

from pyclipq import formats, primitives
from pyclipq.calibrate import distribution
from pyclipq.calibrate import observers as obs
from pyclipq.calibrate.observers import (
    EMAObserver,
    Grid,
    MinMaxObserver,
    OMSEObserver,
    PercentileObserver,
    fake_quantize,
    make_observer,
    quantization_error,
)
from pyclipq.calibrate.weights import (
    codes_from_levels,
    load_quantized_weight,
    nearest_levels,
    observed_weight_scales,
    quantize_weight_observed,
    quantize_weight_with_scales,
)

INT8_ACT = Grid.activations()



# ------------------------------------------------------------------ grids


def test_grids_come_from_the_formats():
    assert Grid.for_format("int8") == Grid(-127, 127, 1)
    assert Grid.for_format("int4") == Grid(-7, 7, 1)
    assert Grid.for_format("int2") == Grid(-3, 3, 2)  # odd levels
    assert Grid.for_format("ternary") == Grid(-1, 1, 1)
    assert INT8_ACT == Grid(-formats.ACT_QMAX, formats.ACT_QMAX)
    assert Grid.unsigned(4) == Grid(0, 15) and Grid.signed(4) == Grid(-8, 7)
    assert Grid.for_format("int2").levels().tolist() == [-3.0, -1.0, 1.0, 3.0]


@pytest.mark.parametrize("kwargs", [dict(qmin=3, qmax=3), dict(qmin=-3, qmax=3, step=4), dict(qmin=0, qmax=1, step=0)])
def test_bad_grids(kwargs):
    with pytest.raises(ValueError, match="qmax|step"):
        Grid(**kwargs)


def test_fake_quantize_matches_the_format_dequantization():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g)
    for name in ("int8", "int4", "int2"):
        fmt = formats.get_format(name)
        codes, scale = primitives.quantize_weight(w, fmt, 0 if name == "int8" else 32)
        expected = primitives.dequantize_codes(codes, scale, fmt, 128)
        s = scale[:, :, None].expand(-1, -1, 32).reshape(16, 128) if scale.dim() == 2 else scale[:, None]
        torch.testing.assert_close(fake_quantize(w, s, 0, Grid.for_format(fmt)), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ MinMax


def test_minmax_per_tensor_symmetric_and_asymmetric():
    m = MinMaxObserver()
    m.observe(torch.tensor([-2.0, 0.5]))
    m.observe(torch.tensor([[3.0, 0.0]]))
    lo, hi = m.range()
    assert (float(lo), float(hi)) == (-2.0, 3.0)
    assert float(m.qparams(INT8_ACT).scale) == pytest.approx(3.0 / 127)
    a = MinMaxObserver(symmetric=False)
    a.observe(torch.tensor([-2.0, 0.5, 3.0]))
    q = a.qparams(Grid.unsigned(8))
    # P4Q Eq. 3: s = (hi - lo) / 255 = 5/255, zp = 0 - round(lo / s) = round(102) = 102
    assert float(q.scale) == pytest.approx(5.0 / 255)
    assert int(q.zero_point) == 102


def test_minmax_asymmetric_range_always_holds_zero():
    a = MinMaxObserver(symmetric=False)
    a.observe(torch.tensor([1.0, 2.0, 4.0]))  # all positive: the range is widened to [0, 4]
    q = a.qparams(Grid.unsigned(2))
    assert float(q.scale) == pytest.approx(4.0 / 3) and int(q.zero_point) == 0
    assert float(fake_quantize(torch.tensor(0.0), q.scale, q.zero_point, Grid.unsigned(2))) == 0.0


def test_minmax_per_channel():
    m = MinMaxObserver(axis=0)
    m.observe(torch.tensor([[1.0, -4.0], [2.0, 3.0]]))
    torch.testing.assert_close(m.qparams(Grid.for_format("int4")).scale, torch.tensor([4.0 / 7, 3.0 / 7]))
    c = MinMaxObserver(axis=1)  # channels along the last axis
    c.observe(torch.tensor([[1.0, -4.0], [2.0, 3.0]]))
    torch.testing.assert_close(c.qparams(Grid.for_format("int4")).scale, torch.tensor([2.0 / 7, 4.0 / 7]))


@pytest.mark.parametrize("fmt,group_size", [("int8", 0), ("int4", 32), ("int4", 0), ("int2", 64), ("int2", 128)])
def test_minmax_weight_scales_equal_the_format_rule(fmt, group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 200, generator=g)  # K not a multiple of the group or the K block
    w[3] = 0.0
    expected_codes, expected_scale = primitives.quantize_weight(w, fmt, group_size)
    codes, scale = quantize_weight_observed(w, fmt, group_size, "minmax")
    assert torch.equal(scale, expected_scale)
    assert torch.equal(codes, expected_codes)


# ------------------------------------------------------------------ EMA


def test_ema_on_two_known_batches():
    e = EMAObserver(momentum=0.9)
    e.observe(torch.tensor([-1.0, 2.0]))
    e.observe(torch.tensor([-3.0, 4.0]))
    lo, hi = e.range()
    # running = 0.9 * first + 0.1 * second
    assert float(lo) == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert float(hi) == pytest.approx(0.9 * 2 + 0.1 * 4)
    assert float(e.qparams(INT8_ACT).scale) == pytest.approx(2.2 / 127)
    m = MinMaxObserver()
    m.observe(torch.tensor([-1.0, 2.0]))
    m.observe(torch.tensor([-3.0, 4.0]))
    assert float(m.range()[1]) == 4.0  # MinMax keeps the extreme


def test_ema_momentum_zero_keeps_the_last_batch():
    e = EMAObserver(momentum=0.0, axis=0)
    e.observe(torch.tensor([[1.0], [5.0]]))
    e.observe(torch.tensor([[2.0], [-7.0]]))
    lo, hi = e.range()
    assert lo.tolist() == [2.0, -7.0] and hi.tolist() == [2.0, -7.0]


# ------------------------------------------------------------------ Percentile


def _uniform_with_outlier():
    # 0.000, 0.001, ..., 0.999 and one outlier at 100: 1001 values.
    return torch.cat([torch.arange(1000, dtype=torch.float64).float() / 1000, torch.tensor([100.0])])


def test_percentile_clips_the_outlier_and_minmax_does_not():
    x = _uniform_with_outlier()
    p = PercentileObserver(percentile=99.0)
    p.observe(x)
    # rank 0.99 * (1001 - 1) = 990 of the sorted magnitudes is 0.990
    assert float(p.range()[1]) == pytest.approx(0.990, abs=1e-6)
    m = MinMaxObserver()
    m.observe(x)
    assert float(m.range()[1]) == 100.0
    assert float(p.qparams(INT8_ACT).scale) == pytest.approx(0.990 / 127, rel=1e-5)


def test_percentile_asymmetric_and_per_channel():
    x = torch.stack([_uniform_with_outlier(), -_uniform_with_outlier()])
    p = PercentileObserver(percentile=99.0, axis=0, symmetric=False)
    p.observe(x)
    lo, hi = p.range()
    # row 0: P1 = value at rank 10 (0.010), P99 = 0.990; row 1 mirrored
    torch.testing.assert_close(lo, torch.tensor([0.010, -0.990]))
    torch.testing.assert_close(hi, torch.tensor([0.990, -0.010]))


def test_percentile_histogram_mode_is_within_one_bin():
    x = _uniform_with_outlier()
    p = PercentileObserver(percentile=99.0, max_exact_values=0, bins=2048)
    p.observe(x[:500])
    p.observe(x[500:])  # the range doubles from 0.499 to cover 100: bins merge
    bin_width = 2 * float(p.distribution.half_range[0]) / 2048
    assert not p.distribution.is_exact
    assert float(p.distribution.counts.sum() + p.distribution.zeros.sum()) == 1001
    assert abs(float(p.range()[1]) - 0.990) <= bin_width
    assert float(p.range()[1]) < 2.0  # clipped: the outlier is far beyond


# ------------------------------------------------------------------ OMSE


def _brute_force_symmetric(x: torch.Tensor, grid: Grid) -> tuple[float, float]:
    """The exact minimum of sum (x - Q_s(x))^2 over every scale s > 0.

    Between consecutive breakpoints (where some |x_i| / s crosses a rounding boundary)
    every value keeps its level, the error is quadratic in s and its minimum is the least
    squares scale clipped to the interval; the global minimum is the best of those.
    """
    x = x.double()
    levels = grid.levels().double()
    bounds = ((levels[1:] + levels[:-1]) / 2).abs().unique()
    bounds = bounds[bounds > 0]
    breaks = (x.abs()[:, None] / bounds[None]).flatten()
    breaks = torch.cat([breaks[breaks > 0], torch.tensor([x.abs().max() / grid.qmax * 1e-3, x.abs().max() * 10])])
    breaks = breaks.unique().sort().values
    best_err, best_s = float("inf"), 0.0
    for lo, hi in zip(breaks[:-1].tolist(), breaks[1:].tolist()):
        mid = (lo + hi) / 2
        lv = fake_quantize(x, mid, 0.0, grid) / mid
        den = float((lv * lv).sum())
        s = min(max(float((x * lv).sum()) / den, lo), hi) if den > 0 else mid
        err = float(quantization_error(x, s, 0.0, grid))
        if err < best_err:
            best_err, best_s = err, s
    return best_err, best_s


# Low-bit grids only: with 127 levels and a few dozen values the 8-bit error curve has many
# near-equal local minima, and which one is global is luck of alignment, not clipping.
@pytest.mark.parametrize("fmt", ["int4", "int2", "ternary"])
def test_omse_equals_brute_force_on_a_small_tensor(fmt):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(48, generator=g)
    x[0] = 6.0  # an outlier makes clipping worthwhile
    grid = Grid.for_format(fmt)
    o = OMSEObserver()
    o.observe(x)
    scale = float(o.qparams(grid).scale)
    err = float(quantization_error(x.double(), scale, 0.0, grid))
    best_err, best_s = _brute_force_symmetric(x, grid)
    assert err >= best_err * (1 - 1e-9)  # nothing beats the exact minimum
    assert err == pytest.approx(best_err, rel=1e-4)
    assert scale == pytest.approx(best_s, rel=2e-2)


@pytest.mark.parametrize("fmt", ["int4", "int2", "ternary"])
def test_omse_beats_minmax(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g)
    x[:4] = torch.tensor([12.0, -9.0, 10.0, 8.0])
    grid = Grid.for_format(fmt)
    o, m = OMSEObserver(), MinMaxObserver()
    o.observe(x)
    m.observe(x)
    e_omse = float(quantization_error(x, o.qparams(grid).scale, 0, grid))
    e_minmax = float(quantization_error(x, m.qparams(grid).scale, 0, grid))
    assert e_omse < 0.5 * e_minmax
    assert float(o.range(grid)[1]) < float(m.range()[1])  # OMSE clipped


def test_omse_per_channel_matches_per_tensor_on_each_row():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 64, generator=g) * torch.tensor([[0.1], [1.0], [3.0], [0.5], [2.0]])
    grid = Grid.for_format("int4")
    per_channel = OMSEObserver(axis=0)
    per_channel.observe(w)
    scales = per_channel.qparams(grid).scale
    for row in range(5):
        single = OMSEObserver()
        single.observe(w[row])
        assert float(scales[row]) == pytest.approx(float(single.qparams(grid).scale), rel=1e-6)


def test_omse_histogram_error_model_matches_exact_error():
    # Values spread evenly inside every bin: the histogram's "uniform within a bin" model is exact
    # up to discretisation, so its error estimate must match the exact sum.
    x = torch.linspace(-1.0, 1.0, 200_001)
    exact = distribution._Distribution(max_exact_values=10**7, bins=256)
    hist = distribution._Distribution(max_exact_values=0, bins=256)
    exact.add(x[None])
    hist.add(x[None])
    assert not hist.is_exact
    for grid in (INT8_ACT, Grid.for_format("int4"), Grid.for_format("int2"), Grid.for_format("ternary")):
        scale = torch.tensor([[0.3 / grid.qmax, 1.0 / grid.qmax, 2.0 / grid.qmax]])
        e = exact.squared_error(scale, torch.zeros_like(scale), grid)
        h = hist.squared_error(scale, torch.zeros_like(scale), grid)
        torch.testing.assert_close(h, e, rtol=2e-3, atol=1e-6)
    a = Grid.unsigned(4)
    scale, zp = torch.tensor([[0.1, 0.2]]), torch.tensor([[7.0, 3.0]])
    torch.testing.assert_close(hist.squared_error(scale, zp, a), exact.squared_error(scale, zp, a), rtol=2e-3, atol=1e-6)


def test_omse_streaming_histogram_close_to_exact():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20000, generator=g) * 0.5
    x[:3] = torch.tensor([8.0, -6.0, 7.0])
    exact, streamed = OMSEObserver(), OMSEObserver(max_exact_values=0)
    exact.observe(x)
    for chunk in x.flip(0).split(3000):  # small batches first: the range grows as outliers arrive
        streamed.observe(chunk)
    e1 = float(quantization_error(x, exact.qparams(INT8_ACT).scale, 0, INT8_ACT))
    e2 = float(quantization_error(x, streamed.qparams(INT8_ACT).scale, 0, INT8_ACT))
    assert e2 == pytest.approx(e1, rel=1e-2)


def test_omse_asymmetric_beats_minmax_asymmetric():
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(5000, generator=g)) - 0.1  # GELU-like: mostly >= -0.1
    x[0] = 9.0
    grid = Grid.unsigned(4)
    o, m = OMSEObserver(symmetric=False), MinMaxObserver(symmetric=False)
    o.observe(x)
    m.observe(x)
    qo, qm = o.qparams(grid), m.qparams(grid)
    e_omse = float(quantization_error(x, qo.scale, qo.zero_point, grid))
    assert e_omse < 0.8 * float(quantization_error(x, qm.scale, qm.zero_point, grid))
    assert grid.qmin <= int(qo.zero_point) <= grid.qmax
    # A fine brute-force search over (lo, hi) ranges finds nothing clearly better.
    lo, hi = torch.meshgrid(torch.linspace(-0.1, 0.0, 21), torch.linspace(0.5, 9.0, 171), indexing="ij")
    scale, zero_point = primitives.range_to_qparams(lo.reshape(1, -1), hi.reshape(1, -1), grid, symmetric=False)
    brute = float(distribution._direct_squared_error(x[None], scale, zero_point.float(), grid).min())
    assert e_omse <= 1.02 * brute


def test_all_zero_input_gives_scale_zero():
    for cls in (MinMaxObserver, EMAObserver, PercentileObserver, OMSEObserver):
        o = cls()
        o.observe(torch.zeros(10))
        assert float(o.qparams(INT8_ACT).scale) == 0.0


# ------------------------------------------------------------------ errors


def test_observer_errors_name_the_argument():
    with pytest.raises(ValueError, match="observe"):
        MinMaxObserver().qparams(INT8_ACT)
    o = OMSEObserver()
    with pytest.raises(ValueError, match="NaN"):
        o.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="floating"):
        o.observe(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="empty"):
        o.observe(torch.zeros(0))
    with pytest.raises(ValueError, match="axis"):
        MinMaxObserver(axis=2).observe(torch.zeros(3, 3))
    c = MinMaxObserver(axis=0)
    c.observe(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="channels"):
        c.observe(torch.zeros(4, 2))
    s = MinMaxObserver()
    s.observe(torch.ones(3))
    with pytest.raises(ValueError, match="symmetric"):
        s.qparams(Grid.unsigned(8))
    a = MinMaxObserver(symmetric=False)
    a.observe(torch.ones(3))
    with pytest.raises(ValueError, match="unit-step"):
        a.qparams(Grid.for_format("int2"))
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(percentile=30)
    with pytest.raises(ValueError, match="momentum"):
        EMAObserver(momentum=1.0)
    with pytest.raises(ValueError, match="num_candidates"):
        OMSEObserver(num_candidates=0)
    with pytest.raises(ValueError, match="bins"):
        OMSEObserver(bins=10)
    with pytest.raises(ValueError, match="observer must be one of"):
        make_observer("kl")
    with pytest.raises(ValueError, match="observe"):
        make_observer(lambda **kw: object())


def test_make_observer_builds_each_kind():
    for name, cls in obs.OBSERVERS.items():
        made = make_observer(name, axis=0, symmetric=False)
        assert isinstance(made, cls) and made.axis == 0 and not made.symmetric


# ------------------------------------------------------------------ weight codes


@pytest.mark.parametrize("fmt,group_size", [("int8", 0), ("int4", 32), ("int4", 128), ("int2", 32), ("int2", 0), ("ternary", 0)])
@pytest.mark.parametrize("k", [1, 7, 200])
def test_codes_with_the_format_scales_equal_quantize_weight(fmt, group_size, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(9, k, generator=g)
    w[2] = 0.0  # a zero row: scale 0
    codes, scale = primitives.quantize_weight(w, fmt, group_size)
    assert torch.equal(quantize_weight_with_scales(w, fmt, scale, group_size), codes)


def test_nearest_levels_and_codes_roundtrip():
    r = torch.tensor([[-9.0, -2.2, -0.4, 0.4, 1.9, 2.1, 9.0]])
    assert nearest_levels(r, "int2").tolist() == [[-3, -3, -1, 1, 1, 3, 3]]
    assert nearest_levels(r, "int4").tolist() == [[-7, -2, -0, 0, 2, 2, 7]]
    assert nearest_levels(r, "ternary").tolist() == [[-1, -1, -0, 0, 1, 1, 1]]
    codes = codes_from_levels(nearest_levels(r, "int2"), "int2")
    assert codes.shape == (1, 128) and codes[0, :7].tolist() == [0, 0, 1, 2, 2, 3, 3]
    assert bool((codes[0, 7:] == formats.INT2.pad_code).all())
    with pytest.raises(ValueError, match="levels"):
        codes_from_levels(torch.tensor([[2.0]]), "int2")  # even: not an int2 level
    with pytest.raises(ValueError, match="levels"):
        codes_from_levels(torch.tensor([[8.0]]), "int4")


def test_omse_weight_scales_lower_the_weight_error():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(32, 256, generator=g) * 0.02
    w[:, 5] = 0.3  # an outlier column
    for fmt, gs in (("int4", 128), ("int2", 64), ("ternary", 0)):
        c_rtn, s_rtn = primitives.quantize_weight(w, fmt, gs)
        c_omse, s_omse = quantize_weight_observed(w, fmt, gs, "omse")
        e_rtn = (primitives.dequantize_codes(c_rtn, s_rtn, fmt, 256) - w).norm()
        e_omse = (primitives.dequantize_codes(c_omse, s_omse, fmt, 256) - w).norm()
        assert e_omse < e_rtn, fmt


def test_observed_scales_ignore_padding_and_bad_inputs():
    w = torch.full((2, 130), 0.5)
    s = observed_weight_scales(w, "int2", 32, "omse")
    assert s.shape == (2, 8)  # K_pad = 256 -> 8 groups
    assert bool((s[:, 5:] == 0).all())  # groups made only of padding
    assert bool((s[:, :5] > 0).all())
    with pytest.raises(ValueError, match="weight"):
        observed_weight_scales(torch.ones(3), "int4", 32)
    with pytest.raises(ValueError, match="scale must have shape"):
        quantize_weight_with_scales(w, "int4", torch.ones(2), 32)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight_with_scales(w, "ternary", torch.ones(2), 32)


def test_load_quantized_weight_into_a_quantlinear():
    from pyclipq.configs import LayerConfig
    from pyclipq.nn import QuantLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 96, generator=g)
    layer = QuantLinear.from_weight(w, None, LayerConfig("int2", group_size=32, activation="none"))
    codes, scale = quantize_weight_observed(w, "int2", 32, "omse")
    load_quantized_weight(layer, codes, scale)
    torch.testing.assert_close(layer.dequantize_weight(), primitives.dequantize_codes(codes, scale, "int2", 96))
    with pytest.raises(ValueError, match="codes must have shape"):
        load_quantized_weight(layer, codes[:, :64], scale)
    with pytest.raises(ValueError, match="must lie in"):
        load_quantized_weight(layer, torch.full_like(codes, 4), scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        load_quantized_weight(layer, codes, scale[:, :1])


def test_omse_refinements_lower_the_error():
    # The coarse grid alone, then + the finer grid, then + the least-squares steps: each stage
    # may only lower the error, and here each lowers it measurably.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 128, generator=g) * torch.rand(256, 1, generator=g)
    w[:, 3] *= 4
    grid = Grid.for_format("int8")
    errors = []
    for kwargs in (dict(refine_candidates=0, refine_steps=0), dict(refine_steps=0), {}):
        o = OMSEObserver(axis=0, **kwargs)
        o.observe(w)
        errors.append(float(quantization_error(w, o.qparams(grid).scale[:, None], 0, grid)))
    assert errors[1] < 0.995 * errors[0]
    assert errors[2] < 0.995 * errors[1]
