"""Saving and loading converted models: one safetensors file, never a pickle.

The file holds the model's whole state dict (packed weights, scales, the float
parameters that stayed float) plus JSON metadata under the "pyclipq" key:
checkpoint / format / config versions, the pyclipq version, the source
implementation and model class, and every conversion Target with its per-layer
config. Ternary weights are written in the base-3 storage layout (5 trits per
byte, docs/FORMATS.md) and turned back into the compute layout on load.

API: ``save(model, path)`` and ``load(path, model)``, where `model` is a freshly
built float model of the same architecture (e.g. ``open_clip.create_model(name,
pretrained=None)``): load replays the recorded swaps on it, fills it from the
file and returns it. If load raises after the swaps began, rebuild the float
model before trying again.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import formats, ops
from ._version import __version__
from .configs import CONFIG_VERSION
from .models import detect_adapter
from .models.base import class_path, fuse_blocks_, patch_embeddings_as_matmul_
from .nn import PackedWeight
from .transform import BUILDERS, Target, TargetError, apply_target, targets_in_model

CHECKPOINT_VERSION = 1
METADATA_KEY = "pyclipq"
TERNARY_STORAGE_LAYOUT = "ternary_base3_5_per_byte"
# safetensors refuses headers above 100 MB; a larger length field is corruption.
MAX_HEADER_BYTES = 100 * 2**20


class CheckpointError(ValueError):
    """A file that pyclipq.load cannot use; the subclass says why."""


class TruncatedCheckpointError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class ForeignCheckpointError(CheckpointError):
    """A readable safetensors file that pyclipq did not write."""


class UnsupportedCheckpointVersionError(CheckpointError):
    pass


class ArchitectureMismatchError(CheckpointError):
    """The checkpoint was saved from a different architecture than the model given to load."""


# ------------------------------------------------------------------ save

def _ternary_keys(model: nn.Module) -> dict[str, int]:
    """State-dict key of every ternary packed weight -> its in_features (true K)."""
    keys = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedWeight) and module.layer.spec is not None and module.layer.spec.trit_storage:
            keys[f"{name}.packed_weight" if name else "packed_weight"] = module.in_features
    return keys


def ternary_to_storage(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Compute layout (2-bit block-planar) -> storage layout (base 3, 5 trits per byte)."""
    return ops.pack_trits(ops.unpack_codes(packed, formats.TERNARY.bits), in_features)


def ternary_from_storage(stored: torch.Tensor, in_features: int) -> torch.Tensor:
    return ops.pack_codes(ops.unpack_trits(stored, in_features), formats.TERNARY.bits)


def _cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no storage shared between keys (safetensors refuses sharing)."""
    out, seen = {}, set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a converted model to one safetensors file (see the module docstring)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    targets = targets_in_model(model)
    if not targets:
        raise ValueError("model has no pyclipq layers: convert it with pyclipq.convert before saving")
    state = dict(model.state_dict())
    layouts = {}
    for key, in_features in _ternary_keys(model).items():
        state[key] = ternary_to_storage(state[key], in_features)
        layouts[key] = {"layout": TERNARY_STORAGE_LAYOUT, "in_features": in_features}
    tensors = _cpu_tensors(state)
    report = getattr(model, "pyclipq_report", None)
    metadata = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "format_version": formats.FORMAT_VERSION,
        "config_version": CONFIG_VERSION,
        "pyclipq_version": __version__,
        "torch_version": torch.__version__,
        "source": detect_adapter(model).name,
        "model_class": class_path(model),
        "config": report.config.to_dict() if report is not None else None,
        "targets": [t.to_dict() for t in targets],
        "storage_layouts": layouts,
        "sha256": _checksum(tensors),
    }
    path = os.fspath(path)
    # Write next to the destination and rename, so a crash never leaves a half-written checkpoint.
    fd, tmp = tempfile.mkstemp(prefix=".pyclipq-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(metadata)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------ load

def _read_header(path: str) -> dict:
    """The safetensors JSON header, with truncation and corruption told apart."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise TruncatedCheckpointError(f"{path!r} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise CorruptCheckpointError(f"{path!r} has a corrupted header: its length field says {header_len} bytes")
        if header_len > size - 8:
            raise TruncatedCheckpointError(
                f"{path!r} is truncated: the header needs {header_len} bytes but only {size - 8} follow"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path!r} has a corrupted header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path!r} has a corrupted header (not a JSON object)")
    try:
        data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CorruptCheckpointError(f"{path!r} has a corrupted header (bad tensor entries)") from None
    if 8 + header_len + data_end > size:
        raise TruncatedCheckpointError(
            f"{path!r} is truncated: its tensors need {8 + header_len + data_end} bytes, the file has {size}"
        )
    return header


