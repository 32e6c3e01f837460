"""Where the speed comes from: the trainer's own step, timed row by row, the original way and ours.

    python -m engine.bench e2e --data OUT [--cpu] [--arch A] [--image-size N] [--batch-size N] [--steps N]
                               [--rows NAME,...] [--json PATH]
    python -m engine.bench step [--cpu] [--arch A] [--image-size N] [--batch-size N] [--steps N] [--rows ...]
    (both also: [--no-compile] [--json PATH] [--rows-out FILE.jsonl])

Every row builds the same `engine.trainer.Trainer` that `engine/train.py` runs, from a config that toggles
one thing, and times `Trainer.train_step`, the function the training loop calls. `e2e` feeds it real
batches: `baseline` (the webdataset + PIL loader handing over normalised floats, fp32, NCHW, eager, the
reference loss), each change alone
on top of it, and `engine` (all of them on the GPU; on the CPU only the changes whose own row beat the
baseline in this run, named in the table). `step` feeds it synthetic views, for fp32/bf16 x NCHW/NHWC and
two compiled rows. Each row runs in a fresh process (its own memory peak, compile cache and Accelerate
state); all rows of one invocation run on the same machine one after the other, so their ratios are the
figures to quote.

Data wait is the host's time blocked fetching the next batch, read without synchronising the device, so a
loader that keeps up shows ~0 while the GPU works on the previous step. On a GPU each step is bracketed by
CUDA events: their summed durations over the wall time is the GPU-busy share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from base.cli import output_file
from engine.config import TrainConfig, apply
from engine.data import Split, dali_available
from measure.hardware import hardware
from measure.memory import peak_memory_gb, reset_peak
from measure.record import add_rows_out, append_row, save

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
    handover: str = "float"

    def settings(self) -> str:
        return (f"{self.loader} loader, {self.handover} hand-over, {self.precision}, "
                f"{'NHWC' if self.channels_last else 'NCHW'}, {'compiled' if self.compile else 'eager'}, "
                f"{'fused' if self.fused_loss else 'reference'} loss")


def train_config(v: Variant, a: argparse.Namespace, out: str) -> TrainConfig:
    """The training config of one row: the defaults of engine/train.py, with this row's toggles."""
    cfg = TrainConfig()
    apply(cfg, {"data": str(a.data or ""), "loader": v.loader, "image_size": a.image_size, "batch_size": a.batch_size,
                "workers": a.workers, "handover": v.handover, "arch": a.arch, "precision": v.precision,
                "channels_last": v.channels_last,
                "compile": v.compile, "loss_impl": "fused" if v.fused_loss else "reference", "out": out,
                "cpu": a.device == "cpu", "checkpoints": False, "eval_every": 0, "verify": False,
                "epochs": 1000, "warmup_epochs": 0.0})
    return cfg


class SyntheticViews:
    """Random views of the step's shape, made once on the device: the step bench times model and loss alone."""

    def __init__(self, batch: int, size: int, device: torch.device, dtype: torch.dtype) -> None:
        g = torch.Generator(device="cpu").manual_seed(0)
        views = torch.randn(2, batch, 3, size, size, generator=g).to(device, dtype)
        self.batch = {"view1": views[0].contiguous(memory_format=torch.channels_last),
                      "view2": views[1].contiguous(memory_format=torch.channels_last), "epoch_end": False}

    def __len__(self) -> int:
        return 1 << 30

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self) -> dict:
        return {}


def measure(v: Variant, a: argparse.Namespace, synthetic: bool) -> dict:
    """One row, in this process: build the Trainer, warm up, then time `train_step` over --steps batches."""
    from engine.trainer import DTYPES, Trainer, resolve_precision

    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="faceclr-bench-") as out:
        cfg = train_config(v, a, out)
        loader = None
        if synthetic:
            loader = SyntheticViews(a.batch_size, a.image_size, device, DTYPES[resolve_precision(v.precision, device)])
        trainer = Trainer(cfg, loader=loader)
        batches = trainer.batches()
        for _ in range(a.warmup):
            trainer.train_step(next(batches))
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        reset_peak(device)
        events, wait = [], 0.0
        t0 = time.perf_counter()
        for _ in range(a.steps):
            tw = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - tw
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            trainer.train_step(batch)
            if cuda:
                end.record()
                events.append((start, end))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        busy = sum(s.elapsed_time(e) for s, e in events) / 1e3 / seconds if cuda else None
        trainer.close(0)
    return {"name": v.name, "settings": v.settings(), "variant": asdict(v),
            "loss_dtype": str(trainer.loss_dtype).removeprefix("torch."),
            "views_per_s": round(2 * a.batch_size * a.steps / seconds, 2), "data_wait_frac": round(wait / seconds, 4),
            "gpu_busy_frac": None if busy is None else round(busy, 4),
            "peak_mem_gb": round(peak_memory_gb(device), 3)}


