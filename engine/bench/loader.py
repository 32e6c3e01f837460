"""Two-view samples/s of the DALI loader and the torch baseline on the same shards and augmentations."""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.bench import hardware
from engine.data import AugmentConfig, LoaderConfig, TrainLoader


def measure(data: Path, backend: str, device: str, size: int, batch: int, steps: int, warmup: int, workers: int
            ) -> dict:
    loader = TrainLoader(data, AugmentConfig(size=size), LoaderConfig(backend=backend, batch_size=batch,
                                                                      workers=workers),
                         device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    total = min(steps + warmup, len(loader))
    if total <= warmup:
        raise SystemExit(f"engine.bench loader: {len(loader)} steps per epoch; need more than --warmup {warmup}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    sync()
    t0 = time.perf_counter()
    for _ in range(total - warmup):
        next(it)
    sync()
    seconds = time.perf_counter() - t0
    return {"samples_per_s": round((total - warmup) * batch / seconds, 1), "steps": total - warmup,
            "batch_size": batch, "workers": workers}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=None, help="DALI threads / DataLoader workers (default: cores)")
    p.add_argument("--json", type=Path, default=None)


def run(a: argparse.Namespace) -> int:
    device = "cpu" if a.cpu or not torch.cuda.is_available() else "cuda"
    batch = a.batch_size or (256 if device == "cuda" else 32)
    workers = a.workers or os.cpu_count() or 1
    result = {}
    for name, backend in (("dali", "dali"), ("baseline", "torch")):
        result[name] = measure(a.data, backend, device, a.image_size, batch, a.steps, a.warmup, workers)
    result["ratio"] = round(result["dali"]["samples_per_s"] / result["baseline"]["samples_per_s"], 2)
    result["hardware"] = hardware(device)
    result["device"], result["image_size"] = device, a.image_size
    result["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    print(f"two-view samples/s, {a.image_size}px, batch {batch}, {workers} workers/threads, {result['hardware']}")
    print(f"  {'DALI (' + device + ')':<34}{result['dali']['samples_per_s']:>10.1f}")
    print(f"  {'baseline (PIL + torchvision v2)':<34}{result['baseline']['samples_per_s']:>10.1f}")
    print(f"  {'ratio':<34}{result['ratio']:>9.2f}x")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0
