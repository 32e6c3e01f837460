"""The machine and software a figure was measured on, in one place for every benchmark and report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from functools import cache
from pathlib import Path


@cache
def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@cache
def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def environment(device: object = "cpu") -> dict:
    """Everything a reader needs to judge a figure: device, CPU, cores, memory, driver and library versions.

    `device`: a torch.device or its name; torch is imported only for a GPU (the packer's benches run without it)."""
    kind = str(device).split(":")[0]
    env = {"device": kind, "cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
           "torch": _version("torch"), "triton": _version("triton"), "dali": _version("nvidia-dali-cuda130"),
           "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if kind == "cuda":
        import torch

        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, driver=_driver())
    return env


def hardware(device: object = "cpu") -> str:
    """One line naming the machine, as tables print it."""
    return describe(environment(device))


def describe(env: dict) -> str:
    """The one-line summary of an `environment()` record."""
    if env["device"] == "cuda":
        return f"{env['gpu']} (driver {env['driver']}, CUDA {env['cuda']}), torch {env['torch']}"
    return f"{env['cpu']}, {env['cores']} cores, {env['memory_gb']} GiB, torch {env['torch']}"
