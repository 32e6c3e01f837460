"""Where the speed comes from: the same model trained on the same shards, the original way and ours.

    python -m engine.bench e2e --data OUT [--cpu] [--arch resnet50] [--image-size 224] [--batch-size N]
                               [--steps N] [--corpus N] [--json PATH]
    python -m engine.bench step [--cpu] [--arch resnet50] [--image-size 224] [--batch-size N] [--steps N]

`e2e` rows: `baseline` (torch loader: PIL + torchvision in workers; fp32; NCHW; eager; the reference
loss), each change alone on top of it, and `engine` (all changes on the GPU; on the CPU only the changes
whose own row beat the baseline in this run, named in the table). `step` times the model's
forward+backward alone on synthetic input, for fp32/bf16 x NCHW/NHWC (eager) and two compiled rows.
All rows of one invocation run on the same machine one after the other; the ratios are the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from engine.bench import hardware
from engine.data import AugmentConfig, LoaderConfig, Split, TrainLoader, dali_available
from engine.model import ModelConfig, SimCLRNet
from engine.train import peak_memory_gb
from kernels import nt_xent, nt_xent_reference

ORIGINAL_HOURS = 34.0
"""The original project's 50-epoch run."""


@dataclass(frozen=True)
class Variant:
    name: str
    loader: str = "torch"
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    fused_loss: bool = False

    def settings(self) -> str:
        return (f"{self.loader} loader, {self.precision}, {'NHWC' if self.channels_last else 'NCHW'}, "
                f"{'compiled' if self.compile else 'eager'}, {'fused' if self.fused_loss else 'reference'} loss")


