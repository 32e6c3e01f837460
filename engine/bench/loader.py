"""Two-view samples/s of the loaders on the same shards, augmentations, batch and cores.

    python -m engine.bench loader --data OUT [--cpu] [--loader all|dali|torch|lightly] [--image-size N]
                                  [--crop-min-area A] [--jitter-strength S] [--batch-size N] [--workers N]
                                  [--repeats N] [--json PATH] [--rows-out FILE.jsonl]

Rows: DALI (float hand-over: normalised in DALI), DALI with the uint8 hand-over (normalised afterwards by
`engine.data.augment.Normalize` on the device, as the model would), the torch baseline (webdataset, PIL,
torchvision's PIL transforms in DataLoader workers), and lightly's `SimCLRTransform` in the same workers
on the same reader as a reference, when lightly is importable. The image size defaults to the manifest's.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from base.cli import output_file
from base.errors import UsageError
from engine.config import no_dali
from engine.data import AugmentConfig, LoaderConfig, Normalize, Split, TrainLoader, dali_available
from engine.data.torch_pipeline import epoch_loader, shard_sizes
from measure.hardware import hardware
from measure.record import add_rows_out, append_row, save

PROG = "python -m engine.bench loader"
LOADERS = ("all", "dali", "torch", "lightly")


class LightlyViews:
    """lightly's SimCLRTransform as a lightly user runs it: PIL in, two normalised float tensors out, in
    the workers. Seeded like the baseline's views so both rows do the same amount of random work."""

    def __init__(self, aug: AugmentConfig):
        from lightly.transforms import SimCLRTransform

        self.transform = SimCLRTransform(input_size=aug.size, min_scale=aug.crop_scale[0],
                                         cj_strength=aug.strength, cj_prob=aug.jitter_p,
                                         random_gray_scale=aug.gray_p, gaussian_blur=aug.blur_p,
                                         sigmas=aug.blur_sigma, hf_prob=aug.flip_p,
                                         normalize={"mean": list(aug.mean), "std": list(aug.std)})

    def __call__(self, image, seed: int):
        torch.manual_seed(seed)
        v1, v2 = self.transform(image)
        return v1, v2


def lightly_available() -> bool:
    """The parts both lightly rows use (this one and engine.bench quality's)."""
    try:
        from lightly.loss import NTXentLoss  # noqa: F401
        from lightly.models.modules import SimCLRProjectionHead  # noqa: F401
        from lightly.transforms import SimCLRTransform  # noqa: F401
    except Exception:  # lightly is installed without its dependencies here; any import failure means "absent"
        return False
    return True