def _in_child(v: Variant, a: argparse.Namespace) -> dict:
    """One row in a fresh process; a row that fails is reported as failed, never fatal to the table."""
    cmd = [sys.executable, "-m", "engine.bench", a.what, "--one", json.dumps(asdict(v)), "--arch", a.arch,
           "--image-size", str(a.image_size), "--batch-size", str(a.batch_size), "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--workers", str(a.workers)]
    cmd += (["--cpu"] if a.device == "cpu" else []) + (["--data", str(a.data)] if a.data else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == 0:
        return json.loads(r.stdout.strip().splitlines()[-1])
    lines = (r.stderr or r.stdout).strip().splitlines()
    return {"name": v.name, "settings": v.settings(), "variant": asdict(v), "views_per_s": None,
            "error": lines[-1] if lines else f"exit code {r.returncode}"}


# -- the rows ---------------------------------------------------------------------------------------

def e2e_variants(compile_rows: bool) -> list[Variant]:
    base = Variant("baseline")
    rows = [base, replace(base, name="+ DALI loader", loader="dali" if dali_available() else "torch"),
            replace(base, name="+ uint8 hand-over", handover="uint8"), replace(base, name="+ bf16", precision="bf16"),
            replace(base, name="+ channels-last", channels_last=True)]
    if compile_rows:
        rows.append(replace(base, name="+ torch.compile", compile=True))
    rows.append(replace(base, name="+ fused loss", fused_loss=True))
    return rows


def engine_variant(device: str, measured: list[dict], compile_rows: bool) -> Variant:
    """All changes on the GPU. On the CPU, where several of them cost more than they save, a change is kept
    only if its own row ran and beat the baseline in this same run (the table names the result)."""
    loader = "dali" if dali_available() else "torch"
    if device == "cuda":
        return Variant("engine", loader, "bf16", True, compile_rows, True, "uint8")
    speed = {m["name"]: m.get("views_per_s") or 0.0 for m in measured}
    won = {name for name, v in speed.items() if name != "baseline" and v > speed.get("baseline", float("inf"))}
    return Variant("engine", loader if "+ DALI loader" in won else "torch", "bf16" if "+ bf16" in won else "fp32",
                   "+ channels-last" in won, "+ torch.compile" in won, "+ fused loss" in won,
                   "uint8" if "+ uint8 hand-over" in won else "float")


def step_variants(compile_rows: bool) -> list[Variant]:
    rows = [Variant(f"{p} {'NHWC' if cl else 'NCHW'} eager", precision=p, channels_last=cl, fused_loss=True)
            for p in ("fp32", "bf16") for cl in (False, True)]
    if compile_rows:  # compiling costs a minute or more per row: the two that matter
        rows += [Variant("fp32 NCHW compile", compile=True, fused_loss=True),
                 Variant("bf16 NHWC compile", precision="bf16", channels_last=True, compile=True, fused_loss=True)]
    return rows


# -- command line ---------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser, e2e: bool) -> None:
    p.add_argument("--data", type=Path, default=None,
                   help="a folder written by `python -m pack` (required)" if e2e else argparse.SUPPRESS)
    if e2e:
        p.add_argument("--corpus", type=int, default=None, help="images per epoch for the projection "
                                                                "(default: the manifest's train count)")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--arch", choices=["resnet18", "resnet34", "resnet50"], default=None,
                   help="default: resnet50 on GPU, resnet18 on CPU")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the packed size for e2e; 224 on GPU and 64 on CPU for step")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    p.add_argument("--workers", type=int, default=None, help="loader threads/workers (default: every core)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", default=None, help="run only these rows (comma-separated names, as the table shows)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    p.add_argument("--json", type=output_file, default=None, help="write the rows here (and append to its history)")
    add_rows_out(p)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)


