"""ONNX Runtime and OpenVINO contenders: the towers exported to ONNX once, each contender built
and timed by worker.py in processes of its own, its results read back."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...eval.encode import as_clip_like
from .worker import CONTENDERS

RUNTIME_PEERS = tuple(CONTENDERS)
# torch.onnx.export's dynamo exporter writes through onnxscript
EXPORT_PACKAGES = ("onnx", "onnxscript")
INSTALL_HINT = "pip install 'pyclipq[peers]'"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


class RuntimePeerError(RuntimeError):
    """A contender timed in a process of its own (a runtime peer, a forced CPU table) could not be
    exported, built or timed."""


@dataclass
class TowerInputs:
    timed: dict[str, torch.Tensor]  # "image@8" -> the batch timed under that key
    fidelity: torch.Tensor  # the batch whose features are compared with fp32
    calibration: torch.Tensor  # what static int8 PTQ (NNCF) calibrates on


@dataclass
class RuntimePeerRun:
    latency_ms: dict[str, float]
    size_bytes: int
    prepare_s: float  # the towers' export + building the contender's models + loading them
    features: dict[str, torch.Tensor]  # tower -> features on the fidelity batch
    runtime: str  # "onnxruntime" | "openvino"
    runtime_version: str
    precision: str | None  # what the runtime computed in where it chose ("bf16"); None where it was set


def run_child(label: str, argv: list[str], cwd: str, env: dict | None = None) -> None:
    """Run a benchmark's child process; a RuntimePeerError with its last stderr line if it fails.

    Its output (a runtime's warnings, NNCF's progress) is shown only on failure.
    """
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()] or [f"exit code {proc.returncode}"]
        raise RuntimePeerError(f"{label} failed: {lines[-1][:200]}")


def packages_needed(peer: str) -> tuple[str, ...]:
    return (*EXPORT_PACKAGES, *CONTENDERS[peer].packages)


class _Tower(nn.Module):
    """One tower of a CLIP-like model as a module of its own, which torch.onnx.export takes."""

    def __init__(self, model: nn.Module, tower: str):
        super().__init__()
        self.model = as_clip_like(model)
        self.tower = tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, f"encode_{self.tower}")(x)


def _export(model: nn.Module, tower: str, example: torch.Tensor, path: str) -> None:
    # Exported with a free batch dimension: one model file serves every timed batch.
    # The example batch must not be 1, which torch.export would specialize on.
    example = example[:1].expand(2, *example.shape[1:]).contiguous()
    # external data: a tower past protobuf's 2 GB limit (ViT-H and up) still exports
    torch.onnx.export(_Tower(model, tower).eval(), (example,), path, input_names=[tower], output_names=["features"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=True,
                      verbose=False)


class ChildWorkspace:
    """A temporary directory that child processes read, filled by `_fill` on entry and removed on
    exit (also when filling fails). Use it as a context manager."""

    prefix = "pyclipq-"

    def __enter__(self):
        self.dir = tempfile.mkdtemp(prefix=self.prefix)
        try:
            self._fill()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _fill(self) -> None:
        raise NotImplementedError


class RuntimePeerWorkspace(ChildWorkspace):
    """A temporary directory with the exported towers and their inputs as .npy files, from which
    `run(peer)` builds and times one contender. Use it as a context manager."""

    prefix = "pyclipq-peers-"

    def __init__(self, model: nn.Module, towers: dict[str, TowerInputs], threads: int, reps: int, warmup: int,
                 rounds: int = 1):
        self.model, self.towers = model, towers
        self.settings = {"threads": threads, "reps": reps, "warmup": warmup, "rounds": rounds}

    def _fill(self) -> None:
        self.tower_files = self._write_towers()

    def _write_towers(self) -> dict[str, dict]:
        os.makedirs(os.path.join(self.dir, "export"))
        os.makedirs(os.path.join(self.dir, "inputs"))
        files = {}
        t0 = time.perf_counter()
        for tower, inputs in self.towers.items():
            onnx_path = os.path.join(self.dir, "export", f"{tower}.onnx")
            try:
                _export(self.model, tower, inputs.fidelity, onnx_path)
            except Exception as e:  # the exporter raises many types; each means "this model does not export"
                raise RuntimePeerError(f"the {tower} tower does not export to ONNX "
                                       f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})") from e
            files[tower] = {"onnx": onnx_path,
                            "fidelity": self._save(f"{tower}_fidelity", inputs.fidelity),
                            "calibration": self._save(f"{tower}_calibration", inputs.calibration),
                            "timed": {key: self._save(key.replace("@", "_"), x) for key, x in inputs.timed.items()}}
        self.export_s = time.perf_counter() - t0
        return files

    def _save(self, name: str, x: torch.Tensor) -> str:
        path = os.path.join(self.dir, "inputs", f"{name}.npy")
        np.save(path, x.numpy())
        return path

    def _worker(self, peer: str, command: str, spec_path: str) -> dict:
        # It runs in the contender's fresh directory: onnx checks that the external data file it
        # is about to write does not exist yet relative to the working directory, not to the model.
        run_child(f"{peer} {command}", [sys.executable, WORKER, command, spec_path], cwd=os.path.dirname(spec_path))
        with open(os.path.join(os.path.dirname(spec_path), f"{command}.json")) as f:
            return json.load(f)

    def run(self, peer: str) -> RuntimePeerRun:
        if peer not in CONTENDERS:
            raise ValueError(f"peer must be one of {list(RUNTIME_PEERS)}, got {peer!r}")
        peer_dir = os.path.join(self.dir, peer)
        os.makedirs(peer_dir)
        spec_path = os.path.join(peer_dir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump({"contender": peer, "dir": peer_dir, "towers": self.tower_files, **self.settings}, f)
        built = self._worker(peer, "build", spec_path)
        timed = self._worker(peer, "time", spec_path)
        return RuntimePeerRun(latency_ms=timed["latency_ms"], size_bytes=built["size_bytes"],
                              prepare_s=self.export_s + built["seconds"] + timed["load_s"],
                              features={t: torch.from_numpy(np.load(p)) for t, p in timed["features"].items()},
                              runtime=CONTENDERS[peer].runtime, runtime_version=timed["runtime_version"],
                              precision=timed["precision"] if CONTENDERS[peer].precision is None else None)
