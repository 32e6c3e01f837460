"""Benchmarks that compare against a baseline in the same run: `python -m engine.bench {e2e,step,loader}`."""

from __future__ import annotations

import os
import platform

import torch


def hardware(device: torch.device | str) -> str:
    """The machine a figure was measured on, as every benchmark records it."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
