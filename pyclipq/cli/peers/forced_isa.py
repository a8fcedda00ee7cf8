"""`pyclipq bench --isa NAME`: the pyclipq formats timed on a forced CPU kernel table.

pyclipq reads PYCLIPQ_CPU_ISA once per process, at its first CPU op, so each forced table is
timed in a fresh process of its own while the benchmark's process waits, as the runtime peers
are (an idle torch process's OpenMP threads keep spinning and take cores from another). The
child gets the benchmark's fp32 model, pickled (open_clip draws random weights unseeded: a
reload would time other weights), its timed inputs and its fp32 features, and runs the
benchmark's own torch-contender loop on them (`bench.time_torch_contenders`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import torch

from .runtimes import RuntimePeerError, run_child

ISA_ENV = "PYCLIPQ_CPU_ISA"
# Run with -c from the workspace: a pyclipq source tree in the caller's working directory
# (which has no built extension) must not shadow the installed package.
CHILD = "import sys; from pyclipq.cli.peers.forced_isa import main; sys.exit(main(sys.argv[1:]))"


def isa_label(fmt: str, isa: str) -> str:
    """A forced-table contender's name in the report, e.g. "int8 [avx2]"."""
    return f"{fmt} [{isa}]"


def check_isas(requested, argument: str = "isa") -> tuple[str, ...]:
    """The CPU kernel tables in `requested` (names or comma lists), each one this build runs on this CPU."""
    import pyclipq

    info = pyclipq.build_info()
    runnable = info["cpu_isa_supported"]
    names = [name.strip() for value in requested for name in value.split(",")]
    for name in names:
        if name not in runnable:
            why = (f"this CPU cannot run the {name!r} table" if name in info["cpu_isa_variants"]
                   else f"unknown CPU kernel table {name!r}")
            raise ValueError(f"{argument}: {why}; choose from {runnable} (the tables this build runs on this CPU)")
    return tuple(dict.fromkeys(names))


class ForcedIsaWorkspace:
    """A temporary directory with what every forced-table child reads; `run(isa)` times one table.
    Use it as a context manager."""

    def __init__(self, model: torch.nn.Module, inputs: dict, reference: dict, settings: dict):
        self.payload = {"model": model, "inputs": inputs, "reference": reference}
        self.settings = settings  # formats, batches, towers, fidelity_batch, threads, reps, warmup

    def __enter__(self) -> ForcedIsaWorkspace:
        self.dir = tempfile.mkdtemp(prefix="pyclipq-isa-")
        self.payload_path = os.path.join(self.dir, "payload.pt")
        try:
            torch.save(self.payload, self.payload_path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, isa: str) -> list[dict]:
        """The formats' results (ContenderResult fields) on table `isa`, named by isa_label."""
        isa_dir = os.path.join(self.dir, isa)
        os.makedirs(isa_dir)
        spec_path, out_path = os.path.join(isa_dir, "spec.json"), os.path.join(isa_dir, "results.json")
        with open(spec_path, "w") as f:
            json.dump({**self.settings, "payload": self.payload_path, "out": out_path}, f)
        run_child(f"pyclipq on the {isa} table", [sys.executable, "-c", CHILD, spec_path], cwd=isa_dir,
                  env={**os.environ, ISA_ENV: isa})
        with open(out_path) as f:
            out = json.load(f)
        if out["cpu_isa"] != isa:
            raise RuntimePeerError(f"pyclipq on the {isa} table failed: the child ran the {out['cpu_isa']} table")
        return [{**r, "name": isa_label(r["name"], isa)} for r in out["results"]]


def main(argv: list[str]) -> int:
    """The child: `python -c CHILD SPEC.json` with PYCLIPQ_CPU_ISA set; writes the spec's "out"."""
    from dataclasses import asdict

    import pyclipq

    from .. import bench  # here, not at the top: bench imports this module

    (spec_path,) = argv
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    # the parent's own file, written a moment ago: the model it times, pickled
    payload = torch.load(spec["payload"], weights_only=False)
    results = bench.time_torch_contenders(payload["model"], spec["formats"], payload["inputs"], spec["batches"],
                                          spec["towers"], spec["fidelity_batch"], payload["reference"], spec["reps"],
                                          spec["warmup"])
    with open(spec["out"], "w") as f:
        json.dump({"cpu_isa": pyclipq.build_info()["cpu_isa"], "results": [asdict(r) for r in results]}, f)
    return 0
