"""PyTorch-facing loaders: two SimCLR views per sample for training (DALI or the torch baseline), and
one centred view per image for evaluation.

Both training loaders give every rank the same number of steps, `(samples // world) // batch`, end
epochs exactly there, flag an epoch's last batch (`batch["epoch_end"]`), and save and restore their
position mid-epoch (`state_dict`). Batches arrive on the device, channels-last: normalised in the step's
dtype, or raw uint8 pixels for `engine.data.augment.Normalize` to finish inside the model.

Every loader, the eval loader too, checks each image against the manifest's size and stops at a sample it
cannot read or decode, with an error naming the shard and the sample (`ShardError`, `DecodeError`): see
docs/training.md, "Shards the loaders refuse".
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from base.signals import ignore_stop_signals, stop_signals_held
from engine.config import DataConfig, Handover, Loader, concrete, no_dali
from engine.data.augment import AugmentConfig
from engine.data.errors import DecodeError
from engine.data.shards import ShardError, Split, check_size, find_wrong_size, rank_range, shards_in
from engine.data.torch_pipeline import OneView, SimCLRViews, epoch_loader, shard_sizes

BACKENDS = concrete(Loader)
HANDOVERS = concrete(Handover)


@dataclass
class LoaderConfig:
    """How batches are made (what each view looks like is AugmentConfig)."""

    backend: str = "dali"
    """dali | torch (the baseline: webdataset, PIL and torchvision's PIL transforms in DataLoader workers)."""
    batch_size: int = 256
    """Samples per rank per step (each gives two views)."""
    workers: int = 4
    """DALI CPU threads, or DataLoader worker processes."""
    initial_fill: int = 4096
    """Shuffle buffer in samples (DALI's reader, or webdataset's .shuffle): the packer shuffled the shards
    when it wrote them; this mixes across them."""
    prefetch: int = 2
    """Batches prepared ahead: DALI's prefetch_queue_depth, or the DataLoader's prefetch_factor per worker.
    2 is DALI's default and its documentation's advice; raise it when the data wait varies from step to step."""
    handover: str = "float"
    """float: normalised views in the step's dtype | uint8: raw pixels (crop, flip and colour done), NHWC
    seen as channels-last NCHW, for `engine.data.augment.Normalize` inside the (compiled) model."""

    @classmethod
    def of(cls, data: DataConfig) -> LoaderConfig:
        """The training config's (resolved) data section as loader settings: the fields both have carry over by
        name; its `loader` is the backend."""
        shared = {f.name: getattr(data, f.name) for f in dataclasses.fields(cls) if hasattr(data, f.name)}
        return cls(**shared, backend=data.loader)


def dali_available() -> bool:
    """Whether DALI imports here: the one answer the trainer's `auto`, the loaders and the benches all use (an
    install that is present but broken counts as absent, rather than failing later in the pipeline)."""
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
    """Two-view batches for one rank: `for batch in loader` runs one epoch of `len(loader)` steps.

    Each batch is a dict: `view1`, `view2`, `label`, `epoch_end` (True on the epoch's last batch), and `key`
    with `with_keys`. When the last batch is yielded the epoch is already closed (`epoch` advanced, `step`
    0, DALI's iterator drained and reset), so a `state_dict()` taken then resumes at the next epoch's start
    and a consumer may stop there without draining anything.
    """

    def __init__(self, data: Path | str, aug: AugmentConfig, cfg: LoaderConfig, device: torch.device | str = "cpu",
                 rank: int = 0, world: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32,
                 split: str = "train", with_keys: bool = False):
        if cfg.backend not in BACKENDS:
            raise ValueError(f"unknown loader backend '{cfg.backend}' (choose from {', '.join(BACKENDS)})")
        if cfg.handover not in HANDOVERS:
            raise ValueError(f"unknown hand-over '{cfg.handover}' (choose from {', '.join(HANDOVERS)})")
        if cfg.batch_size < 1 or cfg.workers < 0 or cfg.prefetch < 1 or cfg.initial_fill < 1:
            raise ValueError("batch size, prefetch and shuffle buffer must be at least 1, workers at least 0")
        self.split = Split.open(data, split)
        self.aug, self.cfg, self.rank, self.world, self.seed = aug, cfg, rank, world, seed
        self.device, self.dtype, self.with_keys = torch.device(device), dtype, with_keys
        if cfg.backend == "dali" and not dali_available():
            raise RuntimeError(no_dali("use --loader torch"))
        if cfg.backend == "torch" and importlib.util.find_spec("webdataset") is None:
            raise RuntimeError("webdataset is not installed: pip install webdataset, or use --loader dali")
        self.steps = (self.split.samples // world) // cfg.batch_size
        if self.steps == 0:
            raise ValueError(f"split '{split}' has {self.split.samples} samples: fewer than {world} ranks x "
                             f"{cfg.batch_size} per batch (lower --batch-size)")
        self.epoch, self.step = 0, 0
        self._dali_iter = None
        self._checkpoint: str | None = None
        self._sizes: list[int] | None = None
        self._normalize = None

    def __len__(self) -> int:
        return self.steps

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain JSON-able values: epoch, step, and DALI's own checkpoint (reader position and RNG) as text."""
        state = {"epoch": self.epoch, "step": self.step, "backend": self.cfg.backend, "world": self.world,
                 "batch_size": self.cfg.batch_size}
        if self.cfg.backend == "torch":
            state["workers"] = self.cfg.workers
        if self.cfg.backend == "dali":
            cp = self._dali_iter.checkpoints()[0] if self._dali_iter is not None else self._checkpoint
            state["dali"] = base64.b64encode(cp if isinstance(cp, bytes) else cp.encode()).decode() if cp else None
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("backend", self.cfg.backend) != self.cfg.backend:
            raise ValueError(f"this state was saved by the {state['backend']} loader, not {self.cfg.backend}")
        now = {"world": self.world, "batch_size": self.cfg.batch_size, "workers": self.cfg.workers}
        if self.cfg.backend == "dali":  # DALI's stream does not depend on its thread count
            del now["workers"]
        changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if state.get(k, v) != v]
        if state["step"] and changed:  # which samples make batch k depends on each
            raise ValueError(f"this state was saved mid-epoch, and resuming it needs the same {', '.join(now)} "
                             f"({', '.join(changed)}): resume with those, or from an epoch-end checkpoint")
        self.epoch, self.step = state["epoch"], state["step"]
        self._checkpoint = base64.b64decode(state["dali"]) if state.get("dali") else None
        self._dali_iter = None

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        batches = self._dali_epoch() if self.cfg.backend == "dali" else self._torch_epoch()
        for view1, view2, label, keys in batches:
            self.step += 1
            last = self.step == self.steps
            batch = {"view1": self._views(view1), "view2": self._views(view2),
                     "label": label.to(self.device, non_blocking=True), "epoch_end": last}
            if self.with_keys:
                batch["key"] = keys
            if last:
                self.epoch, self.step = self.epoch + 1, 0
            yield batch

    def _views(self, view: torch.Tensor) -> torch.Tensor:
        """NHWC from either backend -> the device, channels-last; normalised here for the float hand-over,
        except where DALI already did it."""
        view = view.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if self.cfg.handover == "uint8":
            return view
        if view.dtype == torch.uint8:
            if self._normalize is None:
                from engine.data.augment import Normalize

                self._normalize = Normalize(self.aug.mean, self.aug.std, self.dtype).to(self.device)
            return self._normalize(view)
        return view.to(self.dtype)

    def _torch_epoch(self):
        if self._sizes is None:
            self._sizes = shard_sizes(self.split)
        in_workers = self.cfg.handover == "float" and self.device.type == "cpu"  # parallel there; else on the GPU
        yield from epoch_loader(self.split, self._sizes, SimCLRViews(self.aug, in_workers), self.cfg.batch_size,
                                self.steps, self.cfg.workers, self.cfg.prefetch, self.cfg.initial_fill, self.seed,
                                self.epoch, self.rank, self.world, self.step, pin_memory=self.device.type == "cuda")

    def _build_dali(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        from engine.data.dali_pipeline import READER, simclr_pipeline

        gpu = self.device.type == "cuda"
        out = "uint8" if self.cfg.handover == "uint8" else "float16" if self.dtype == torch.float16 else "float32"
        pipe = simclr_pipeline(
            self.split.tars, self.split.indexes, self.aug, "gpu" if gpu else "cpu", self.rank, self.world,
            shuffle=True, initial_fill=self.cfg.initial_fill, output=out,
            batch_size=self.cfg.batch_size, num_threads=max(1, self.cfg.workers),
            device_id=(self.device.index or 0) if gpu else None, seed=self.seed * 1000 + self.rank,
            prefetch_queue_depth=self.cfg.prefetch, enable_checkpointing=True, checkpoint=self._checkpoint,
            exec_dynamic=True, with_info=self.with_keys, with_shape=True,
        )
        names = ["view1", "view2", "label"] + (["info"] if self.with_keys else []) + ["shape"]
        try:  # build() reads the indexes; the iterator runs the pipeline for its first batch already
            pipe.build()
            return DALIGenericIterator(pipe, names, reader_name=READER,
                                       last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        except RuntimeError as e:
            raise self._dali_error(e, [pipe]) from None

    def _dali_next(self, it) -> dict:
        """The next batch, or a DecodeError naming the shards this rank reads (DALI names none)."""
        try:
            return next(it)[0]
        except RuntimeError as e:
            raise self._dali_error(e, getattr(it, "_pipes", [])) from None

    def _stop_dali(self, pipes: list) -> None:
        """The pipeline failed and is no longer valid: stop its threads now (a process that forks DataLoader
        workers while they hang on was seen to deadlock), and keep no reference to it."""
        for pipe in pipes:
            pipe._shutdown()
        self._dali_iter = None

    def _dali_error(self, e: RuntimeError, pipes: list) -> Exception:
        """DALI's failure to read or decode a sample as a DecodeError naming the shard (and the sample, where the
        index shows it) or the shards this rank reads; any other error as it is.

        DALI's reader checks each index entry as it reaches it (an offset off the tar's 512-byte blocks, or past
        the tar's end, with `--no-verify`) and names the index file; the decoder names nothing."""
        text = str(e)
        reader = "readers.webdataset" in text or "index file" in text.lower()
        if not reader and "decod" not in text.lower() and "codec" not in text.lower():
            return e
        self._stop_dali(pipes)
        cause = _dali_cause(text)
        files = self.split.indexes + self.split.tars
        path = next((x for x in re.findall(r'"([^"]+)"', text) if x in files), None) if reader else None
        if path is not None:
            tar = self.split.tars[self.split.indexes.index(path)] if path in self.split.indexes else path
            found = _misplaced_member(self.split, tar)
            where, why = (f"shard {tar}, sample {found[0]}", found[1]) if found else (f"shard {tar}", cause)
            return DecodeError([tar], f"{where}: {why} (the index does not match the tar; DALI's reader stops "
                                      "there)")
        what = "read" if reader else "decode"
        return DecodeError(self._dali_rank_shards(),
                           f"DALI could not {what} a sample of split '{self.split.name}': {cause}")

    def _check_shapes(self, shapes: torch.Tensor) -> None:
        """Each decoded image has the manifest's size (one comparison per batch of DALI's shape metadata, on the
        CPU); else a ShardError naming a sample of this rank's shards whose image has not (the batch does not
        say which sample it was; the image headers do)."""
        size = self.split.image_size
        if bool((shapes[:, :2] == size).all()):
            return
        self._stop_dali(getattr(self._dali_iter, "_pipes", []))
        shards = self._dali_rank_shards()
        found = find_wrong_size(self.split, shards, size)
        if found is not None:
            check_size(*found, size)
        h, w = (int(x) for x in shapes[~(shapes[:, :2] == size).all(dim=1)][0, :2])
        raise ShardError(f"an image of {', '.join(shards)} is {w}x{h} px, the manifest says {size} px (the shards "
                         "are not the ones this manifest describes: pack again, or restore them)")

    def _dali_rank_shards(self) -> list[str]:
        """The shards DALI's reader can give this rank in this epoch: the samples of `rank_range` number
        (rank + 2 x epoch) mod world of the shards in manifest order, and of the range after it, which the
        shuffle buffer reaches into. With stick_to_shard off the reader moves one range on at each reset, and
        this loader's epoch has two (the reader's end of its range, and the iterator's reset after the drain):
        measured with DALI 2.4, and checked by tests/test_data.py. Alone, a rank reads every shard."""
        if self.world == 1:
            return list(self.split.tars)
        if self._sizes is None:
            self._sizes = shard_sizes(self.split)
        total = sum(self._sizes)
        first = self.rank + 2 * self.epoch
        touched = {tar for r in (first, first + 1)
                   for tar, _, _ in shards_in(self.split.tars, self._sizes, *rank_range(total, r % self.world,
                                                                                        self.world))}
        return [tar for tar in self.split.tars if tar in touched]

    def _dali_epoch(self):
        from engine.data.dali_pipeline import decode_labels, source_key

        if self._dali_iter is None:
            self._dali_iter = self._build_dali()
        it = self._dali_iter
        for step in range(self.step, self.steps):
            try:
                out = self._dali_next(it)
            except StopIteration:
                raise RuntimeError("DALI ended the epoch early: shards and manifest disagree") from None
            self._check_shapes(out["shape"])
            keys = [source_key(row) for row in out["info"]] if self.with_keys else None
            view1, view2, label = out["view1"], out["view2"], decode_labels(out["label"])
            if step == self.steps - 1:
                # DALI refills these buffers: keep the last batch, then close the epoch before yielding it.
                view1, view2, label = view1.clone(), view2.clone(), label.clone()
                for _ in it:  # this rank's share may hold one more full batch: drain it, so epochs stay aligned
                    pass
                it.reset()
            yield view1, view2, label, keys


def _dali_cause(text: str) -> str:
    """The line of a DALI error message that says what went wrong (DALI wraps it in its own context lines)."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for line in lines:
        if " failed: " in line:  # `Assert on "..." failed: Malformed index file at "..." line N - <what>`
            return re.split(r" line \d+ - ", line.split(" failed: ", 1)[1], maxsplit=1)[-1]
    return next((x for x in lines if "failure" in x.lower() or "error:" in x.lower()),
                lines[-1] if lines else "no message")


def _misplaced_member(split: Split, tar: str) -> tuple[str, str] | None:
    """The first sample of `tar` whose index entry DALI's reader refuses, and why: a member offset off the
    tar's 512-byte blocks, or a member past the tar's end."""
    end = Path(tar).stat().st_size
    for entry in split.entries():
        for ext, m in entry.members.items():
            if m.shard == tar and m.offset % 512:
                return entry.key, f"its index puts its {ext} at byte {m.offset}, off the tar's 512-byte blocks"
            if m.shard == tar and m.offset + m.size > end:
                return entry.key, f"its index puts its {ext} past the tar's end ({end} bytes)"
    return None


def _collate(items: list):
    """The default collation, unless a sample came back as its failure (see OneView): then that, for the
    main process to raise."""
    failed = next((x for x in items if isinstance(x, Exception)), None)
    return failed if failed is not None else torch.utils.data.default_collate(items)


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
        self.loader = torch.utils.data.DataLoader(OneView(entries, aug, self.split), batch_size=batch_size,
                                                  shuffle=False, num_workers=workers, collate_fn=_collate,
                                                  pin_memory=self.device.type == "cuda",
                                                  worker_init_fn=ignore_stop_signals)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict]:
        with stop_signals_held():  # the workers start here: a stop signal to the group is the main process's
            batches = iter(self.loader)
        for batch in batches:
            if isinstance(batch, Exception):  # a sample that cannot be read or decoded, or of the wrong size
                raise batch
            image, label, keys = batch
            yield {"image": _finish(image, self.device, self.dtype), "label": label.to(self.device), "key": list(keys)}
