"""Where a run's figures go: RUN/metrics.jsonl always, Accelerate's trackers when asked, a progress bar.

Each step is logged once: a run that resumes from step s (after a kill, or a stop past its last checkpoint)
first drops what an earlier start logged after s, from metrics.jsonl and from what TensorBoard shows (its
`purge_step`). At s = 0 the fresh start measures the random-init network again, so nothing is kept.

`Window` holds what happens between two log lines (the loss summed on the device, steps, time waiting for
data); time spent outside training (evaluation, checkpoints) is left out of its views/s.
"""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from base.files import append_line, write_atomic

TRACKERS = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}
METRICS = "metrics.jsonl"


def trackers(log_with: str) -> list[str]:
    """Accelerate's `log_with` for the flag; ValueError naming what to install when a tracker is missing."""
    names = TRACKERS[log_with]
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names and importlib.util.find_spec(module) is None:
            raise ValueError(f"--log-with {log_with}: the {name} package is not installed (pip install {module}, "
                             "or --log-with none)")
    return names


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def drop_after(path: Path, first: int) -> None:
    """Keep the records of metrics.jsonl logged before step `first` (and no line a kill cut short)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < first:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    write_atomic(path, "".join(kept))


class RunLog:
    """`initial`: the step this start resumes from (0 for a fresh start)."""

    def __init__(self, acc: Accelerator, run: Path, config: dict, total: int, initial: int) -> None:
        self.acc, self.path = acc, Path(run) / METRICS
        first = initial + 1 if initial else 0  # the first step this start logs (0: the random-init measurement)
        if acc.is_main_process:
            drop_after(self.path, first)
        self.tracking = bool(acc.log_with)
        if self.tracking:
            acc.init_trackers("faceclr", config=_scalars(config), init_kwargs={"tensorboard": {"purge_step": first}})
        self.bar = tqdm(total=total, initial=initial, disable=not acc.is_main_process, unit="step", dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, record: dict) -> None:
        """One line of metrics.jsonl and the same scalars to the trackers (main process only)."""
        if not self.acc.is_main_process:
            return
        append_line(self.path, json.dumps(record))
        if self.tracking:
            self.acc.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=record["step"])
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.3g}",
                                 views_s=f"{record['views_per_s']:.0f}")

    def close(self) -> None:
        self.bar.close()
        if self.tracking:
            self.acc.end_training()


def _scalars(config: dict, prefix: str = "") -> dict:
    """The config flattened to the scalar values trackers accept (lists become text)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


class Window:
    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.wait, self.excluded = 0, 0.0, 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        """Accumulate on the device: no host sync per step."""
        self.loss_sum += loss
        self.finite &= torch.isfinite(loss)
        self.steps += 1

    @contextmanager
    def timed_wait(self) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.wait += time.perf_counter() - t

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time inside is not training time: views/s and the data-wait share leave it out."""
        t = time.perf_counter()
        yield
        self.excluded += time.perf_counter() - t

    def summary(self, views_per_step: int) -> dict:
        elapsed = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        return {"loss": float(self.loss_sum) / max(self.steps, 1), "views_per_s": views_per_step * self.steps / elapsed,
                "data_wait_frac": self.wait / elapsed}
