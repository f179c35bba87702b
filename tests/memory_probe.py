"""Peak extra host memory of one attention forward, measured in a fresh process (Linux).

Prints, in bytes, the peak resident set during the forward minus the resident set before it
(:class:`longreach.evals.memory.PeakMemory`). Usage: python memory_probe.py METHOD LENGTH HEADS HEAD_DIM
"""

import sys

import torch

from longreach.attention import METHODS
from longreach.attention.core import Positions
from longreach.evals.memory import PeakMemory
from longreach.positions import default


def main() -> None:
    name, length, heads, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(2)
    q, k, v = (torch.randn(1, heads, length, dim) for _ in range(3))
    rope = default(dim, 10000.0)
    positions = Positions.contiguous(1, length, length)
    with torch.no_grad():  # warm the allocator and kernels on a small input first
        small = slice(0, 256)
        METHODS[name].fn(q[:, :, small], k[:, :, small], v[:, :, small], rope=rope,
                         positions=Positions.contiguous(1, 256, 256))
        with PeakMemory("cpu") as peak:
            out = METHODS[name].fn(q, k, v, positions=positions, rope=rope)
    assert torch.isfinite(out).all()
    print(peak.bytes)


if __name__ == "__main__":
    main()
