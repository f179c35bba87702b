"""Peak extra host memory of one attention forward, measured in a fresh process (Linux).

Prints, in bytes, the peak resident set during the forward (VmHWM, reset just before it through
/proc/self/clear_refs) minus the resident set before it. ru_maxrss is not used: Linux carries it
over from the parent across exec. Usage: python memory_probe.py METHOD LENGTH HEADS HEAD_DIM
"""

import sys
from pathlib import Path

import torch

from longreach.attention import METHODS
from longreach.attention.core import Positions
from longreach.positions import default


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


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
        before = status("VmRSS")
        reset_peak()
        out = METHODS[name].fn(q, k, v, positions=positions, rope=rope)
        peak = status("VmHWM")
    assert torch.isfinite(out).all()
    print(peak - before)


if __name__ == "__main__":
    main()
