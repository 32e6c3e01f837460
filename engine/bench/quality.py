"""python -m engine.bench quality --data D [--steps 60] [--seeds 3] [--cpu] [--json PATH]

Does faceclr's SimCLR learn, and as well as a peer's? Trains the default recipe (configs/demo.toml) for
N steps once per seed with the real entry point (`engine/train.py`, a subprocess), scores each run's
exported backbone on the held-out identities of the eval split, and prints mean ± std over seeds of
precision@1, MAP@R and verification accuracy beside two references that need no training (the same
network at random init, one per seed, and downscaled raw pixels). When `lightly` is importable, a row for
lightly's SimCLR built from its own parts (SimCLRTransform, SimCLRProjectionHead, NTXentLoss) with the
same torchvision backbone, batch, steps, optimizer, learning-rate schedule and image size, reading the
same shards, trained and scored the same way.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from base.cli import positive
from base.errors import EXIT_USAGE, UsageError
from base.files import ensure_writable
from engine.bench.loader import lightly_available
from engine.config import TrainConfig, parse
from engine.data import AugmentConfig, EvalLoader, Split
from engine.embed import embed, open_split, read_split
from engine.metrics import score_split
from engine.model import FEATURE_DIMS, ModelConfig, SimCLRNet, load_checkpoint
from engine.optim import build_optimizer, scaled_lr, warmup_cosine
from measure.record import save

PROG = "python -m engine.bench quality"
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "demo.toml"
FIGURES = ("precision_at_1", "map_at_r", "verification_accuracy", "roc_auc")
LIGHTLY_HINT = "pip install --no-deps lightly lightning-utilities"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="a folder written by `python -m pack` (train + eval)")
    p.add_argument("--steps", type=positive(int), default=60, help="training steps per seed")
    p.add_argument("--seeds", type=positive(int), default=3)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--config", type=Path, default=RECIPE, help="the recipe (default: configs/demo.toml)")
    p.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--workers", type=positive(int), default=2)
    p.add_argument("--no-lightly", action="store_true", help="skip the lightly row even when it is installed")


def recipe(config: Path, data: Path, cpu: bool) -> TrainConfig:
    """The resolved training config the subprocess will run (read here for the lightly row and the scoring); a
    problem with the file is the config's own one line (it names the file)."""
    return parse(["--config", str(config), "--data", str(data), "--out", "unused", *(["--cpu"] if cpu else [])])


class TrainingFailed(RuntimeError):
    """engine/train.py ended with an error of its own (a bug, not bad input): the bench exits 1."""


def train_faceclr(cfg_path: Path, data: Path, run: Path, steps: int, seed: int, cpu: bool, workers: int) -> float:
    """engine/train.py as a user runs it; returns its wall time."""
    cmd = [sys.executable, str(ROOT / "engine" / "train.py"), "--config", str(cfg_path), "--data", str(data),
           "--out", str(run), "--max-steps", str(steps), "--seed", str(seed), "--eval-every", "0",
           "--ckpt-every", "0", "--resume", "none", "--workers", str(workers), *(["--cpu"] if cpu else [])]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        if r.returncode == EXIT_USAGE:  # the trainer's one line (a full disk, a read-only folder): ours too
            raise UsageError(f"training seed {seed}: {last.split(': error: ', 1)[-1]}")
        raise TrainingFailed(f"training seed {seed} exited {r.returncode}: {last}")
    return time.perf_counter() - t0


class _LightlyViews(torch.utils.data.Dataset):
    """The train split's images decoded with PIL, through lightly's SimCLRTransform (two views each)."""

    def __init__(self, data: Path, transform):
        from engine.data.torch_pipeline import decode

        self.entries = Split.open(data, "train").entries()
        self.decode, self.transform = decode, transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        v1, v2 = self.transform(self.decode(self.entries[i]))
        return v1, v2


