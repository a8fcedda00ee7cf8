import os

import pytest
import torch

# Every Triton test in this suite runs on CPU tensors through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
