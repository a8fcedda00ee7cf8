"""Activation observation: every static layer's input observed over the batches, then its
per-tensor scale fixed."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import formats, primitives
from .observers import Grid, make_observer


# Streaming activation observers keep at most this many exact values per layer before
# switching to their fixed-size histogram: calibration memory stays O(layers * bins).
ACTIVATION_EXACT_VALUES = 1 << 16


def set_absmax_scale(module, x: torch.Tensor) -> None:
    """A static layer's per-tensor scale from `x` (its input as the quantizer sees it): absmax / 127,
    the provisional scale that lets a forward run before the observers fix the final one."""
    absmax = float(x.detach().abs().max()) if x.numel() else 0.0
    module.set_act_scale(absmax / formats.ACT_QMAX if absmax > 0 else 1.0)


def calibrate_activations(model, linears, source, run, observer, observer_kwargs, progress, report, description):
    """Observe every static layer's input over all batches, then fix its scale.

    While observing, each layer quantizes with the scale of the batch at hand (absmax / 127,
    per tensor) so the forward can run; the final scale replaces it afterwards.
    Returns the layers in the order of their first call (for GPTQ's chunks).
    """
    static = [(n, m) for n, m in linears if m.layer.activation == "static"]
    observers = {n: make_observer(observer, "observer", **observer_kwargs) for n, _ in static}
    order: list[str] = []
    seen: set[str] = set()
    handles = []
    batch_index = [0]

    def hook_for(name, module):
        obs = observers.get(name)

        def hook(mod, args):
            x = mod.transform_input(args[0])  # what the int8 quantizer sees
            if name not in seen:
                seen.add(name)
                order.append(name)
            if obs is None:
                return None
            if not primitives.all_finite(x):
                raise ValueError(
                    f"batches: the activations entering {name} contain NaN or Inf (calibration batch {batch_index[0]}); "
                    "static scales need finite activations - check the inputs and the float model"
                )
            obs.observe(x)
            set_absmax_scale(mod, x)
            return None

        return hook

    for name, module in linears:
        handles.append(module.register_forward_pre_hook(hook_for(name, module)))
    try:
        with torch.inference_mode():
            for batch in tqdm(source(), desc=f"calibrate: {description}", disable=not progress, leave=False):
                run(model, batch)
                batch_index[0] += 1
    finally:
        for h in handles:
            h.remove()
    report.passes += 1
    report.num_batches = batch_index[0]
    missing = [n for n, _ in static if observers[n].num_batches == 0]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(
            f"batches: no calibration batch reached {len(missing)} static layer(s) ({shown}); feed inputs for every "
            "tower, e.g. (images, token_ids) pairs for a CLIP model"
        )
    grid = Grid.activations()
    for name, module in static:
        scale = float(observers[name].qparams(grid).scale)
        if not scale > 0:
            # Every calibration input of this layer was 0: any positive scale quantizes them exactly.
            report.notes.append(f"{name}: all calibration inputs were 0; act_scale set to 1.0")
            scale = 1.0
        module.set_act_scale(scale)
    return order
