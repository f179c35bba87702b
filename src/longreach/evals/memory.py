"""Peak extra memory of a piece of work: CUDA allocator peak on a GPU, resident-set peak on Linux hosts.

On the host the peak is VmHWM, reset through /proc/self/clear_refs just before the work, minus the
resident set before it (ru_maxrss is not used: Linux carries it over from the parent across exec).
"""

from __future__ import annotations

from pathlib import Path

import torch


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (None where it cannot be measured)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                self._before = _status("VmRSS")
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self._before = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._before is not None:
            self.bytes = _status("VmHWM") - self._before