def train_lightly(cfg: TrainConfig, steps: int, seed: int, device: torch.device, workers: int) -> tuple[SimCLRNet,
                                                                                                          float]:
    """lightly's SimCLR on the recipe's backbone, batch, optimizer, schedule and image size; returns the
    backbone in a SimCLRNet (for scoring) and the wall time."""
    import torchvision
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform

    torch.manual_seed(seed)
    backbone = getattr(torchvision.models, cfg.model.arch)(weights=None)
    backbone.fc = torch.nn.Identity()
    dims = cfg.model.proj_dims
    head = SimCLRProjectionHead(FEATURE_DIMS[cfg.model.arch], dims[0] if len(dims) > 1 else dims[-1], dims[-1],
                                num_layers=max(2, len(dims)))
    model = torch.nn.Sequential(backbone, head).to(device)
    transform = SimCLRTransform(input_size=cfg.data.image_size, cj_strength=cfg.data.jitter_strength,
                                min_scale=cfg.data.crop_min_area)
    views = _LightlyViews(Path(cfg.data.data), transform)
    batch = cfg.data.batch_size
    steps_per_epoch = len(views) // batch
    loader = torch.utils.data.DataLoader(views, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed),
                                         persistent_workers=workers > 0)
    optimizer = build_optimizer(model, cfg.optim.optimizer, scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, batch),
                                cfg.optim.weight_decay, cfg.optim.momentum)
    # the trainer's schedule: warm-up, then a cosine over --epochs, of which --steps run
    scheduler = warmup_cosine(optimizer, int(cfg.optim.warmup_epochs * steps_per_epoch),
                              cfg.schedule.epochs * steps_per_epoch)
    criterion = NTXentLoss(temperature=cfg.loss.temperature)
    model.train()
    t0, step = time.perf_counter(), 0
    while step < steps:
        for v1, v2 in loader:
            loss = criterion(model(v1.to(device)), model(v2.to(device)))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
    wall = time.perf_counter() - t0
    net = SimCLRNet(ModelConfig(arch=cfg.model.arch, proj_dims=list(dims)))
    net.backbone.load_state_dict(backbone.state_dict())
    return net, wall


def _figures(block: dict) -> dict:
    return {k: float(block[k]) for k in FIGURES}


def _summary(name: str, per_seed: list[dict], note: str = "") -> dict:
    row = {"name": name, "per_seed": per_seed, "note": note}
    for k in FIGURES:
        values = np.array([s[k] for s in per_seed])
        row[k] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return row


def _table(rows: list[dict]) -> str:
    head = f"  {'row':<14}" + "".join(f"{k:>26}" for k in FIGURES[:3]) + f"{'train s/seed':>14}"
    lines = [head]
    for r in rows:
        cells = "".join(f"{r[k]['mean']:>17.4f} ± {r[k]['std']:.4f}" for k in FIGURES[:3])
        walls = [s["train_s"] for s in r["per_seed"] if "train_s" in s]
        lines.append(f"  {r['name']:<14}{cells}{(f'{np.mean(walls):.0f}' if walls else '-'):>14}")
    return "\n".join(lines)


def run(a: argparse.Namespace) -> int:
    open_split(a.data, "train")
    eval_split = read_split(open_split(a.data, "eval")).split  # verified before its index is read
    if not a.config.is_file():
        raise UsageError(f"--config {a.config} not found (default: {RECIPE.relative_to(ROOT)})")
    cfg = recipe(a.config, a.data, a.cpu)
    if a.runs is not None and a.runs.exists() and any(a.runs.iterdir()):
        raise UsageError(f"--runs {a.runs} is not empty (pass a new folder)")
    for path, flag in ((a.runs, "--runs"), (a.json and a.json.parent, "--json")):
        if path is not None:
            ensure_writable(path, flag)  # before the runs, not after them
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    runs = a.runs or Path(tempfile.mkdtemp(prefix="faceclr-quality-"))
    try:
        return measure(a, cfg, eval_split, runs, device)
    except BaseException as e:
        if a.runs is None:  # a bench that failed leaves no temporary folder behind
            shutil.rmtree(runs, ignore_errors=True)
        if not isinstance(e, TrainingFailed):
            raise
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1


