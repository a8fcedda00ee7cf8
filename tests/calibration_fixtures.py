"""Fixtures shared by the calibration tests (test_observers, test_gptq, test_calibrate)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Calibration tests run many ops on small tensors: intra-op threads only add synchronisation,
    which made them several times slower on the busy 2-core machines this project runs on."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
