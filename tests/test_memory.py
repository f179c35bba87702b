import subprocess
import sys
from pathlib import Path

import pytest

from longreach.attention import METHODS

LENGTH, HEADS, DIM = 16384, 4, 64
# One dense float32 score matrix of one head: L x L x 4 bytes; sparse references stay under 25% of it.
BUDGET = 0.25 * LENGTH * LENGTH * 4


@pytest.mark.parametrize("name", [n for n in METHODS if n != "dense"])
def test_peak_extra_memory_at_16k(name):
    probe = Path(__file__).with_name("memory_probe.py")
    result = subprocess.run([sys.executable, str(probe), name, str(LENGTH), str(HEADS), str(DIM)],
                            capture_output=True, text=True, check=True)
    extra = int(result.stdout.strip().splitlines()[-1])
    assert 0 < extra < BUDGET, f"{name}: {extra / 2**20:.0f} MiB extra, budget {BUDGET / 2**20:.0f} MiB"
