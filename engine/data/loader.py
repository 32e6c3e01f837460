"""PyTorch-facing loaders: two SimCLR views per sample for training (DALI or the torch baseline), and
one centred view per image for evaluation.

Both training loaders give every rank the same number of steps, `(samples // world) // batch`, end
epochs exactly there, and save and restore their position mid-epoch (`state_dict`). Batches arrive on
the device, in the step's dtype, channels-last.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.data.augment import AugmentConfig
from engine.data.shards import Split
from engine.data.torch_pipeline import OneView, TwoViews, epoch_batches


@dataclass
class LoaderConfig:
    """How batches are made (what each view looks like is AugmentConfig)."""

    backend: str = "dali"
    """dali | torch (the baseline: PIL + torchvision.transforms.v2 in DataLoader workers)."""
    batch_size: int = 256
    """Samples per rank per step (each gives two views)."""
    workers: int = 4
    """DALI CPU threads, or DataLoader worker processes."""
    initial_fill: int = 4096
    """DALI shuffle buffer: shards are shuffled when written, this mixes across them."""
    prefetch: int = 2


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _finish(view: torch.Tensor, device: torch.device, dtype: torch.dtype, nhwc: bool = False) -> torch.Tensor:
    """To the device and dtype, channels-last: NHWC data is permuted (a view, no copy), NCHW data copied."""
    view = view.to(device, non_blocking=True)
    view = view.permute(0, 3, 1, 2) if nhwc else view.contiguous(memory_format=torch.channels_last)
    return view.to(dtype)


class TrainLoader:
    """Two-view batches for one rank: `for batch in loader` runs one epoch of `len(loader)` steps."""

    def __init__(self, data: Path | str, aug: AugmentConfig, cfg: LoaderConfig, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
                 split: str = "train", with_keys: bool = False):
        self.split = Split.open(data, split)
        self.aug, self.cfg, self.rank, self.world, self.seed = aug, cfg, rank, world, seed
        self.device, self.dtype, self.with_keys = torch.device(device), dtype, with_keys
        if cfg.backend not in ("dali", "torch"):
            raise ValueError(f"unknown loader backend '{cfg.backend}' (dali | torch)")
        if cfg.backend == "dali" and not dali_available():
            raise RuntimeError("DALI is not installed: pip install nvidia-dali-cuda130, or use --loader torch")
        self.steps = (self.split.samples // world) // cfg.batch_size
        if self.steps == 0:
            raise ValueError(f"split '{split}' has {self.split.samples} samples: fewer than {world} ranks x "
                             f"{cfg.batch_size} per batch")
        self.epoch, self.step = 0, 0
        self._dali_iter = None
        self._checkpoint: str | None = None
        self._entries = None

    def __len__(self) -> int:
        return self.steps

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain JSON-able values: epoch, step, and DALI's own checkpoint (reader position and RNG) as text."""
        state = {"epoch": self.epoch, "step": self.step, "backend": self.cfg.backend}
        if self.cfg.backend == "dali":
            cp = self._dali_iter.checkpoints()[0] if self._dali_iter is not None else self._checkpoint
            state["dali"] = base64.b64encode(cp if isinstance(cp, bytes) else cp.encode()).decode() if cp else None
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend", self.cfg.backend) != self.cfg.backend:
            raise ValueError(f"this state was saved by the {state['backend']} loader, not {self.cfg.backend}")
        self.epoch, self.step = state["epoch"], state["step"]
        self._checkpoint = base64.b64decode(state["dali"]) if state.get("dali") else None
        self._dali_iter = None

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        nhwc = self.cfg.backend == "dali"
        batches = self._dali_epoch() if nhwc else self._torch_epoch()
        for view1, view2, label, keys in batches:
            self.step += 1
            batch = {"view1": _finish(view1, self.device, self.dtype, nhwc),
                     "view2": _finish(view2, self.device, self.dtype, nhwc),
                     "label": label.to(self.device, non_blocking=True), "epoch_end": self.step == self.steps}
            if batch["epoch_end"]:  # closed before the consumer sees it: a state saved now resumes at the next epoch
                self.epoch, self.step = self.epoch + 1, 0
            if self.with_keys:
                batch["key"] = keys
            yield batch

    def _torch_epoch(self):
        if self._entries is None:
            self._entries = self.split.entries()
        batches = epoch_batches(len(self._entries), self.cfg.batch_size, self.steps, self.rank, self.world,
                                self.seed, self.epoch, self.step)
        loader = torch.utils.data.DataLoader(
            TwoViews(self._entries, self.aug, self.seed), batch_sampler=batches, num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=self.cfg.prefetch if self.cfg.workers else None,
            persistent_workers=False)
        for batch, (v1, v2, label) in zip(batches, loader, strict=True):
            yield v1, v2, label, [self._entries[i].key for i, _ in batch]

    def _build_dali(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from engine.data.dali_pipeline import READER, simclr_pipeline

        gpu = self.device.type == "cuda"
        pipe = simclr_pipeline(
            self.split.tars, self.split.indexes, self.aug, "gpu" if gpu else "cpu", self.rank, self.world,
            shuffle=True, initial_fill=self.cfg.initial_fill, fp16=self.dtype == torch.float16,
            batch_size=self.cfg.batch_size, num_threads=self.cfg.workers,
            device_id=(self.device.index or 0) if gpu else None, seed=self.seed * 1000 + self.rank,
            prefetch_queue_depth=self.cfg.prefetch, enable_checkpointing=True, checkpoint=self._checkpoint,
            exec_dynamic=True, with_info=self.with_keys,
        )
        pipe.build()
        names = ["view1", "view2", "label"] + (["info"] if self.with_keys else [])
        return DALIGenericIterator(pipe, names, reader_name=READER,
                                   last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)

    def _dali_epoch(self):
        from engine.data.dali_pipeline import decode_labels, source_key

        if self._dali_iter is None:
            self._dali_iter = self._build_dali()
        it = self._dali_iter
        for step in range(self.step, self.steps):
            try:
                out = next(it)[0]
            except StopIteration:
                raise RuntimeError("DALI ended the epoch early: shards and manifest disagree") from None
            keys = [source_key(row) for row in out["info"]] if self.with_keys else None
            if step == self.steps - 1:  # DALI reuses its buffers: keep the last batch, then close the epoch
                out = {k: v.clone() for k, v in out.items()}
                for _ in it:  # this rank's share may hold one more full batch: drain it, so epochs stay aligned
                    pass
                it.reset()
            yield out["view1"], out["view2"], decode_labels(out["label"]), keys


class EvalLoader:
    """One centred view of every image of a split, each exactly once across ranks (no padding, no drop).

    Yields dicts with `image`, `label` and `key` (the sample key, from the source path).
    """

    def __init__(self, data: Path | str, aug: AugmentConfig, batch_size: int = 256, split: str = "eval",
                 device: torch.device | str = "cpu", rank: int = 0, world: int = 1, workers: int = 2,
                 dtype: torch.dtype = torch.float32):
        self.split = Split.open(data, split)
        entries = self.split.entries()[rank::world]
        self.device, self.dtype = torch.device(device), dtype
        self.loader = torch.utils.data.DataLoader(OneView(entries, aug), batch_size=batch_size, shuffle=False,
                                                  num_workers=workers, pin_memory=self.device.type == "cuda")

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        for image, label, keys in self.loader:
            yield {"image": _finish(image, self.device, self.dtype), "label": label.to(self.device), "key": list(keys)}
