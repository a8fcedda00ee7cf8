"""Error-compensating weight rounding from calibration activations (GPTQ; Frantar et al., 2022).

Round-to-nearest (RTN) rounds every weight on its own. GPTQ rounds the columns of a
layer's weight one at a time and pushes each column's rounding error onto the columns
not yet rounded, weighted by the inverse Hessian of the layer's reconstruction loss
``||X W^T - X W_hat^T||^2`` over calibration inputs X. The steps (numbered as in the
GPTQ paper's Algorithm 1):

1. ``H = 2 X^T X / n`` from the inputs, accumulated batch by batch (`HessianAccumulator`,
   one [K, K] matrix per layer whatever the number of batches).
2. Dampen: ``H += damp * mean(diag H) * I`` so that H is safely positive definite;
   a column no input ever touched gets a unit diagonal (it is then rounded on its own).
3. ``U = cholesky(H^-1)`` (upper): row i of U holds what the OBS update of column i
   needs, in the order the columns are rounded, without re-inverting H per column.
4. For each block of ``block_size`` columns ("lazy batch" updates): round column i,
   ``err = (w_i - q_i) / U_ii``, update the rest of the block
   ``W[:, i:] -= err U[i, i:]``; after the block, update every later column at once
   ``W[:, end:] -= Err U[block, end:]`` (one matrix product instead of one per column).

Group scales (int4 / int2 with group_size > 0) are chosen when the rounding reaches a
group's first column, from the *updated* weights of that group, which is what makes
GPTQ's groups fit the error it has pushed into them. Per-channel scales (int8, ternary,
group_size 0) are fixed from the original weight before rounding starts. Scales come
from the format's rule or from an observer (e.g. OMSE-clipped).

The result is unpacked codes and scales in the format's layout, which
`pyclipq.calibrate.weights.load_quantized_weight` writes into a QuantLinear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import formats, primitives
from ._threads import one_thread
from .observers import Grid, make_observer
from .weights import (
    codes_from_levels,
    nearest_levels,
    observed_weight_scales,
    output_aware_scales,
    quantize_weight_observed,
)

__all__ = ["HessianAccumulator", "GPTQResult", "gptq_quantize", "rtn_quantize", "layer_output_error"]


class HessianAccumulator:
    """Streams ``H = 2/n sum_t x_t x_t^T`` over the input rows of one linear layer.

    Memory is one [K, K] float32 matrix. Each batch rescales the running mean
    (``H <- H * n / (n + m) + 2/(n + m) X^T X``) so no batch is kept.
    """

    def __init__(self, in_features: int):
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"in_features must be an int >= 1, got {in_features!r}")
        self.in_features = in_features
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.num_samples = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs [..., K] (every leading index is one sample row)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got shape {list(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(device="cpu", dtype=torch.float32)
        if not primitives.all_finite(rows):
            raise ValueError("x contains NaN or Inf")
        m = rows.shape[0]
        if m == 0:
            return
        total = self.num_samples + m
        self.hessian.mul_(self.num_samples / total)
        rows = rows * (2.0 / total) ** 0.5
        self.hessian.addmm_(rows.t(), rows)
        self.num_samples = total


@dataclass
class GPTQResult:
    codes: torch.Tensor  # unpacked [N, K_pad] (int8 for int8, uint8 otherwise)
    scale: torch.Tensor  # [N] or [N, G] float32
    weight: torch.Tensor  # the dequantized weight [N, K] (what the kernels compute with)
    damp: float  # the damping that made H positive definite (relative to mean diag)


def _check_inputs(weight, hessian, fmt, group_size):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point 2-D tensor [N, K], got {getattr(weight, 'shape', type(weight).__name__)}")
    if not primitives.all_finite(weight):
        raise ValueError("weight contains NaN or Inf")
    k = weight.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must be a [K, K] = [{k}, {k}] tensor, got {getattr(hessian, 'shape', type(hessian).__name__)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or Inf")
    fmt = formats.as_format(fmt)
    if fmt.grouped:
        formats.check_group_size(group_size)
    elif group_size != 0:
        raise ValueError(f"group_size must be 0 for format {fmt.name!r} (one scale per output channel), got {group_size}")
    return fmt


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Steps 2-3: dampen H and return U, upper triangular with H^-1 = U^T U.

    With J the reversal permutation and J H J = L L^T (Cholesky), H^-1 = J L^-T L^-1 J
    = M^T M for M = J L^-1 J, which is upper triangular with a positive diagonal, hence
    the Cholesky factor of H^-1: one factorisation and one triangular inverse, without
    forming H^-1 (3x cheaper than cholesky -> cholesky_inverse -> cholesky at K = 3072).
    More damping is tried if H is still singular.
    """
    h = hessian.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0  # no input ever reached this column: round it on its own
    mean = float(diag.mean())
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    reversed_h = h.flip(0).flip(1)
    for attempt in range(6):
        factor = damp * (10**attempt)
        lower, info = torch.linalg.cholesky_ex(reversed_h + factor * mean * eye)
        if int(info) == 0:
            inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
            upper = inverse.flip(0).flip(1)
            if bool(torch.isfinite(upper).all()):
                return upper.to(torch.float32), factor
    raise ValueError("hessian is not positive definite even with strong damping; check the calibration inputs")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    fmt,
    group_size: int = 0,
    *,
    observer=None,
    threshold_rule: str = "absmean",
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    clip_search: bool = False,
) -> GPTQResult:
    """GPTQ-round `weight` [N, K] for the layer input Hessian `hessian` [K, K].

    observer: None = the format's scale rule (absmax / qmax; ternary: `threshold_rule`),
    or an observer name / factory ("omse", "percentile", ...) choosing each scale.
    act_order: round columns in order of decreasing H_ii (GPTQ's "act-order"); group
    scales are then fixed up front from the original weight ("static groups"), since a
    group's columns are no longer rounded together.
    clip_search: choose each scale by `weights.output_aware_scales` (least output error on
    this Hessian) instead of `observer`; group scales are searched on the group's updated
    weights against its diagonal block of H.
    """
    fmt = _check_inputs(weight, hessian, fmt, group_size)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise ValueError(f"damp must be a positive number, got {damp!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if observer is not None:
        make_observer(observer, "observer")  # validate the name early
        if clip_search:
            raise ValueError("observer and clip_search both choose the scales: pass one of them")
    grouped = fmt.grouped and group_size > 0
    if grouped and block_size % group_size:
        # A group must never straddle two blocks: its scale is chosen from the updated block.
        block_size = group_size * max(1, block_size // group_size)
    w = weight.detach().to(device="cpu", dtype=torch.float32).clone()
    n, k = w.shape
    grid = Grid.for_format(fmt)

    # Per-channel scales (and static group scales under act_order) come from the original weight.
    dynamic_groups = grouped and not act_order
    scale = None
    if not dynamic_groups and clip_search:
        scale = output_aware_scales(w, hessian, fmt, group_size if fmt.grouped else 0, threshold_rule)
    elif not dynamic_groups:
        scale = observed_weight_scales(w, fmt, group_size if fmt.grouped else 0, observer, threshold_rule)
    else:
        scale = torch.zeros(expected_groups_shape(n, k, group_size), dtype=torch.float32)

    perm = None
    h = hessian.detach().to(device="cpu", dtype=torch.float32)
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    upper, used_damp = _inverse_cholesky(h, float(damp))

    levels = torch.zeros(n, k, dtype=torch.float32)
    with one_thread():
        search = h if clip_search and dynamic_groups else None
        _round_columns(w, upper, scale, levels, fmt, group_size, dynamic_groups, perm, block_size, observer, grid,
                       search, threshold_rule)

    if perm is not None:
        inverse_perm = torch.argsort(perm)
        levels = levels[:, inverse_perm]
    codes = codes_from_levels(levels, fmt)
    dequantized = primitives.dequantize_codes(codes, scale, fmt, k)
    return GPTQResult(codes, scale, dequantized, used_damp)


def _round_columns(w, upper, scale, levels, fmt, group_size, dynamic_groups, perm, block_size, observer, grid,
                   search_hessian=None, threshold_rule="absmean"):
    """Step 4 in place: `levels` gets every column's level; `scale` gets the dynamic group scales
    (searched against `search_hessian`'s diagonal block when given)."""
    n, k = w.shape
    for start in range(0, k, block_size):  # step 4: blocks of columns, lazy updates
        end = min(start + block_size, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = upper[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if dynamic_groups:
                if col % group_size == 0:
                    # The group's scale from its columns as updated by the errors so far.
                    group = block[:, i : i + group_size]
                    if search_hessian is not None:
                        h_group = search_hessian[col : col + group.shape[1], col : col + group.shape[1]]
                        # the group alone is one "row group" (group_size 0): it may be a short last group
                        scale[:, col // group_size] = output_aware_scales(group, h_group, fmt, 0, threshold_rule)[:, 0]
                    else:
                        scale[:, col // group_size] = _group_scale(group, fmt, observer, grid)
                s = scale[:, col // group_size]
            elif scale.dim() == 2:  # grouped format: static groups (act_order) or one group per row
                original = int(perm[col]) if perm is not None else col
                s = scale[:, original // group_size] if group_size else scale[:, 0]
            else:
                s = scale
            column = block[:, i]
            inv = primitives.safe_inverse(s)
            lv = nearest_levels(column * inv, fmt)
            levels[:, col] = lv
            err = (column - lv * s) / u_block[i, i]
            block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        w[:, start:end] = block
        if end < k:
            w[:, end:] -= errors @ upper[start:end, end:]


def expected_groups_shape(n: int, k: int, group_size: int) -> tuple[int, int]:
    return n, formats.num_groups(formats.padded_k(k), group_size)


def _group_scale(group: torch.Tensor, fmt, observer, grid: Grid) -> torch.Tensor:
    if observer is None:
        # The format's rule for int4 / int2 groups: absmax / qmax (docs/FORMATS.md).
        return group.abs().amax(dim=1) / fmt.qmax
    obs = make_observer(observer, "observer", axis=0)
    obs.observe(group)
    return obs.qparams(grid).scale


def rtn_quantize(weight: torch.Tensor, fmt, group_size: int = 0, *, observer=None, threshold_rule: str = "absmean"):
    """Round-to-nearest with the same scale choices as `gptq_quantize` (the baseline it must beat)."""
    fmt = formats.as_format(fmt)
    if observer is None:
        codes, scale = primitives.quantize_weight(weight, fmt, group_size if fmt.grouped else 0, threshold_rule)
    else:
        codes, scale = quantize_weight_observed(weight, fmt, group_size, observer, threshold_rule)
    return codes, scale, primitives.dequantize_codes(codes, scale, fmt, weight.shape[1])


def layer_output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||_F / ||X W^T||_F: the relative error GPTQ minimises."""
    x = x.reshape(-1, weight.shape[1]).to(torch.float64)
    ref = x @ weight.to(torch.float64).t()
    return float((ref - x @ quantized.to(torch.float64).t()).norm() / ref.norm().clamp(min=1e-30))
