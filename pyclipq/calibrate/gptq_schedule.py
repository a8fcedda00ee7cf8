"""GPTQ scheduling: which layers share a pass over the batches (their Hessians fit the memory
budget), and the error-feedback rounding of each."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .. import primitives
from .gptq import HessianAccumulator, gptq_quantize, rtn_quantize
from .inputs import StopForward
from .requantize import proxy_error, stored_float_weight
from .weights import load_quantized_weight, output_aware_scales, quantize_weight_with_scales


def _chunks(order, modules, budget):
    """Consecutive layers (in call order) whose [K, K] float32 Hessians fit in `budget` bytes."""
    chunk, used = [], 0
    for name in order:
        k = modules[name].in_features
        size = 4 * k * k
        if chunk and used + size > budget:
            yield chunk
            chunk, used = [], 0
        chunk.append(name)
        used += size
    if chunk:
        yield chunk


def apply_gptq(model, linears, float_model, source, run, order, weight_observer, entries, progress, report, *,
                damp, block_size, act_order, budget, gptq=True, clip_search=False):
    """Collect each layer's input Hessian (in chunks that fit `budget`), then re-round its weight:
    GPTQ when `gptq`, else round-to-nearest; scales from `clip_search` (least output error),
    `weight_observer` or the format's rule."""
    modules = dict(linears)
    method = ("gptq" if gptq else "rtn") + ("+clip_search" if clip_search else "")
    # Layers called in the first pass, in call order, then any never called (they keep RTN).
    order = [n for n in order if n in modules]
    uncalled = [n for n in modules if n not in order]
    if uncalled:
        report.notes.append(f"GPTQ skipped {len(uncalled)} layer(s) no batch reached (kept as converted)")
    chunks = list(_chunks(order, modules, budget))
    for index, chunk in enumerate(chunks):
        wanted = set(chunk)
        accumulators = {n: HessianAccumulator(modules[n].in_features) for n in chunk}
        after = order.index(chunk[-1]) + 1
        stop_at = order[after] if after < len(order) else None
        seen: set[str] = set()
        handles = []

        def hook_for(name):
            def hook(mod, args):
                if name in wanted:
                    accumulators[name].add(mod.transform_input(args[0]))
                    seen.add(name)
                elif name == stop_at and seen == wanted:
                    # Every layer of this chunk has its inputs for this batch: skip the rest of the model.
                    raise StopForward
                return None

            return hook

        for name in chunk + ([stop_at] if stop_at else []):
            handles.append(modules[name].register_forward_pre_hook(hook_for(name)))
        try:
            with torch.inference_mode():
                for batch in tqdm(source(), desc=f"calibrate: {method} {index + 1}/{len(chunks)}", disable=not progress, leave=False):
                    seen.clear()
                    try:
                        run(model, batch)
                    except StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        report.passes += 1
        for name in chunk:
            module = modules[name]
            layer = module.layer
            w = stored_float_weight(float_model, name, module)
            hessian = accumulators.pop(name).hessian
            group_size = layer.activation_group_size
            rounding_started = time.perf_counter()
            if gptq:
                result = gptq_quantize(
                    w, hessian, layer.format, group_size, observer=None if clip_search else weight_observer,
                    threshold_rule=layer.threshold_rule, damp=damp, block_size=block_size, act_order=act_order,
                    clip_search=clip_search,
                )
                codes, scale, dequantized = result.codes, result.scale, result.weight
            else:
                scale = output_aware_scales(w, hessian, layer.format, group_size, layer.threshold_rule)
                codes = quantize_weight_with_scales(w, layer.format, scale, group_size)
                dequantized = primitives.dequantize_codes(codes, scale, layer.format, w.shape[1])
            key = "gptq_rounding" if gptq else "rounding"
            report.stage_seconds[key] = report.stage_seconds.get(key, 0.0) + time.perf_counter() - rounding_started
            _, _, rtn = rtn_quantize(w, layer.format, group_size, observer=weight_observer, threshold_rule=layer.threshold_rule)
            load_quantized_weight(module, codes, scale)
            entry = entries[name]
            entry.weights = method + (f"+{weight_observer}" if isinstance(weight_observer, str) and not clip_search else "")
            entry.proxy_error_rtn = proxy_error(rtn - w, w, hessian)
            entry.proxy_error = proxy_error(dequantized - w, w, hessian)