def _timed(batches, device: str, total: int, warmup: int, finish=lambda b: b) -> float:
    """Seconds for the batches after `warmup`, each moved to the device (and finished) before the next."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    it = iter(batches)
    for _ in range(warmup):
        finish(next(it))
    sync()
    t0 = time.perf_counter()
    for _ in range(total - warmup):
        finish(next(it))
    sync()
    return time.perf_counter() - t0


def measure(data: Path, row: str, device: str, aug: AugmentConfig, batch: int, steps: int, warmup: int,
            workers: int) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if row == "lightly":
        split = Split.open(data, "train")
        total_steps = (split.samples // batch)
        total = min(steps + warmup, total_steps)
        _check_steps(total, warmup)
        batches = epoch_loader(split, shard_sizes(split), LightlyViews(aug), batch, total_steps, workers, 2, 4096,
                               0, 0, 0, 1, 0, pin_memory=device == "cuda")
        seconds = _timed(batches, device, total, warmup,
                         lambda b: (b[0].to(device, dtype), b[1].to(device, dtype)))
    else:
        backend, handover = {"dali": ("dali", "float"), "dali uint8": ("dali", "uint8"),
                             "baseline": ("torch", "float")}[row]
        loader = TrainLoader(data, aug, LoaderConfig(backend=backend, batch_size=batch, workers=workers,
                                                     handover=handover), device=device, dtype=dtype)
        total = min(steps + warmup, len(loader))
        _check_steps(total, warmup)
        normalize = Normalize(aug.mean, aug.std, dtype).to(device)
        finish = (lambda b: (normalize(b["view1"]), normalize(b["view2"]))) if handover == "uint8" else (lambda b: b)
        seconds = _timed(loader, device, total, warmup, finish)
    return {"samples_per_s": round((total - warmup) * batch / seconds, 1), "steps": total - warmup,
            "batch_size": batch, "workers": workers}


def _check_steps(total: int, warmup: int) -> None:
    if total <= warmup:
        raise UsageError(f"the train split gives {total} batches, not more than --warmup {warmup} (lower --warmup or "
                         "--batch-size)")


ROW_TITLES = {"dali": "DALI ({device}), float hand-over", "dali uint8": "DALI ({device}), uint8 + Normalize",
              "baseline": "baseline (webdataset + PIL)", "lightly": "lightly SimCLRTransform (reference)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="a folder written by `python -m pack`")
    p.add_argument("--cpu", action="store_true", help="DALI on the CPU even where a GPU is present")
    p.add_argument("--loader", choices=LOADERS, default="all",
                   help="which rows: all (default), dali (both hand-overs), torch (the baseline), lightly")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on GPU, 32 on CPU")
    p.add_argument("--image-size", type=int, default=None, help="default: the shards' size (manifest)")
    p.add_argument("--crop-min-area", type=float, default=0.08,
                   help="smallest crop as a share of the area, as the training flag (SimCLR: 0.08)")
    p.add_argument("--jitter-strength", type=float, default=1.0,
                   help="colour jitter strength s, as the training flag (SimCLR: 1.0)")
    p.add_argument("--workers", type=int, default=None, help="DALI threads / DataLoader workers (default: cores)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all rows, in alternating order; each row's median is reported (a shared "
                        "machine's load drifts between rows)")
    p.add_argument("--json", type=output_file, default=None)
    add_rows_out(p)


def _validate(a: argparse.Namespace) -> Split:
    for flag, value, ok in (("--steps", a.steps, a.steps >= 1), ("--warmup", a.warmup, a.warmup >= 0),
                            ("--batch-size", a.batch_size, a.batch_size is None or a.batch_size >= 1),
                            ("--image-size", a.image_size, a.image_size is None or a.image_size >= 8),
                            ("--crop-min-area", a.crop_min_area, 0 < a.crop_min_area <= 1),
                            ("--jitter-strength", a.jitter_strength, a.jitter_strength >= 0),
                            ("--workers", a.workers, a.workers is None or a.workers >= 1),
                            ("--repeats", a.repeats, a.repeats >= 1)):
        if not ok:
            raise UsageError(f"{flag} {value} is out of range (see --help)")
    return Split.open(a.data, "train")


def run(a: argparse.Namespace) -> int:
    split = _validate(a)
    device = "cpu" if a.cpu or not torch.cuda.is_available() else "cuda"
    batch = a.batch_size or (256 if device == "cuda" else 32)
    if batch > split.samples:
        raise UsageError(f"--batch-size {batch} is larger than the train split ({split.samples} samples)")
    size = a.image_size or split.image_size
    workers = a.workers or os.cpu_count() or 1
    aug = AugmentConfig(size=size, crop_scale=(a.crop_min_area, 1.0), strength=a.jitter_strength)
    rows = {"all": ["dali", "dali uint8", "baseline", "lightly"], "dali": ["dali", "dali uint8"],
            "torch": ["baseline"], "lightly": ["lightly"]}[a.loader]
    skipped = {}
    if not dali_available():
        skipped.update({r: no_dali() for r in rows if "dali" in r})
    if "lightly" in rows and not lightly_available():
        skipped["lightly"] = "lightly is not importable (pip install lightly)"
    if a.loader != "all" and len(skipped) == len(rows):
        raise UsageError(f"{next(iter(skipped.values()))}")
    print(f"two-view samples/s, {size} px, batch {batch}, {workers} workers/threads, crop area >= "
          f"{a.crop_min_area:g}, jitter {a.jitter_strength:g}, {hardware(device)}", flush=True)
    result: dict = {"rows": {}, "skipped": skipped}
    for row in rows:
        if row in skipped:
            print(f"  {ROW_TITLES[row].format(device=device):<44}{'skipped: ' + skipped[row]}", flush=True)
    runs: dict[str, list[dict]] = {r: [] for r in rows if r not in skipped}
    for round_ in range(a.repeats):
        for row in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
            runs[row].append(measure(a.data, row, device, aug, batch, a.steps, a.warmup, workers))
            append_row(a.rows_out, {"name": row, "round": round_ + 1, **runs[row][-1]})
            if a.repeats > 1:
                print(f"    round {round_ + 1}: {row} {runs[row][-1]['samples_per_s']:.1f}", flush=True)
    for row, results in runs.items():
        rates = sorted(r["samples_per_s"] for r in results)
        result["rows"][row] = {**results[0], "samples_per_s": rates[len(rates) // 2], "rounds": rates}
        print(f"  {ROW_TITLES[row].format(device=device):<44}{result['rows'][row]['samples_per_s']:>10.1f}",
              flush=True)
    measured = result["rows"]
    if "baseline" in measured:
        base = measured["baseline"]["samples_per_s"]
        for r in measured.values():
            r["vs_baseline"] = round(r["samples_per_s"] / base, 3)
        print("  ratios to the baseline: " + ", ".join(f"{n} {r['vs_baseline']:.2f}x" for n, r in measured.items()))
    result.update(device=device, image_size=size, batch_size=batch, workers=workers,
                  crop_min_area=a.crop_min_area, jitter_strength=a.jitter_strength)
    save("loader", result, a.json, device)
    return 0