def measure(a: argparse.Namespace, cfg: TrainConfig, eval_split: Split, runs: Path, device: torch.device) -> int:
    """Train and score every row; print the table and save the result (`run` has checked the arguments)."""
    seeds = list(range(a.seeds))
    eval_loader = EvalLoader(a.data, AugmentConfig(size=cfg.data.image_size), 128, "eval", device,
                             workers=min(2, a.workers))

    def evaluate(net: SimCLRNet | None) -> dict:
        if net is not None:
            net.to(device).eval()
        emb, labels, _ = embed(net, eval_loader)
        return _figures(score_split(emb, labels))

    t_start = time.perf_counter()
    rows = []
    faceclr = []
    for seed in seeds:
        run_dir = runs / f"faceclr-seed{seed}"
        wall = train_faceclr(a.config, a.data, run_dir, a.steps, seed, a.cpu, a.workers)
        faceclr.append({"seed": seed, "train_s": wall, **evaluate(load_checkpoint(run_dir).net)})
        print(f"faceclr seed {seed}: {faceclr[-1]['precision_at_1']:.4f} precision@1 ({wall:.0f} s)", flush=True)
    rows.append(_summary("faceclr", faceclr))

    skipped = None
    if a.no_lightly:
        skipped = "--no-lightly"
    elif not lightly_available():
        skipped = f"lightly is not installed ({LIGHTLY_HINT})"
    else:
        peer = []
        for seed in seeds:
            net, wall = train_lightly(cfg, a.steps, seed, device, a.workers)
            peer.append({"seed": seed, "train_s": wall, **evaluate(net)})
            print(f"lightly seed {seed}: {peer[-1]['precision_at_1']:.4f} precision@1 ({wall:.0f} s)", flush=True)
        rows.append(_summary("lightly", peer, "lightly's SimCLRTransform, SimCLRProjectionHead and NTXentLoss; "
                                              "same backbone, batch, steps, optimizer, schedule, image size"))
    if skipped:
        print(f"lightly row skipped: {skipped}")

    random_init = []
    for seed in seeds:
        torch.manual_seed(seed)
        random_init.append({"seed": seed, **evaluate(SimCLRNet(cfg.model))})
    rows.append(_summary("random init", random_init, "the recipe's network untrained, one per seed"))
    rows.append(_summary("pixels", [evaluate(None)], "16 x 16 raw pixels, mean-centred (no seed)"))

    config = a.config.resolve()
    recipe_name = str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config)
    result = {
        "data": str(a.data), "eval_images": eval_split.samples, "recipe": recipe_name, "steps": a.steps,
        "seeds": seeds, "arch": cfg.model.arch, "image_size": cfg.data.image_size, "batch_size": cfg.data.batch_size,
        "optimizer": cfg.optim.optimizer, "lightly_skipped": skipped, "rows": rows,
        "wall_s": time.perf_counter() - t_start, "runs": str(runs),
    }
    record = save("quality", result, a.json, device)  # adds the machine, commit and command
    print(f"\n{a.steps} steps x {len(seeds)} seeds of {RECIPE.name if a.config == RECIPE else a.config} "
          f"({cfg.model.arch}, {cfg.data.image_size} px, batch {cfg.data.batch_size}) on {eval_split.samples} "
          f"held-out images; mean ± std over seeds:\n{_table(rows)}\ntotal {result['wall_s'] / 60:.1f} min on "
          f"{record['hardware']}")
    if a.json:
        print(f"wrote {a.json}")
    return 0 if all(math.isfinite(r["precision_at_1"]["mean"]) for r in rows) else 1
