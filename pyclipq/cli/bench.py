"""End-to-end benchmark of whole CLIP towers: fp32, bf16, torch quantize_dynamic, every pyclipq format
(also on forced CPU kernel tables), and ONNX Runtime / OpenVINO where they are installed.

`run_benchmark` measures image and text tower latency at several batch sizes, size on disk,
how many Linear layers run quantized, and fidelity vs the fp32 model. It is what
`pyclipq bench` runs; METHOD says how the contenders are timed.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

import pyclipq

from .. import formats
from ..convert import linear_inventory
from ..eval.encode import as_clip_like
from ..io import save
from ..models import pooled_only
from .loading import LoadedModel, encode, load_model, random_inputs
from .peers.forced_isa import ForcedIsaWorkspace, check_isas, isa_label
from .peers.runtimes import (
    INSTALL_HINT,
    RUNTIME_PEERS,
    RuntimePeerError,
    RuntimePeerWorkspace,
    TowerInputs,
    packages_needed,
)

PYCLIPQ_FORMATS = tuple(formats.FORMATS)  # every weight format, in the table's order
TORCH_PEERS = ("fp32", "torch-bf16", "quantize_dynamic")
# The float dtype a contender's images are fed in, cast once before timing: a user who runs
# a bf16 model feeds it bf16 (token ids stay integers).
INPUT_DTYPES = {"torch-bf16": torch.bfloat16}
# `--compile`: each pyclipq format also runs as "<format>+compile", its towers through torch.compile.
COMPILED_SUFFIX = "+compile"
# NNCF's static PTQ calibrates openvino_int8 on this many random inputs: enough to time it.
CALIBRATION_SAMPLES = 16
METHOD = (
    "The torch contenders (fp32, torch-bf16, quantize_dynamic, pyclipq formats) share torch's thread pool in "
    "one process and take turns call by call, so that a slow spell of the machine hits all of them alike; "
    "torch-bf16 is the fp32 model cast to bf16, fed images cast to bf16 before timing. Each ONNX Runtime "
    "and OpenVINO contender is timed alone, in its own process that loads only its runtime, while the torch "
    "process waits: torch's idle OpenMP threads would otherwise take cores from it. Every latency is the "
    f"median of the timed calls after the warm-up calls (with --rounds R: the best of R such medians). openvino_int8 is calibrated on {CALIBRATION_SAMPLES} "
    "random inputs: its speed is real, its fidelity is no measure of its accuracy on real data. openvino "
    "computes at OpenVINO's default precision (bf16 on CPUs with AVX512_BF16 or AMX), openvino_fp32 and "
    f"openvino_int8 in f32 where not int8. A '<format>{COMPILED_SUFFIX}' contender (--compile) is that "
    "format's model with its towers through torch.compile, compiled for every timed shape before timing. A "
    "'<format> [<table>]' contender (--isa) is that format on a forced CPU kernel table (PYCLIPQ_CPU_ISA, "
    "read once per process): the pyclipq formats of one table take turns as above in a process of their own, "
    "while the torch process waits."
)
# The smallest checkpoint of a format: its size is reported beside the timed contender.
# Ternary Q-ALL leaves the token and patch embeddings in fp32, a quarter of ViT-B/32's bytes.
SIZE_ONLY_PRESETS = {"ternary": "ternary-qall-embeddings"}


class CompiledTowers:
    """A converted model whose encode_image / encode_text run through torch.compile (inductor).

    The pyclipq ops trace through their fakes, so a tower compiles into one graph: what is left
    of the Python glue, the attention reshapes and the LayerNorm / GELU / residual kernels
    between the linears is fused or removed. One compilation per tower and batch size (static
    shapes), paid before timing starts.
    """

    def __init__(self, model: nn.Module):
        self.module = model  # what is counted and saved
        clip = as_clip_like(model)
        self.encode_image = torch.compile(clip.encode_image, dynamic=False)
        self.encode_text = torch.compile(clip.encode_text, dynamic=False)


@dataclass
class ContenderResult:
    name: str
    latency_ms: dict = field(default_factory=dict)  # "image@8" -> median ms
    size_bytes: int = 0
    # None for a runtime peer: its graph has no Linear modules to count
    linears_quantized: int | None = 0
    linears_total: int | None = 0
    fidelity: dict = field(default_factory=dict)
    convert_s: float = 0.0
    precision: str | None = None  # what a runtime peer computed in, where the runtime chose it


def _interleaved_median_ms(calls, reps: int, warmup: int, rounds: int = 1) -> list[float]:
    """The best over `rounds` of each call's median ms over `reps` calls; the calls take turns."""
    best = [float("inf")] * len(calls)
    with torch.inference_mode():
        for _ in range(rounds):
            times = [[] for _ in calls]
            for step in range(warmup + reps):
                for fn, samples in zip(calls, times):
                    t0 = time.perf_counter()
                    fn()
                    if step >= warmup:
                        samples.append((time.perf_counter() - t0) * 1e3)
            best = [min(b, statistics.median(t)) for b, t in zip(best, times)]
    return best