def _model(arch: str, v: Variant, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    net = SimCLRNet(ModelConfig(arch=arch)).to(device)
    if v.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, (torch.compile(net) if v.compile else net)


def _step_fn(net, forward, v: Variant, device: torch.device, optimizer):
    dtype = {"fp32": None, "bf16": torch.bfloat16}[v.precision]
    loss_fn = nt_xent if v.fused_loss else nt_xent_reference

    def step(view1: torch.Tensor, view2: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            z = forward(torch.cat([view1, view2]))
            loss = loss_fn(*z.float().chunk(2), 0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_e2e(v: Variant, data: Path, arch: str, size: int, batch: int, steps: int, warmup: int, workers: int,
            device: torch.device) -> dict:
    net, forward = _model(arch, v, device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    step = _step_fn(net, forward, v, device, optimizer)
    loader = TrainLoader(data, AugmentConfig(size=size), LoaderConfig(backend=v.loader, batch_size=batch,
                                                                      workers=workers), device=device)
    if len(loader) < warmup + steps:
        raise SystemExit(f"engine.bench e2e: {len(loader)} steps per epoch < --warmup + --steps")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches = iter(loader)
    wait = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0, wait = time.perf_counter(), 0.0
        tw = time.perf_counter()
        b = next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()  # data wait: until the batch is on the device
        wait += time.perf_counter() - tw
        view1, view2 = b["view1"], b["view2"]
        if not v.channels_last:
            view1, view2 = view1.contiguous(), view2.contiguous()
        step(view1, view2)
    sync()
    seconds = time.perf_counter() - t0
    return {"name": v.name, "settings": v.settings(), "views_per_s": round(2 * batch * steps / seconds, 2),
            "data_wait_frac": round(wait / seconds, 4), "peak_mem_gb": round(peak_memory_gb(device), 3)}


def run_step(v: Variant, arch: str, size: int, batch: int, steps: int, warmup: int, device: torch.device) -> dict:
    net, forward = _model(arch, v, device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    step = _step_fn(net, forward, replace(v, fused_loss=True), device, optimizer)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, batch, 3, size, size, generator=g).to(device)
    if v.channels_last:
        x = torch.stack([t.contiguous(memory_format=torch.channels_last) for t in x])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step(x[0], x[1])
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x[0], x[1])
    sync()
    return {"name": v.name, "views_per_s": round(2 * batch * steps / (time.perf_counter() - t0), 2),
            "peak_mem_gb": round(peak_memory_gb(device), 3)}


def add_arguments(p: argparse.ArgumentParser, e2e: bool) -> None:
    if e2e:
        p.add_argument("--data", type=Path, required=True)
        p.add_argument("--corpus", type=int, default=None, help="images per epoch for the projection "
                                                                "(default: the manifest's train count)")
        p.add_argument("--workers", type=int, default=None)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--arch", default=None, help="default: resnet50 on GPU, resnet18 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on GPU, 64 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    p.add_argument("--json", type=Path, default=None)


def _defaults(a: argparse.Namespace) -> tuple[torch.device, str, int, int]:
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    gpu = device.type == "cuda"
    return (device, a.arch or ("resnet50" if gpu else "resnet18"), a.image_size or (224 if gpu else 64),
            a.batch_size or (256 if gpu else 16))


def e2e_variants(device: torch.device, compile_rows: bool) -> list[Variant]:
    base = Variant("baseline")
    loader = "dali" if dali_available() else "torch"
    rows = [base, replace(base, name="+ DALI loader", loader=loader), replace(base, name="+ bf16", precision="bf16"),
            replace(base, name="+ channels-last", channels_last=True)]
    if compile_rows:
        rows.append(replace(base, name="+ torch.compile", compile=True))
    rows.append(replace(base, name="+ fused loss", fused_loss=True))
    return rows


def engine_variant(device: torch.device, rows: list[Variant], measured: list[dict], compile_rows: bool) -> Variant:
    """All changes on the GPU. On the CPU, where several of them cost more than they save, each change is
    kept only if its own row beat the baseline in this same run (the table names the result)."""
    loader = "dali" if dali_available() else "torch"
    if device.type == "cuda":
        return Variant("engine", loader, "bf16", True, compile_rows, True)
    base = measured[0]["views_per_s"]
    won = {v.name for v, m in zip(rows, measured, strict=True) if m["views_per_s"] > base}
    return Variant("engine", loader if "+ DALI loader" in won else "torch",
                   "bf16" if "+ bf16" in won else "fp32", "+ channels-last" in won,
                   "+ torch.compile" in won, "+ fused loss" in won)


def run_e2e_cli(a: argparse.Namespace) -> int:
    device, arch, size, batch = _defaults(a)
    workers = a.workers or os.cpu_count() or 1
    corpus = a.corpus or Split.open(a.data, "train").samples
    rows = []
    variants = e2e_variants(device, not a.no_compile)
    for v in [*variants, None]:
        v = v or engine_variant(device, variants, rows, not a.no_compile)
        row = run_e2e(v, a.data, arch, size, batch, a.steps, a.warmup, workers, device)
        rows.append(row)
        print(f"  {row['name']:<18} {row['views_per_s']:>9.1f} views/s  ({row['settings']})", flush=True)
    base = rows[0]["views_per_s"]
    projected = {}
    for r in rows:
        r["speedup"] = round(r["views_per_s"] / base, 4)
        projected[r["name"]] = round(50 * 2 * corpus / r["views_per_s"] / 3600, 4)
    print(f"\nend to end, {arch} at {size} px, batch {batch} per step, {a.steps} timed steps, {hardware(device)}")
    print(f"  {'row':<18}{'views/s':>10}{'speed-up':>10}{'data wait':>11}{'peak GB':>9}{'50 epochs (h)':>15}")
    for r in rows:
        print(f"  {r['name']:<18}{r['views_per_s']:>10.1f}{r['speedup']:>9.2f}x{r['data_wait_frac']:>10.1%}"
              f"{r['peak_mem_gb']:>9.2f}{projected[r['name']]:>15.2f}")
    print(f"  engine row settings: {rows[-1]['settings']}")
    print(f"  projection: 50 epochs x 2 views x {corpus:,} images at each row's rate "
          f"(the original project's run took {ORIGINAL_HOURS:g} h)")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "hardware": hardware(device), "projected_hours_50_epochs":
                                      projected, "corpus": corpus, "arch": arch, "image_size": size,
                                      "batch_size": batch, "steps": a.steps,
                                      "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}, indent=1))
    return 0


def run_step_cli(a: argparse.Namespace) -> int:
    device, arch, size, batch = _defaults(a)
    variants = [Variant(f"{p} {'NHWC' if cl else 'NCHW'} eager", precision=p, channels_last=cl)
                for p in ("fp32", "bf16") for cl in (False, True)]
    if not a.no_compile:  # compiling costs a minute or more per row: the two that matter
        variants += [Variant("fp32 NCHW compile", compile=True),
                     Variant("bf16 NHWC compile", precision="bf16", channels_last=True, compile=True)]
    rows = []
    for v in variants:
        rows.append(run_step(v, arch, size, batch, a.steps, a.warmup, device))
        print(f"  {rows[-1]['name']:<22}{rows[-1]['views_per_s']:>10.1f} views/s", flush=True)
    base = rows[0]["views_per_s"]
    print(f"\nforward+backward alone, {arch} at {size} px, batch {batch}x2 views, {hardware(device)}")
    for r in rows:
        r["speedup"] = round(r["views_per_s"] / base, 4)
        print(f"  {r['name']:<22}{r['views_per_s']:>10.1f}{r['speedup']:>9.2f}x")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "hardware": hardware(device), "arch": arch, "image_size": size,
                                      "batch_size": batch,
                                      "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}, indent=1))
    return 0
