"""The online monitor: retrieval on the eval split (precision@1 and MAP@R of the backbone's features) while
training runs.

Measured on the random-init network before the first step, every `--eval-every` epochs, and always on the
final model, so the last figure a run prints belongs to the weights it exports. A disabled monitor is a
`NoMonitor`, whose calls do nothing, so the training loop has no branch for it.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from tqdm import tqdm

from engine.data import AugmentConfig, EvalLoader
from engine.embed import embed
from engine.metrics import retrieval
from engine.runlog import RunLog


class NoMonitor:
    def at_start(self, model: torch.nn.Module, step: int) -> None:
        pass

    def at_epoch_end(self, model: torch.nn.Module, step: int, epoch: int) -> None:
        pass

    def at_end(self, model: torch.nn.Module, step: int, epoch: int) -> None:
        pass


class OnlineMonitor(NoMonitor):
    def __init__(self, acc: Accelerator, data: str, size: int, batch_size: int, workers: int, every: int,
                 log: RunLog) -> None:
        self.acc, self.every, self.log = acc, every, log
        self.loader_args = (data, AugmentConfig(size=size), batch_size)
        self.workers = workers
        self.last_step: int | None = None

    @torch.no_grad()
    def measure(self, model: torch.nn.Module, step: int, epoch: int) -> float | None:
        """Retrieval on the main process (the others wait); logged as `eval_precision_at_1` and `eval_map_at_r`.
        MAP@R averages over every other image of the query's identity, so it moves less by chance than
        precision@1, which looks at the nearest one only."""
        p1 = None
        if self.acc.is_main_process:
            net = self.acc.unwrap_model(model)
            was_training = net.training  # embed() switches to eval mode; training resumes as it was
            loader = EvalLoader(*self.loader_args, device=self.acc.device, workers=self.workers)
            with self.acc.autocast():
                emb, labels, _ = embed(net, loader, amp=False)
            r = retrieval(emb, labels)
            p1 = r.precision_at_1
            net.train(was_training)
            self.log.write({"step": step, "epoch": epoch, "eval_precision_at_1": p1, "eval_map_at_r": r.map_at_r})
            # tqdm.write: the line goes above the progress bar, not through it
            tqdm.write(f"step {step} (epoch {epoch}): online precision@1 {p1:.4f}, MAP@R {r.map_at_r:.4f}")
        self.last_step = step
        self.acc.wait_for_everyone()
        return p1

    def at_start(self, model: torch.nn.Module, step: int) -> None:
        if step == 0:
            self.measure(model, 0, 0)

    def at_epoch_end(self, model: torch.nn.Module, step: int, epoch: int) -> None:
        if epoch % self.every == 0:
            self.measure(model, step, epoch)

    def at_end(self, model: torch.nn.Module, step: int, epoch: int) -> None:
        if self.last_step != step:
            self.measure(model, step, epoch)
