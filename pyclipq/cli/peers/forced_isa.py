"""`pyclipq bench --isa NAME`: the pyclipq formats timed on a forced CPU kernel table.

pyclipq reads PYCLIPQ_CPU_ISA once per process, at its first CPU op, so each forced table is
timed in a fresh process of its own while the benchmark's process waits, as the runtime peers
are (an idle torch process's OpenMP threads keep spinning and take cores from another). The
child gets the benchmark's fp32 model, pickled (open_clip draws random weights unseeded: a
reload would time other weights), its timed inputs and its fp32 features, and runs the
benchmark's own torch-contender loop on them (`bench.run_forced_isa_child`, which lives in bench
beside that loop: bench imports this module).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from ..._build import build_info
from .runtimes import ChildWorkspace, RuntimePeerError, run_child

ISA_ENV = "PYCLIPQ_CPU_ISA"
# Run with -c from the workspace: a pyclipq source tree in the caller's working directory
# (which has no built extension) must not shadow the installed package.
CHILD = "import sys; from pyclipq.cli.bench import run_forced_isa_child; sys.exit(run_forced_isa_child(sys.argv[1:]))"


def isa_label(fmt: str, isa: str) -> str:
    """A forced-table contender's name in the report, e.g. "int8 [avx2]"."""
    return f"{fmt} [{isa}]"


def check_isas(requested, argument: str = "isa") -> tuple[str, ...]:
    """The CPU kernel tables in `requested` (names or comma lists), each one this build runs on this CPU."""
    info = build_info()
    runnable = info["cpu_isa_supported"]
    names = [name.strip() for value in requested for name in value.split(",")]
    for name in names:
        if name not in runnable:
            why = (f"this CPU cannot run the {name!r} table" if name in info["cpu_isa_variants"]
                   else f"unknown CPU kernel table {name!r}")
            raise ValueError(f"{argument}: {why}; choose from {runnable} (the tables this build runs on this CPU)")
    return tuple(dict.fromkeys(names))


class ForcedIsaWorkspace(ChildWorkspace):
    """A temporary directory with what every forced-table child reads; `run(isa)` times one table.
    Use it as a context manager."""

    def __init__(self, model: torch.nn.Module, inputs: dict, reference: dict, settings: dict):
        self.payload = {"model": model, "inputs": inputs, "reference": reference}
        self.settings = settings  # formats, batches, towers, fidelity_batch, threads, reps, warmup

    prefix = "pyclipq-isa-"

    def _fill(self) -> None:
        self.payload_path = os.path.join(self.dir, "payload.pt")
        torch.save(self.payload, self.payload_path)

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