def _resolve(a: argparse.Namespace) -> None:
    if a.what == "e2e" and not a.data:
        raise ValueError("--data is required (a folder written by `python -m pack`)")
    a.device = "cpu" if a.cpu or not torch.cuda.is_available() else "cuda"
    gpu = a.device == "cuda"
    a.arch = a.arch or ("resnet50" if gpu else "resnet18")
    a.batch_size = (256 if gpu else 16) if a.batch_size is None else a.batch_size
    a.workers = (os.cpu_count() or 1) if a.workers is None else a.workers
    if a.image_size is None:
        a.image_size = Split.open(a.data, "train").image_size if a.data else (224 if gpu else 64)
    for name in ("batch_size", "image_size", "steps", "workers"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def _select(rows: list[Variant], wanted: str | None) -> list[Variant]:
    if not wanted:
        return rows
    names = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [n for n in names if n not in {v.name for v in rows} | {"engine"}]
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {', '.join(unknown)} (known: "
                         f"{', '.join(v.name for v in rows)}, engine)")
    return [v for v in rows if v.name in names]


def run_cli(a: argparse.Namespace) -> int:
    _resolve(a)
    synthetic = a.what == "step"
    if a.one:
        print(json.dumps(measure(Variant(**json.loads(a.one)), a, synthetic)))
        return 0
    return run_step(a) if synthetic else run_e2e(a)


def _print_row(r: dict) -> None:
    figure = f"{r['views_per_s']:>9.1f} views/s" if r.get("views_per_s") else f"FAILED: {r.get('error')}"
    at_loss = f", loss gets {r['loss_dtype']}" if r.get("loss_dtype") else ""
    print(f"  {r['name']:<20} {figure}  ({r['settings']}{at_loss})", flush=True)


def run_e2e(a: argparse.Namespace) -> int:
    compile_rows = not a.no_compile
    corpus = a.corpus or (Split.open(a.data, "train").samples if a.data else 0)
    rows: list[dict] = []

    def finish(r: dict) -> None:
        """The speed-up over the baseline (the first row, when selected) and the projection: the row is
        complete, and on disk, before the next one starts."""
        rows.append(r)
        base = rows[0].get("views_per_s") if rows[0]["name"] == "baseline" else None
        r["speedup"] = round(r["views_per_s"] / base, 4) if base and r.get("views_per_s") else None
        r["projected_hours_50_epochs"] = (round(50 * 2 * corpus / r["views_per_s"] / 3600, 4)
                                          if r.get("views_per_s") else None)
        append_row(a.rows_out, r)
        _print_row(r)

    for v in _select(e2e_variants(compile_rows), a.rows):
        finish(_in_child(v, a))
    if not a.rows or "engine" in a.rows.split(","):
        finish(_in_child(engine_variant(a.device, rows, compile_rows), a))
    print(f"\nend to end (Trainer.train_step on real batches), {a.arch} at {a.image_size} px, batch {a.batch_size} "
          f"per step, {a.steps} timed steps, {hardware(a.device)}")
    print(f"  {'row':<20}{'views/s':>10}{'speed-up':>10}{'data wait':>11}{'GPU busy':>10}{'peak GB':>9}"
          f"{'50 epochs (h)':>15}")
    for r in rows:
        if not r.get("views_per_s"):
            print(f"  {r['name']:<20}  FAILED: {r.get('error')}")
            continue
        speed = f"{r['speedup']:>9.2f}x" if r["speedup"] else f"{'-':>10}"
        busy = f"{r['gpu_busy_frac']:>10.1%}" if r.get("gpu_busy_frac") is not None else f"{'-':>10}"
        print(f"  {r['name']:<20}{r['views_per_s']:>10.1f}{speed}{r['data_wait_frac']:>10.1%}{busy}"
              f"{r['peak_mem_gb']:>9.2f}{r['projected_hours_50_epochs']:>15.2f}")
    print(f"  engine row settings: {rows[-1]['settings']}")
    print(f"  projection: 50 epochs x 2 views x {corpus:,} images at each row's rate "
          f"(the original project's run took {ORIGINAL_HOURS:g} h)")
    save("e2e", {"rows": rows, "corpus": corpus, "arch": a.arch, "image_size": a.image_size,
                 "batch_size": a.batch_size, "steps": a.steps}, a.json, a.device)
    return 0 if all(r.get("views_per_s") for r in rows) else 1


def run_step(a: argparse.Namespace) -> int:
    rows: list[dict] = []
    for v in _select(step_variants(not a.no_compile), a.rows):
        rows.append(r := _in_child(v, a))
        base = rows[0].get("views_per_s")
        r["speedup"] = round(r["views_per_s"] / base, 4) if base and r.get("views_per_s") else None
        append_row(a.rows_out, r)
        _print_row(r)
    print(f"\nTrainer.train_step on synthetic views, {a.arch} at {a.image_size} px, batch {a.batch_size}x2 views, "
          f"{hardware(a.device)}")
    for r in rows:
        if r.get("views_per_s"):
            print(f"  {r['name']:<22}{r['views_per_s']:>10.1f}{(r['speedup'] or 0):>9.2f}x"
                  f"  loss gets {r['loss_dtype']}")
        else:
            print(f"  {r['name']:<22}  FAILED: {r.get('error')}")
    save("step", {"rows": rows, "arch": a.arch, "image_size": a.image_size, "batch_size": a.batch_size,
                  "steps": a.steps}, a.json, a.device)
    return 0 if all(r.get("views_per_s") for r in rows) else 1
