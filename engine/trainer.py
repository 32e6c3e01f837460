"""The SimCLR training loop: `Trainer(cfg)` builds everything, `train()` runs it to an exit code.

`train_step(batch)` is one optimisation step on a batch of two views; the benchmarks time this same
function. Each concern the loop touches is one object with one call: the loader (which marks an epoch's
last batch), the checkpointer, the online monitor, the run log, preemption. A disabled checkpointer or
monitor does nothing when called, so the loop has no feature branches.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

from base.errors import EXIT_INTERRUPTED, UsageError
from base.files import file_sha256, write_atomic
from engine.checkpoint import Checkpointer
from engine.config import Machine, TrainConfig, differences, precision_for, resolve, to_dict
from engine.data import AugmentConfig, DecodeError, LoaderConfig, Normalize, ShardError, Split, TrainLoader
from engine.data.errors import undecodable
from engine.data.loader import dali_available
from engine.model import SimCLRNet, export
from engine.monitor import NoMonitor, OnlineMonitor
from engine.optim import build_optimizer, scaled_lr, warmup_cosine
from engine.preemption import EXIT_REQUEUE, Preemption, clear_requeue, mark_requeue
from engine.runlock import RunLock, RunLocked
from engine.runlog import RunLog, Window, read_metrics, trackers
from kernels import nt_xent, nt_xent_reference
from measure.memory import peak_memory_gb
from pack.format import Manifest
from pack.verify import ensure_verified

EXIT_OK, EXIT_NONFINITE = 0, 3
CONFIG = "config.json"
MIXED = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def this_machine(cpu: bool) -> Machine:
    """Where a run trains: a visible GPU unless `cpu`, whether it has bf16, whether DALI is installed."""
    gpu = not cpu and torch.cuda.is_available()
    return Machine(gpu=gpu, bf16=gpu and torch.cuda.is_bf16_supported(), dali=dali_available())


def resolve_precision(precision: str, device: torch.device) -> str:
    """What --precision runs as on `device` (for the benches, which make views in that dtype before the Trainer)."""
    return precision_for(precision, this_machine(cpu=device.type != "cuda"))


class Trainer:
    """`cfg` as parsed; `self.cfg` is what runs: its resolution (engine.config.resolve) on this machine and data,
    also what RUN/config.json and each checkpoint record. `loader`: batches from elsewhere (the step benchmark's
    synthetic views); by default the TrainLoader over `--data`'s train split, checked against the config first."""

    def __init__(self, cfg: TrainConfig, loader: TrainLoader | None = None) -> None:
        self.run = Path(cfg.runtime.out)
        split = self._open_data(cfg) if loader is None else None
        self.cfg, notes = resolve(cfg, this_machine(cfg.runtime.cpu),
                                  split.image_size if split else cfg.data.image_size,
                                  file_sha256(Manifest.path(cfg.data.data)) if split else "")
        try:
            log_with = trackers(cfg.log.log_with)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.acc = Accelerator(cpu=self.cfg.runtime.cpu, mixed_precision=MIXED[self.cfg.runtime.precision],
                               log_with=log_with or None,
                               project_config=ProjectConfiguration(project_dir=str(self.run),
                                                                   logging_dir=str(self.run / "tensorboard")),
                               step_scheduler_with_optimizer=False)  # Accelerate would step it once per rank
        self.device, self.world, self.rank = self.acc.device, self.acc.num_processes, self.acc.process_index
        for note in notes:
            self.acc.print(note)
        self.lock = RunLock(self.run)
        self._take_lock()
        try:
            self._build(split, loader)
        except BaseException:
            self.lock.release()
            raise

    # -- building ----------------------------------------------------------------------------------
    def _on_main(self, action: Callable[[], object], error: type[Exception], suffix: str = "") -> None:
        """`action` on the main process only; if it raised `error`, every rank raises the same UsageError."""
        message = [None]
        if self.acc.is_main_process:
            try:
                action()
            except error as e:
                message = [f"{e}{suffix}"]
        if self.world > 1:
            broadcast_object_list(message)
        if message[0]:
            raise UsageError(message[0])

    def _take_lock(self) -> None:
        """The main process takes RUN/lock.json for the job; every rank learns whether it succeeded."""
        self._on_main(self.lock.acquire, RunLocked)

    @staticmethod
    def _open_data(cfg: TrainConfig) -> Split:
        """The train split (and, for the monitor, the eval split) as the manifest describes them."""
        try:
            split = Split.open(cfg.data.data, "train")
            if cfg.monitor.eval_every:
                Split.open(cfg.data.data, "eval")
        except ShardError as e:
            hint = " (or --eval-every 0 to train without the online monitor)" if "eval" in str(e) else ""
            raise UsageError(f"{e}{hint}") from None
        return split

    def _check_recipe(self) -> None:
        """One recipe per run folder: a start on a folder that holds a run (RUN/config.json), or from a checkpoint,
        that changes a leaf defining the run is refused before anything is written; run-control changes are
        printed."""
        records = [self.run / CONFIG] if (self.run / CONFIG).is_file() else []
        if self.resume_from is not None:
            records.append(self.resume_from / "trainer.json")
        control: list[str] = []
        for path in records:
            try:
                recorded = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"{path} cannot be read ({e}): restore it, or use a new --out") from None
            defining, control = differences(recorded.get("config", recorded), self.cfg)
            if defining:
                raise UsageError(f"this run was trained with another recipe: {', '.join(defining)} (recorded in "
                                 f"{path}; a run folder holds one recipe: use a new --out, or the recorded values)")
        if control:
            self.acc.print(f"changed since the run's last start: {', '.join(control)}")

    def _verify_data(self) -> None:
        """Every shard this run reads matches the manifest's size and sha256 before the first step: the main
        process hashes them (or finds the answer in RUN/verified.json from an earlier start), the others wait."""
        splits = ["train", "eval"] if self.cfg.monitor.eval_every else ["train"]
        self._on_main(lambda: ensure_verified(Path(self.cfg.data.data), splits, self.run / "verified.json",
                                              workers=self.cfg.data.workers, progress=sys.stderr.isatty()),
                      ShardError, "; --no-verify skips the check")

    def _build(self, split: Split | None, loader: TrainLoader | None) -> None:
        cfg, acc = self.cfg, self.acc
        d = cfg.data
        set_seed(cfg.schedule.seed, device_specific=False)
        torch.backends.cudnn.benchmark = cfg.runtime.cudnn_benchmark
        if cfg.loss.loss_impl == "reference" and self.world > 1:
            raise UsageError("--loss-impl reference computes one device's logits only (use fused with several devices)")
        if split is not None and split.samples // self.world < d.batch_size:
            raise UsageError(f"--batch-size {d.batch_size} x {self.world} device(s) exceeds the {split.samples} "
                             f"training samples in {d.data} (lower --batch-size)")
        ck = cfg.checkpoint
        self.checkpointer = Checkpointer(acc, self.run, ck.keep_ckpts, ck.ckpt_every, enabled=ck.checkpoints)
        try:
            self.resume_from = self.checkpointer.find(ck.resume)
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        self._check_recipe()
        if d.verify and loader is None:
            self._verify_data()
        if acc.is_main_process:
            if not (self.run / CONFIG).exists():
                write_atomic(self.run / CONFIG, json.dumps(to_dict(cfg), indent=1))
            clear_requeue(self.run)

        aug = AugmentConfig(size=d.image_size, crop_scale=(d.crop_min_area, 1.0), strength=d.jitter_strength)
        try:
            self.loader = loader or TrainLoader(d.data, aug, LoaderConfig.of(d), device=self.device, rank=self.rank,
                                                world=self.world, seed=cfg.schedule.seed,
                                                dtype=DTYPES[cfg.runtime.precision])
        except (ValueError, RuntimeError) as e:
            raise UsageError(str(e)) from None
        model = SimCLRNet(cfg.model)
        if cfg.runtime.sync_bn and self.world > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.memory_format = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
        model = model.to(memory_format=self.memory_format)
        self.global_batch = d.batch_size * self.world
        steps_per_epoch = len(self.loader)
        self.total = min(cfg.schedule.max_steps or math.inf, cfg.schedule.epochs * steps_per_epoch)
        lr = scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, self.global_batch)
        optimizer = build_optimizer(model, cfg.optim.optimizer, lr, cfg.optim.weight_decay, cfg.optim.momentum)
        scheduler = warmup_cosine(optimizer, int(cfg.optim.warmup_epochs * steps_per_epoch),
                                  cfg.schedule.epochs * steps_per_epoch)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        # prepare() wraps the forward in autocast plus a cast of its outputs to fp32, which would hand the fused loss
        # fp32 embeddings under bf16/fp16 (exact fp32 products, no tensor cores). unwrap_model with
        # keep_fp32_wrapper=False removes both wrappers in place (Accelerate's own way to drop them); train_step's
        # acc.autocast() keeps the forward in the autocast dtype, and the loss accumulates in fp32 itself.
        acc.unwrap_model(self.model, keep_fp32_wrapper=False)
        # uint8 views become the first convolution's input dtype in one elementwise pass (fused by compile); kept
        # apart from the model so that DDP's wrapper stays the compiled module's top, as torch.compile expects
        self.prepare = torch.nn.Identity()
        if d.handover == "uint8":
            self.prepare = Normalize(aug.mean, aug.std, dtype=DTYPES[cfg.runtime.precision]).to(self.device)
        self.forward = torch.compile(self.model) if cfg.runtime.compile else self.model
        if cfg.runtime.compile and d.handover == "uint8":
            self.prepare = torch.compile(self.prepare)
        self.group = dist.group.WORLD if self.world > 1 else None
        self.loss_fn = {"fused": nt_xent, "reference": nt_xent_reference}[cfg.loss.loss_impl]

        self.step, self.epoch = 0, 0
        self.loss_dtype: torch.dtype | None = None
        self.saved_step: int | None = None
        self.window = Window(self.device)

    # -- one step ------------------------------------------------------------------------------------
    def batches(self) -> Iterator[dict]:
        """The loader's batches without end, epoch after epoch (an epoch's last one carries `epoch_end`): what
        `train` steps through, and what the benchmarks time `train_step` on."""
        while True:
            yield from self.loader

    def train_step(self, batch: dict) -> torch.Tensor:
        """Forward both views, NT-Xent over every device's views, backward, optimizer and schedule step.

        Returns the loss as a device tensor: reading it is the caller's choice (a host sync)."""
        views = self.prepare(torch.cat([batch["view1"], batch["view2"]]).contiguous(memory_format=self.memory_format))
        with self.acc.autocast():
            z = self.forward(views)
            self.loss_dtype = z.dtype  # what the benches report: bf16 (fp16) under mixed precision, else fp32
            loss = self.loss_fn(*z.chunk(2), self.cfg.loss.temperature, self.group)
        self.acc.backward(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # -- the run -------------------------------------------------------------------------------------
    def train(self) -> int:
        """Resume, loop to the end (or an agreed stop: a preemption, Ctrl-C; or a non-finite loss), finish. Returns
        the exit code."""
        cfg, acc = self.cfg, self.acc
        preemption = Preemption(self.world)
        code = EXIT_OK
        clean = False
        try:
            self.restore()
            self.log = RunLog(acc, self.run, to_dict(cfg), self.total, self.step)
            monitor = (OnlineMonitor(acc, cfg.data.data, cfg.data.image_size, cfg.data.batch_size,
                                     min(2, cfg.data.workers), cfg.monitor.eval_every, self.log)
                       if cfg.monitor.eval_every else NoMonitor())
            monitor.at_start(self.model, self.step)
            self.model.train()
            self.window.reset()
            batches = self.batches()
            while self.step < self.total:
                with self.window.timed_wait():
                    batch = next(batches)
                self.window.add(self.train_step(batch))
                self.step += 1
                self.epoch += batch["epoch_end"]
                self.log.step()
                if (self.step % cfg.log.log_every == 0 or self.step == self.total) and not self.write_log(preemption):
                    code = EXIT_NONFINITE
                    break
                stop = preemption.agreed()
                if stop:
                    self.save()
                    code = stop
                    break
                if batch["epoch_end"]:
                    with self.window.paused():
                        self.save()
                        monitor.at_epoch_end(self.model, self.step, self.epoch)
                elif self.checkpointer.due(self.step):
                    with self.window.paused():
                        self.save()
            else:
                monitor.at_end(self.model, self.step, self.epoch)
                self.finish()
            clean = True
        except DecodeError as e:
            raise UsageError(undecodable(self.cfg.data.data, e.split, e.shards, e.message)) from None
        finally:
            if clean:
                preemption.settle()
            preemption.restore()
            self.close(code, clean)
        return code

    def restore(self) -> None:
        found = self.resume_from
        if found is not None:
            try:
                trainer_state, loader_state = self.checkpointer.load(found)
                self.loader.load_state_dict(loader_state)
            except (FileNotFoundError, ValueError) as e:
                raise UsageError(f"--resume {found}: {e}") from None
            self.step, self.epoch = trainer_state["step"], trainer_state["epoch"]
            self.acc.print(f"resumed from {found} (step {self.step}, epoch {self.epoch})")

    def save(self) -> None:
        """A checkpoint of this step, unless the loss went non-finite (the last good one stays the newest)."""
        if bool(self.window.finite):
            self.checkpointer.save(self.step, {"step": self.step, "epoch": self.epoch, "config": to_dict(self.cfg)},
                                   self.loader.state_dict())
            self.saved_step = self.step

    def write_log(self, preemption: Preemption) -> bool:
        """A metrics line for the window since the last; False (on every rank) once any loss was non-finite."""
        if not preemption.all_true(bool(self.window.finite)):
            self.acc.print(f"error: the loss became non-finite before step {self.step}; stopping. The last good "
                           f"checkpoint in {self.checkpointer.dir} is intact (lower --lr, or --precision fp32)")
            return False
        record = {"step": self.step, "epoch": self.epoch, **self.window.summary(2 * self.global_batch),
                  "lr": self.scheduler.get_last_lr()[0], "max_mem_gb": peak_memory_gb(self.device)}
        self.log.write(record)
        self.window.reset()
        return True

    def finish(self) -> None:
        """The end of a complete run: replicas compared, a final checkpoint, the exported weights, the summary."""
        acc = self.acc
        if self.world > 1:  # DDP keeps replicas identical; say so, or say loudly that they are not
            checksum = torch.stack([p.detach().double().sum() for p in acc.unwrap_model(self.model).parameters()]).sum()
            sums = acc.gather(checksum.reshape(1).to(self.device))
            acc.print(f"weights identical on all {self.world} ranks: {bool((sums == sums[0]).all())}")
        if self.saved_step != self.step:
            self.save()
        self.log.bar.close()  # the summary table below the finished bar, not before its last refresh
        if acc.is_main_process:
            export(acc.unwrap_model(self.model), self.run / "backbone.safetensors",
                   {"image_size": self.cfg.data.image_size, "train_config": to_dict(self.cfg), "step": self.step})
            print(summary(read_metrics(self.run), self.run))

    def close(self, code: int, clean: bool = True) -> None:
        """`clean`: every rank got here together (no exception), so they can meet at a barrier."""
        if hasattr(self, "log"):
            self.log.close()
        saved = "checkpoint saved" if self.saved_step == self.step else "no checkpoint saved (--no-checkpoints)"
        if code == EXIT_REQUEUE:
            if self.acc.is_main_process:
                mark_requeue(self.run, self.step)
            self.acc.print(f"preempted: {saved} at step {self.step}; exiting with {EXIT_REQUEUE} to requeue")
        if code == EXIT_INTERRUPTED:  # a user's stop: no requeue marker
            self.acc.print(f"interrupted: {saved} at step {self.step}; the same command resumes from the newest "
                           f"checkpoint (exit {EXIT_INTERRUPTED})")
        if clean:
            self.acc.wait_for_everyone()
        self.lock.release()


def summary(records: list[dict], run: Path) -> str:
    """The end-of-run table; each figure names the step it belongs to."""
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_precision_at_1" in r]
    rows = []
    if logs:
        rows += [("steps", f"{logs[-1]['step']}"),
                 ("loss", f"{logs[0]['loss']:.4f} (step {logs[0]['step']}) -> {logs[-1]['loss']:.4f} "
                          f"(step {logs[-1]['step']})"),
                 ("views/s (mean of logs)", f"{sum(r['views_per_s'] for r in logs) / len(logs):.1f}"),
                 ("data wait", f"{sum(r['data_wait_frac'] for r in logs) / len(logs):.1%}"),
                 ("peak memory", f"{max(r['max_mem_gb'] for r in logs):.2f} GB")]
    if evals:
        first = "random init" if evals[0]["step"] == 0 else f"step {evals[0]['step']}"
        for key, name in (("eval_precision_at_1", "online precision@1"), ("eval_map_at_r", "online MAP@R")):
            if key in evals[0] and key in evals[-1]:
                rows.append((name, f"{evals[0][key]:.4f} ({first}) -> {evals[-1][key]:.4f} "
                                   f"(step {evals[-1]['step']})"))
    rows.append(("weights", str(run / "backbone.safetensors")))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
