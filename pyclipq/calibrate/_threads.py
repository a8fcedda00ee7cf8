"""Run calibration's many small / medium tensor ops on one intra-op thread."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    """The observer searches and GPTQ's column loop are thousands of ops on tensors of a
    few thousand elements. Splitting each across intra-op threads costs a synchronisation
    per op; on the shared 2-core machines this project runs on that made them 3-10x
    slower than one thread (measured: torch.searchsorted 19 ms vs 2 ms, GPTQ on a
    3072x768 layer 17 s vs 1.8 s), so these loops run on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
