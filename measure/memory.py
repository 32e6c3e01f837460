"""Peak memory: the CUDA allocator's high-water mark on a GPU, the resident set's (VmHWM) on the CPU."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...), in bytes; 0 where the file does not exist."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak(device: torch.device | str) -> int:
    """Start a new peak measurement; returns the bytes in use now (the baseline a peak is compared with).

    On the CPU the allocator's free memory is handed back first (`malloc_trim`), so reused buffers count
    again, and VmHWM is reset to the current resident set (`clear_refs` 5)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return proc_status_bytes("VmRSS")


def peak_bytes(device: torch.device | str) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return proc_status_bytes("VmHWM")


def peak_memory_gb(device: torch.device | str) -> float:
    """Peak since the process started (or the last `reset_peak`), in GiB."""
    return peak_bytes(device) / 2**30