def read_metadata(path: str | os.PathLike) -> dict:
    """The pyclipq metadata of a checkpoint, validated (no tensor is read)."""
    path = os.fspath(path)
    header = _read_header(path)
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise ForeignCheckpointError(f"{path!r} is a safetensors file but not a pyclipq checkpoint (no {METADATA_KEY!r} metadata)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{path!r} has corrupted pyclipq metadata (not valid JSON: {e})") from None
    required = ("checkpoint_version", "format_version", "model_class", "targets", "storage_layouts", "sha256")
    missing = [k for k in required if not isinstance(metadata, dict) or k not in metadata]
    if missing:
        raise CorruptCheckpointError(f"{path!r} has corrupted pyclipq metadata: missing {missing}")
    for field, supported in (
        ("checkpoint_version", CHECKPOINT_VERSION),
        ("format_version", formats.FORMAT_VERSION),
        ("config_version", CONFIG_VERSION),
    ):
        version = metadata.get(field, supported)
        if not isinstance(version, int) or version > supported:
            raise UnsupportedCheckpointVersionError(
                f"{path!r} has {field} {version!r}, this pyclipq reads up to {supported}: "
                f"it was written by a newer pyclipq ({metadata.get('pyclipq_version')}); upgrade pyclipq to load it"
            )
    return metadata


# Scale buffers and what a valid one holds. A weight scale of 0 is valid: it stands for an all-zero
# row or group (docs/FORMATS.md); an activation scale of 0 marks a layer not calibrated yet, which
# the layer reports when called.
SCALE_BUFFERS = ("weight_scale", "act_scale")


def _check_scales(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Every scale finite and >= 0: a NaN or negative scale would only surface layers later, as
    "x contains NaN" or silently wrong signs, even in a file whose checksum is right."""
    for key, t in tensors.items():
        if key.rsplit(".", 1)[-1] not in SCALE_BUFFERS or not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t) | (t < 0)
        if bool(bad.any()):
            first = t.reshape(-1)[bad.reshape(-1)][0].item()
            raise CorruptCheckpointError(
                f"{path!r} has an invalid scale tensor {key!r}: {int(bad.sum())} of its {t.numel()} values are not "
                f"finite and >= 0 (first: {first})"
            )


def _load_tensors(path: str, metadata: dict) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(path, device="cpu")
    except SafetensorError as e:
        raise CorruptCheckpointError(f"{path!r} is corrupted: safetensors cannot read it ({e})") from None
    if _checksum(tensors) != metadata["sha256"]:
        raise CorruptCheckpointError(f"{path!r} is corrupted: its tensor data does not match the recorded sha256")
    _check_scales(tensors, path)
    for key, layout in metadata["storage_layouts"].items():
        if layout.get("layout") != TERNARY_STORAGE_LAYOUT or key not in tensors:
            raise CorruptCheckpointError(f"{path!r} has an unknown storage layout entry {key!r}: {layout!r}")
        try:
            tensors[key] = ternary_from_storage(tensors[key], int(layout["in_features"]))
        except (ValueError, RuntimeError) as e:
            raise CorruptCheckpointError(f"{path!r} has a corrupted ternary weight {key!r}: {e}") from None
    return tensors


def _check_targets_fit(model: nn.Module, targets: list[Target], path: str) -> None:
    """Every recorded swap must find its float module before any swap is done."""
    for target in targets:
        builder = BUILDERS.get(target.target)
        if builder is None:
            raise UnsupportedCheckpointVersionError(
                f"{path!r} needs conversion target {target.target!r}, unknown to this pyclipq (known: {sorted(BUILDERS)})"
            )
        owner_name, _, attr = target.name.rpartition(".")
        try:
            obj = getattr(model.get_submodule(owner_name), attr, None)
        except AttributeError:
            obj = None
        if obj is None or not builder.accepts(obj):
            raise ArchitectureMismatchError(
                f"{path!r} does not fit this model: {target.name!r} should be {builder.describe}, "
                f"the model has {type(obj).__name__ if obj is not None else 'nothing'} there"
            )


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Rebuild a saved converted model into `model` (a fresh float model of the same architecture) and return it."""
    path = os.fspath(path)
    metadata = read_metadata(path)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a freshly built float torch.nn.Module, got {type(model).__name__}")
    if targets_in_model(model):
        raise ValueError("model must be a freshly built float model; it already holds pyclipq layers")
    if class_path(model) != metadata["model_class"]:
        raise ArchitectureMismatchError(
            f"{path!r} was saved from a {metadata['model_class']}, the model given is a {class_path(model)}"
        )
    try:
        targets = [Target.from_dict(t) for t in metadata["targets"]]
    except ValueError as e:
        raise CorruptCheckpointError(f"{path!r} has corrupted pyclipq metadata: {e}") from None
    _check_targets_fit(model, targets, path)
    tensors = _load_tensors(path, metadata)
    patch_embeddings_as_matmul_(model, detect_adapter(model))
    with torch.no_grad():
        for target in targets:
            try:
                apply_target(model, target, quantize=False)
            except (TargetError, ValueError) as e:
                raise ArchitectureMismatchError(f"{path!r} does not fit this model: {e}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ArchitectureMismatchError(f"{path!r} does not fit this model's state: {e}") from None
    fuse_blocks_(model, detect_adapter(model))  # as convert does: a runtime choice, nothing saved
    return model