def _size_on_disk(name: str, model: nn.Module) -> int:
    if name == "quantize_dynamic":
        # torch's packed dynamic-quant weights only serialize through torch.save (pickle);
        # we measure its size, we never load it.
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        return buf.getbuffer().nbytes
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        if name in ("fp32", "torch-bf16"):  # plain torch models: their state dict
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            seen, unique = set(), {}
            for k, v in state.items():  # tied tensors are stored once
                key = (v.data_ptr(), v.shape)
                if key not in seen:
                    seen.add(key)
                    unique[k] = v
            save_file(unique, path)
        else:
            save(model, path)
        return os.path.getsize(path)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def _fidelity(features: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """Mean and min cosine to fp32 of each tower's features, e.g. {"image_cos_mean": ...}."""
    fidelity = {}
    for tower, x in features.items():
        cos = _cosine(x, reference[tower])
        fidelity.update({f"{tower}_cos_mean": cos.mean().item(), f"{tower}_cos_min": cos.min().item()})
    return fidelity


def missing_packages(packages: Iterable[str]) -> list[str]:
    """Those of `packages` that are not installed, found without importing any."""
    return [p for p in packages if importlib.util.find_spec(p) is None]


def plot_available() -> bool:
    return not missing_packages(["matplotlib"])


def select_runtime_peers(requested: Iterable[str] = ("auto",)) -> tuple[tuple[str, ...], str | None]:
    """The runtime peers to time, and a one-line notice of those skipped for missing packages.

    "auto" takes every installed one, "none" none; peers named one by one must be installed.
    """
    requested = list(requested)
    if len(requested) > 1 and {"auto", "none"} & set(requested):
        raise ValueError(f"peers: 'auto' and 'none' stand alone, got {requested}")
    unknown = [p for p in requested if p not in (*RUNTIME_PEERS, "auto", "none")]
    if unknown:
        raise ValueError(f"peers: unknown {unknown}; choose from {list(RUNTIME_PEERS)}, 'auto' or 'none'")
    wanted = {"auto": RUNTIME_PEERS, "none": ()}.get(requested[0], requested) if requested else ()
    missing = {peer: missing_packages(packages_needed(peer)) for peer in wanted}
    skipped = [peer for peer in wanted if missing[peer]]
    if not skipped:
        return tuple(wanted), None
    absent = ", ".join(sorted({package for peer in skipped for package in missing[peer]}))
    if requested != ["auto"]:
        raise ValueError(f"peers: {', '.join(skipped)} need {absent}, not installed; {INSTALL_HINT}")
    return (tuple(p for p in wanted if not missing[p]),
            f"skipping the runtime peers {', '.join(skipped)} ({absent} not installed); {INSTALL_HINT} to time them")


def machine_info(threads: int) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    info = pyclipq.build_info()
    # ops_threads: what the CPU ops really run on (1 if the build lacks its threading backend)
    return {"cpu": cpu, "cpu_isa": info["cpu_isa"], "threads": threads, "ops_threads": info["cpu_threads"],
            "torch": torch.__version__,
            "pyclipq_commit": commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def pyclipq_convert(model: nn.Module, config) -> nn.Module:
    return pyclipq.convert(model, config)


def build_contender(name: str, fp32: nn.Module):
    if name.endswith(COMPILED_SUFFIX):
        return CompiledTowers(pyclipq_convert(copy.deepcopy(fp32), name[: -len(COMPILED_SUFFIX)]))
    if name == "fp32":
        return fp32
    if name == "torch-bf16":
        return copy.deepcopy(fp32).to(torch.bfloat16)
    if name == "quantize_dynamic":
        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():
            # torch.ao's deprecation notices; the peer is measured as users still run it
            warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated")
            warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor, torch\.quantize_per_channel")
            peer = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
        # open_clip's text tower reads `mlp.c_fc.weight.dtype`, which torch's dynamic
        # Linear turns into a method; the peer's towers compute in fp32 anyway.
        for module in peer.modules():
            if hasattr(module, "get_cast_dtype"):
                module.get_cast_dtype = lambda: torch.float32
        return peer
    return pyclipq_convert(copy.deepcopy(fp32), name)


def _tower_inputs(loaded: LoadedModel, inputs: dict, towers, batches, fidelity_batch: int) -> dict[str, TowerInputs]:
    # seeded apart from the timed batches, whose seed is their size
    calibration = random_inputs(loaded, CALIBRATION_SAMPLES, seed=-1)
    index = {"image": 0, "text": 1}  # random_inputs gives (images, tokens)
    return {tower: TowerInputs(timed={f"{tower}@{b}": inputs[b][index[tower]] for b in batches},
                               fidelity=inputs[fidelity_batch][index[tower]], calibration=calibration[index[tower]])
            for tower in towers}


def _time_runtime_peers(loaded: LoadedModel, peers, towers: dict[str, TowerInputs], reference: dict, threads: int,
                        reps: int, warmup: int, rounds: int, bar) -> tuple[list[ContenderResult], list[dict], dict]:
    """Results of the peers that ran, {"name", "error"} of those that failed, and {runtime: version}."""
    results, failed, versions = [], [], {}
    if not peers:  # nothing to export
        return results, failed, versions
    try:
        with RuntimePeerWorkspace(loaded.model, towers, threads, reps, warmup, rounds) as workspace:
            for peer in peers:
                bar.set_postfix_str(peer)
                try:
                    run = workspace.run(peer)
                except RuntimePeerError as e:
                    failed.append({"name": peer, "error": str(e)})
                else:
                    versions[run.runtime] = run.runtime_version
                    results.append(ContenderResult(peer, latency_ms=run.latency_ms, size_bytes=run.size_bytes,
                                                   linears_quantized=None, linears_total=None,
                                                   fidelity=_fidelity(run.features, reference),
                                                   convert_s=run.prepare_s, precision=run.precision))
                bar.update()
    except RuntimePeerError as e:  # the export, which every peer needs
        failed = [{"name": peer, "error": str(e)} for peer in peers]
    return results, failed, versions


def _time_forced_isas(model: nn.Module, isas, settings: dict, inputs: dict, reference: dict,
                      bar) -> tuple[list[ContenderResult], list[dict]]:
    """The formats' results on each forced CPU table (one process each), and {"name", "error"} of failed tables."""
    results, failed = [], []
    if not isas:
        return results, failed
    with ForcedIsaWorkspace(model, inputs, reference, settings) as workspace:
        for isa in isas:
            bar.set_postfix_str(f"pyclipq [{isa}]")
            try:
                results += [ContenderResult(**r) for r in workspace.run(isa)]
            except RuntimePeerError as e:
                failed.append({"name": isa_label("pyclipq", isa), "error": str(e)})
            bar.update()
    return results, failed


class _PooledEncoder:
    """encode_image / encode_text of a contender, in pyclipq.pooled_only of `model` (the final block
    at the pooled rows only, where pyclipq fused it; a no-op for the float contenders), as `pyclipq
    embed` runs them. model None (torch.compile'd towers): the plain calls."""

    def __init__(self, clip, model: nn.Module | None):
        self.clip, self.model = clip, model

    def encode_image(self, images):
        with pooled_only(self.model, images=images) if self.model is not None else contextlib.nullcontext():
            return self.clip.encode_image(images)

    def encode_text(self, tokens):
        with pooled_only(self.model, tokens=tokens) if self.model is not None else contextlib.nullcontext():
            return self.clip.encode_text(tokens)


def time_torch_contenders(fp32: nn.Module, names, inputs: dict, batches, towers, fidelity_batch: int,
                          reference: dict, reps: int, warmup: int, bar=None, rounds: int = 1) -> list[ContenderResult]:
    """Build each named torch contender from `fp32` (build_contender), measure its size and fidelity,
    then time its towers, the contenders taking turns call by call. `inputs`: {batch: (images, tokens)}."""
    bar = bar if bar is not None else tqdm(disable=True)
    results, clips, feeds = [], [], []
    for name in names:
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        candidate = build_contender(name, fp32)
        r = ContenderResult(name, convert_s=time.perf_counter() - t0)
        module = candidate.module if isinstance(candidate, CompiledTowers) else candidate
        r.linears_quantized, r.linears_total = linear_inventory(module)
        r.size_bytes = _size_on_disk(name, module)
        bar.update()
        clip = _PooledEncoder(as_clip_like(candidate), None if isinstance(candidate, CompiledTowers) else candidate)
        dtype = INPUT_DTYPES.get(name, torch.float32)
        feed = {b: (images.to(dtype), tokens) for b, (images, tokens) in inputs.items()}
        with torch.inference_mode():
            if isinstance(candidate, CompiledTowers):  # compile every timed shape before any timing
                for b in batches:
                    clip.encode_image(feed[b][0])
                    clip.encode_text(feed[b][1])
            features = {"image": clip.encode_image(feed[fidelity_batch][0]),
                        "text": clip.encode_text(feed[fidelity_batch][1])}
        r.fidelity = _fidelity(features, reference)
        bar.update()
        results.append(r)
        clips.append(clip)
        feeds.append(feed)
    # Contenders take turns call by call, so that a slow spell of this (shared) machine hits
    # all of them alike instead of whichever one was being timed.
    for tower in towers:
        for b in batches:
            bar.set_postfix_str(f"{tower}@{b}")
            calls = [(lambda c=c, x=feed[b][0]: c.encode_image(x)) if tower == "image" else
                     (lambda c=c, x=feed[b][1]: c.encode_text(x)) for c, feed in zip(clips, feeds)]
            for r, ms in zip(results, _interleaved_median_ms(calls, reps, warmup, rounds)):
                r.latency_ms[f"{tower}@{b}"] = ms
            bar.update()
    return results


def run_benchmark(model: str = "ViT-B-32", pretrained: str | None = None, formats=PYCLIPQ_FORMATS,
                  batches=(1, 8, 32), threads: int = 2, reps: int = 5, warmup: int = 2, towers=("image", "text"),
                  fidelity_batch: int = 8, progress: bool = True, runtime_peers=(), compiled: bool = False,
                  isas=(), rounds: int = 1) -> dict:
    """Every contender's latency, size and fidelity; `runtime_peers` from select_runtime_peers;
    `compiled`: each format also through torch.compile (CompiledTowers); `isas`: CPU kernel tables
    (check_isas) on which the formats are also timed, each in a process of its own.

    A runtime peer or forced table that fails is listed in the report's "runtime_peers_failed", not raised.
    """
    if reps < 1 or warmup < 0 or threads < 1 or rounds < 1:
        raise ValueError(f"reps, rounds and threads must be >= 1 and warmup >= 0, got reps={reps}, rounds={rounds}, "
                         f"threads={threads}, "
                         f"warmup={warmup}")
    if not batches or any(b < 1 for b in batches):
        raise ValueError(f"batches must be one or more sizes >= 1, got {list(batches)}")
    unknown = [p for p in runtime_peers if p not in RUNTIME_PEERS]
    if unknown:
        raise ValueError(f"runtime_peers: unknown {unknown}; choose from {list(RUNTIME_PEERS)}")
    isas = check_isas(isas)
    torch.set_num_threads(threads)
    loaded: LoadedModel = load_model(model, pretrained)
    contenders = [*TORCH_PEERS, *formats, *(f + COMPILED_SUFFIX for f in formats if compiled)]
    inputs = {b: random_inputs(loaded, b, seed=b) for b in sorted({*batches, fidelity_batch})}
    with torch.inference_mode():
        reference = {"image": encode(loaded, images=inputs[fidelity_batch][0]),
                     "text": encode(loaded, tokens=inputs[fidelity_batch][1])}
    steps = len(contenders) * 2 + len(batches) * len(towers) + len(isas) + len(runtime_peers)
    bar = tqdm(total=steps, desc="bench", disable=not progress, unit="step")
    results = time_torch_contenders(loaded.model, contenders, inputs, batches, towers, fidelity_batch, reference,
                                    reps, warmup, bar, rounds)
    settings = {"formats": list(formats), "batches": list(batches), "towers": list(towers),
                "fidelity_batch": fidelity_batch, "threads": threads, "reps": reps, "warmup": warmup,
                "rounds": rounds}
    isa_results, isas_failed = _time_forced_isas(loaded.model, isas, settings, inputs, reference, bar)
    peer_results, peers_failed, runtime_versions = _time_runtime_peers(
        loaded, runtime_peers, _tower_inputs(loaded, inputs, towers, batches, fidelity_batch), reference,
        threads, reps, warmup, rounds, bar)
    size_only = []
    for preset in (SIZE_ONLY_PRESETS[f] for f in formats if f in SIZE_ONLY_PRESETS):
        bar.set_postfix_str(f"{preset} (size)")
        candidate = pyclipq_convert(copy.deepcopy(loaded.model), preset)
        quantized, total = linear_inventory(candidate)
        size_only.append({"name": preset, "size_bytes": _size_on_disk(preset, candidate),
                          "linears_quantized": quantized, "linears_total": total})
        del candidate
    bar.close()
    fp32 = results[0]
    machine = {**machine_info(threads), "runtime_versions": runtime_versions}
    report = {"model": loaded.label, "machine": machine, "batches": list(batches), "towers": list(towers),
              "reps": reps, "rounds": rounds, "warmup": warmup, "method": METHOD,
              "results": [asdict(r) for r in results + isa_results + peer_results], "size_only": size_only,
              "runtime_peers_failed": isas_failed + peers_failed}
    for r in report["results"] + size_only:
        r["size_ratio_vs_fp32"] = fp32.size_bytes / r["size_bytes"]
    for r in report["results"]:
        r["speedup_vs_fp32"] = {k: fp32.latency_ms[k] / v for k, v in r["latency_ms"].items()}
    return report


def format_table(report: dict) -> str:
    keys = [f"{t}@{b}" for t in report["towers"] for b in report["batches"]]
    first = keys[0]
    head = ["contender", *[f"{k} ms" for k in keys], f"{first} x", "size MB", "smaller", "linears", "img cos",
            "txt cos"]
    rows = [head]
    for r in report["results"]:
        linears = "-" if r["linears_total"] is None else f"{r['linears_quantized']}/{r['linears_total']}"
        cosines = [f"{r['fidelity'][f'{t}_cos_mean']:.4f}" if f"{t}_cos_mean" in r["fidelity"] else "-"
                   for t in ("image", "text")]
        name = f"{r['name']} ({r['precision']})" if r["precision"] else r["name"]  # e.g. "openvino (bf16)"
        rows.append([name, *[f"{r['latency_ms'][k]:.1f}" for k in keys],
                     f"{r['speedup_vs_fp32'][first]:.2f}", f"{r['size_bytes'] / 1e6:.1f}",
                     f"{r['size_ratio_vs_fp32']:.1f}x", linears, *cosines])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in report.get("size_only", []):
        lines.append(f"{r['name']} (size only, not timed): {r['size_bytes'] / 1e6:.1f} MB, "
                     f"{r['size_ratio_vs_fp32']:.1f}x smaller, {r['linears_quantized']}/{r['linears_total']} linears")
    m = report["machine"]
    versions = "".join(f" | {name} {v}" for name, v in m.get("runtime_versions", {}).items())
    return (f"{report['model']} | {m['cpu']} | ISA {m['cpu_isa']} | {m['threads']} threads | torch {m['torch']}"
            f"{versions}\n" + "\n".join(lines) + "\n" + textwrap.fill(f"method: {report['method']}", 110))


def save_plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report["results"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for b in report["batches"]:
        axes[0].plot(names, [r["speedup_vs_fp32"].get(f"image@{b}", float("nan")) for r in report["results"]],
                     marker="o", label=f"image B={b}")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set_ylabel("speedup vs fp32")
    axes[0].set_title("image tower latency")
    axes[0].legend()
    sized = report["results"] + report.get("size_only", [])
    axes[1].bar([r["name"] for r in sized], [r["size_ratio_vs_fp32"] for r in sized])
    axes[1].set_ylabel("x smaller than fp32 on disk")
    axes[1].set_title("model size")
    for ax in axes:
        # anchored at their right end, the slanted names sit under their own points and bars
        ax.tick_params(axis="x", rotation=30)
        for label in ax.get_xticklabels():
            label.set(horizontalalignment="right", rotation_mode="anchor")
    fig.suptitle(f"{report['model']} - {report['machine']['cpu']}, {report['machine']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: str, plot: bool = True) -> dict:
    """Write bench.json, and bench.png if `plot` (it needs matplotlib: see plot_available)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "bench.json")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    if plot:
        paths["png"] = os.path.join(out_dir, "bench.png")
        save_plot(report, paths["png"])
    return paths


def run_forced_isa_child(argv: list[str]) -> int:
    """A `--isa` child (peers.forced_isa.CHILD), with PYCLIPQ_CPU_ISA set: times the spec's formats
    on the parent's pickled model with this module's contender loop; writes the spec's "out"."""
    (spec_path,) = argv
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    # the parent's own file, written a moment ago: the model it times, pickled
    payload = torch.load(spec["payload"], weights_only=False)
    results = time_torch_contenders(payload["model"], spec["formats"], payload["inputs"], spec["batches"],
                                    spec["towers"], spec["fidelity_batch"], payload["reference"], spec["reps"],
                                    spec["warmup"], rounds=spec.get("rounds", 1))
    with open(spec["out"], "w") as f:
        json.dump({"cpu_isa": pyclipq.build_info()["cpu_isa"], "results": [asdict(r) for r in results]}, f)
    return 0
