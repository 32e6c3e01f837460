"""SimCLR training: `accelerate launch engine/train.py --data OUT --out RUN [flags]` (or `python engine/train.py`).

Reads top to bottom: config -> accelerator -> data -> model -> optimizer -> resume -> loop -> export.
Exit codes: 0 done; 2 bad input; 3 non-finite loss (the last good checkpoint is kept);
75 (EX_TEMPFAIL) preempted by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch engine/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from engine.checkpoint import Checkpointer
from engine.config import TrainConfig, parse, to_dict
from engine.data import AugmentConfig, EvalLoader, LoaderConfig, TrainLoader
from engine.evaluate import embed
from engine.metrics import precision_at_1
from engine.model import SimCLRNet, export
from engine.optim import build_optimizer, scaled_lr, warmup_cosine
from kernels import nt_xent

EXIT_NONFINITE = 3
EXIT_REQUEUE = 75


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints and exits with EXIT_REQUEUE."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


@torch.no_grad()
def online_precision(model: torch.nn.Module, cfg: TrainConfig, acc: Accelerator) -> float | None:
    """precision@1 of backbone features on the eval split (main process; others wait)."""
    p1 = None
    if acc.is_main_process:
        net = acc.unwrap_model(model)
        was_training = net.training  # embed() switches to eval mode; training resumes as it was
        loader = EvalLoader(cfg.data.data, AugmentConfig(size=cfg.data.image_size), cfg.data.batch_size,
                            device=acc.device, workers=min(2, cfg.data.workers))
        with acc.autocast():
            emb, labels, _ = embed(net, loader, amp=False)
        p1 = precision_at_1(emb, labels)
        net.train(was_training)
    acc.wait_for_everyone()
    return p1


def log_line(run: Path, record: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig) -> int:
    run = Path(cfg.runtime.out)
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[cfg.runtime.precision]
    acc = Accelerator(cpu=cfg.runtime.cpu, mixed_precision=mixed)
    set_seed(cfg.schedule.seed, device_specific=False)
    device, world, rank = acc.device, acc.num_processes, acc.process_index
    use_compile = cfg.runtime.compile if cfg.runtime.compile is not None else device.type == "cuda"
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    view_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.runtime.precision]
    loader = TrainLoader(cfg.data.data, cfg.data.augment(),
                         LoaderConfig(backend=cfg.data.loader, batch_size=cfg.data.batch_size,
                                      workers=cfg.data.workers),
                         device=device, rank=rank, world=world, seed=cfg.schedule.seed, dtype=view_dtype)

    model = SimCLRNet(cfg.model)
    if cfg.runtime.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch = cfg.data.batch_size * world
    steps_per_epoch = len(loader)
    total = cfg.schedule.max_steps or cfg.schedule.epochs * steps_per_epoch
    total = min(total, cfg.schedule.epochs * steps_per_epoch)
    optimizer = build_optimizer(model, cfg.optim.optimizer, scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling,
                                                                      global_batch),
                                cfg.optim.weight_decay, cfg.optim.momentum)
    scheduler = warmup_cosine(optimizer, int(cfg.optim.warmup_epochs * steps_per_epoch), total)
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    forward = torch.compile(model) if use_compile else model
    group = dist.group.WORLD if world > 1 else None

    ckpt = Checkpointer(acc, run, cfg.runtime.keep_ckpts)
    step, epoch = 0, 0
    found = ckpt.find(cfg.runtime.resume)
    if found is not None:
        trainer_state, loader_state = ckpt.load(found)
        step, epoch = trainer_state["step"], trainer_state["epoch"]
        loader.load_state_dict(loader_state)
        acc.print(f"resumed from {found} (step {step}, epoch {epoch})")

    preempt = Preemption()
    p1_start = online_precision(model, cfg, acc) if cfg.runtime.eval_every and step == 0 else None
    if p1_start is not None:
        log_line(run, {"step": 0, "epoch": 0, "eval_precision_at_1": p1_start})
    bar = tqdm(total=total, initial=step, disable=not acc.is_main_process, unit="step", dynamic_ncols=True)
    finite = torch.ones((), dtype=torch.bool, device=device)
    loss_sum = torch.zeros((), device=device)
    window = {"t0": time.perf_counter(), "wait": 0.0, "steps": 0}
    history = []
    last_log: dict = {}

    def save() -> None:
        if not bool(finite):
            return
        ckpt.save(step, {"step": step, "epoch": loader.epoch, "config": to_dict(cfg)}, loader.state_dict())

    exit_code = 0
    model.train()
    while step < total and exit_code == 0:
        batches = iter(loader)
        while step < total:
            t_wait = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            window["wait"] += time.perf_counter() - t_wait
            with acc.autocast():
                z = forward(torch.cat([batch["view1"], batch["view2"]]))
                z1, z2 = z.float().chunk(2)
                loss = nt_xent(z1, z2, cfg.optim.temperature, group)
            acc.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            finite &= torch.isfinite(loss.detach())
            loss_sum += loss.detach()
            step += 1
            window["steps"] += 1
            bar.update(1)

            stop = preempt.requested
            if world > 1 and (step % cfg.runtime.log_every == 0):
                flag = torch.tensor([float(stop)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if step % cfg.runtime.log_every == 0 or step == total or stop:
                elapsed = time.perf_counter() - window["t0"]
                if not bool(finite):
                    acc.print(f"error: the loss became non-finite before step {step}; stopping. The last good "
                              f"checkpoint in {ckpt.dir} is intact. Lower --lr, or use --precision fp32.")
                    exit_code = EXIT_NONFINITE
                    break
                last_log = {"step": step, "epoch": loader.epoch, "loss": float(loss_sum) / window["steps"],
                            "lr": scheduler.get_last_lr()[0],
                            "views_per_s": 2 * global_batch * window["steps"] / elapsed,
                            "data_wait_frac": window["wait"] / elapsed, "max_mem_gb": peak_memory_gb(device)}
                history.append(last_log)
                if acc.is_main_process:
                    log_line(run, last_log)
                    bar.set_postfix(loss=f"{last_log['loss']:.3f}", lr=f"{last_log['lr']:.3g}",
                                    views_s=f"{last_log['views_per_s']:.0f}")
                loss_sum.zero_()
                window.update(t0=time.perf_counter(), wait=0.0, steps=0)
            if stop:
                save()
                acc.print(f"preempted: checkpoint saved at step {step}; exiting with {EXIT_REQUEUE} to requeue")
                exit_code = EXIT_REQUEUE
                break
            if cfg.runtime.ckpt_every and step % cfg.runtime.ckpt_every == 0:
                save()
        if exit_code:
            break
        if loader.step == len(loader):  # stopped on the epoch's last batch: let the loader close the epoch
            for _ in batches:
                pass
        if loader.step == 0:  # the epoch ran to its end
            epoch = loader.epoch
            save()
            if cfg.runtime.eval_every and epoch % cfg.runtime.eval_every == 0:
                p1 = online_precision(model, cfg, acc)
                if acc.is_main_process:
                    log_line(run, {"step": step, "epoch": epoch, "eval_precision_at_1": p1})
                    acc.print(f"epoch {epoch}: online precision@1 {p1:.4f}")
    bar.close()
    if exit_code:
        acc.end_training()
        return exit_code
    if world > 1:  # DDP keeps replicas identical; say so, or say loudly that they are not
        checksum = torch.stack([p.detach().double().sum() for p in acc.unwrap_model(model).parameters()]).sum()
        sums = acc.gather(checksum.reshape(1).to(device))
        agree = bool((sums == sums[0]).all())
        acc.print(f"weights identical on all {world} ranks: {agree}")
    if loader.step != 0:
        save()
    if acc.is_main_process:
        export(acc.unwrap_model(model), run / "backbone.safetensors",
               {"image_size": cfg.data.image_size, "train_config": to_dict(cfg), "step": step})
        summarise(history, run, p1_start)
    acc.end_training()
    return 0


def summarise(history: list[dict], run: Path, p1_start: float | None) -> None:
    if not history:
        return
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    p1 = [e["eval_precision_at_1"] for e in evals if "eval_precision_at_1" in e]
    rows = [("steps", f"{history[-1]['step']}"), ("first / last loss", f"{history[0]['loss']:.4f} / "
                                                                         f"{history[-1]['loss']:.4f}"),
            ("views/s (mean of logs)", f"{sum(h['views_per_s'] for h in history) / len(history):.1f}"),
            ("data wait", f"{sum(h['data_wait_frac'] for h in history) / len(history):.1%}"),
            ("peak memory", f"{max(h['max_mem_gb'] for h in history):.2f} GB")]
    if p1:
        rows.append(("online precision@1", f"{p1[0]:.4f} -> {p1[-1]:.4f}"))
    rows.append(("weights", str(run / "backbone.safetensors")))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"engine/train.py: error: {e}", file=sys.stderr)
        return 2
    bad = ("--lr must be positive" if not cfg.optim.lr > 0 else
           "--crop-min-area must be in (0, 1]" if not 0 < cfg.data.crop_min_area <= 1 else
           "--jitter-strength must be >= 0" if not cfg.data.jitter_strength >= 0 else None)
    if bad:
        print(f"engine/train.py: error: {bad}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return train(cfg)


if __name__ == "__main__":
    sys.exit(main())
