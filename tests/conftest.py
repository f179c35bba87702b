import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter where no GPU is present (CI, this machine).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
