"""Builds or times one ONNX Runtime / OpenVINO contender of `pyclipq bench`, in a process of its own.

The benchmark runs this file as a script, `python worker.py build|time SPEC.json`, never as
part of the pyclipq package: a `time` process loads numpy and its one runtime and nothing
else. torch's OpenMP workers keep spinning after each parallel region, and in a shared
process they starved ONNX Runtime's pool (its int8 image tower measured 45 ms interleaved
with torch, 20.6 ms alone on the same 2 cores). `build` is a process of its own because
NNCF imports torch.

SPEC.json (written by pyclipq.cli.peers.runtimes):
    {"contender": "ort_int8", "dir": DIR, "threads": 2, "reps": 5, "warmup": 2,
     "towers": {"image": {"onnx": PATH, "calibration": NPY, "fidelity": NPY,
                          "timed": {"image@1": NPY, ...}}, ...}}
`build` writes the contender's models into DIR and DIR/build.json; `time` writes
DIR/time.json (median ms per "tower@batch", the precision OpenVINO computed in) and each
tower's features on the fidelity batch.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Callable, NamedTuple

import numpy as np


def _existing_onnx(spec: dict, tower: str) -> str:
    return spec["towers"][tower]["onnx"]


def _ort_int8(spec: dict, tower: str) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = os.path.join(spec["dir"], f"{tower}.onnx")
    # external data: a tower past protobuf's 2 GB limit (ViT-H and up) still writes
    quantize_dynamic(_existing_onnx(spec, tower), out, weight_type=QuantType.QInt8, use_external_data_format=True)
    return out


def _openvino_ir(spec: dict, tower: str, quantize: bool) -> str:
    import openvino as ov

    model = ov.Core().read_model(_existing_onnx(spec, tower))
    if quantize:
        import nncf

        # Random inputs of the tower's shape: they set NNCF's activation ranges well enough
        # to time the int8 model; they say nothing of its accuracy on real data.
        samples = np.load(spec["towers"][tower]["calibration"])
        dataset = nncf.Dataset([samples[i : i + 1] for i in range(len(samples))])
        model = nncf.quantize(model, dataset, subset_size=len(samples), model_type=nncf.ModelType.TRANSFORMER)
    out = os.path.join(spec["dir"], f"{tower}.xml")
    # fp32 on disk as in memory: save_model would otherwise halve the float weights
    ov.save_model(model, out, compress_to_fp16=False)
    return out


class Contender(NamedTuple):
    runtime: str  # a key of LOADERS
    make_model: Callable[[dict, str], str]  # (spec, tower) -> the model file `time` loads
    packages: tuple[str, ...]  # what building and timing it import
    # OpenVINO's INFERENCE_PRECISION_HINT; None leaves it to OpenVINO: bf16 on CPUs with
    # AVX512_BF16 or AMX, f32 elsewhere
    precision: str | None = None


CONTENDERS = {
    "ort_fp32": Contender("onnxruntime", _existing_onnx, ("onnxruntime",)),
    "ort_int8": Contender("onnxruntime", _ort_int8, ("onnxruntime", "onnx")),
    # f32: on CPUs with bf16 OpenVINO would otherwise compute in bf16
    "openvino_fp32": Contender("openvino", lambda spec, tower: _openvino_ir(spec, tower, quantize=False),
                               ("openvino",), precision="f32"),
    "openvino_int8": Contender("openvino", lambda spec, tower: _openvino_ir(spec, tower, quantize=True),
                               ("openvino", "nncf"), precision="f32"),
    # the same fp32 IR at OpenVINO's default precision: what a user who just loads the model gets
    "openvino": Contender("openvino", lambda spec, tower: _openvino_ir(spec, tower, quantize=False), ("openvino",)),
}


def _onnxruntime_session(path: str, threads: int, precision: str | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    # ONNX Runtime computes a float graph in its own dtype: there is no precision to report
    return (lambda x: session.run(None, {input_name: x})[0]), ort.__version__, None


def _openvino_compiled(path: str, threads: int, precision: str | None):
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(path, "CPU", config)
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # what it computes in: "bf16", "f32"
    return (lambda x: compiled(x)[0]), ov.__version__.split("-")[0], chosen  # "2026.4.1-22982-<commit>-releases/..."


LOADERS = {"onnxruntime": _onnxruntime_session, "openvino": _openvino_compiled}


def _model_bytes(path: str) -> int:
    """The model file and its sidecars (ONNX external data, OpenVINO's .bin): DIR/<tower>.*"""
    folder, stem = os.path.dirname(path), os.path.basename(path).split(".")[0]
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.startswith(stem + "."))


def build(spec: dict) -> dict:
    make_model = CONTENDERS[spec["contender"]].make_model
    t0 = time.perf_counter()
    models = {tower: make_model(spec, tower) for tower in spec["towers"]}
    return {"models": models, "seconds": time.perf_counter() - t0,
            "size_bytes": sum(_model_bytes(path) for path in models.values())}


def _median_ms(run, x: np.ndarray, reps: int, warmup: int, rounds: int = 1) -> float:
    """The best over `rounds` of the median ms over `reps` calls (after `warmup` calls)."""
    for _ in range(warmup):
        run(x)
    best = float("inf")
    for _ in range(rounds):
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            run(x)
            samples.append((time.perf_counter() - t0) * 1e3)
        best = min(best, statistics.median(samples))
    return best


def time_contender(spec: dict) -> dict:
    with open(os.path.join(spec["dir"], "build.json")) as f:
        models = json.load(f)["models"]
    contender = CONTENDERS[spec["contender"]]
    result = {"latency_ms": {}, "features": {}, "load_s": 0.0}
    for tower, inputs in spec["towers"].items():
        t0 = time.perf_counter()
        run, result["runtime_version"], result["precision"] = LOADERS[contender.runtime](
            models[tower], spec["threads"], contender.precision)
        result["load_s"] += time.perf_counter() - t0
        features = os.path.join(spec["dir"], f"{tower}_features.npy")
        np.save(features, run(np.load(inputs["fidelity"])))
        result["features"][tower] = features
        for key, path in inputs["timed"].items():
            result["latency_ms"][key] = _median_ms(run, np.load(path), spec["reps"], spec["warmup"],
                                                   spec.get("rounds", 1))
    return result


COMMANDS = {"build": build, "time": time_contender}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in COMMANDS:
        print(f"usage: worker.py {{{'|'.join(COMMANDS)}}} SPEC.json, got {argv}", file=sys.stderr)
        return 2
    command, spec_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = COMMANDS[command](spec)
    with open(os.path.join(spec["dir"], f"{command}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
