"""Stops that every rank agrees on: SIGTERM or SIGUSR1 (preemption) or SIGINT (Ctrl-C) on any rank stops all of
them at the same step, which they checkpoint before exiting.

A signal only sets this rank's flag: the exit code it asks for, 75 to be requeued or 130 for a user's Ctrl-C (the
larger wins, so a job a user stopped is not requeued). A second SIGINT raises KeyboardInterrupt at once: the way
out for a user who will not wait for the checkpoint.

Every step, each rank starts an all-reduce (MAX) of its flag on a CPU (gloo) group and reads the one it started
the step before: all ranks read the same value at the same step, and no rank ever waits on the GPU for it (the
flags are host values). Acting on the local flag alone would send the signalled rank into the checkpoint's
barriers while the others enter the loss's all-gather: a hang.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from base.errors import EXIT_INTERRUPTED
from base.files import write_atomic

EXIT_REQUEUE = 75
"""EX_TEMPFAIL: the job was preempted after saving a checkpoint; requeue it."""
REQUEUE_MARKER = "requeue.json"
"""Written by rank 0 beside the checkpoints before it exits with EXIT_REQUEUE: a launcher that cannot pass the
exit code through (torch elastic, `accelerate launch --multi_gpu`) can still tell a preemption from a failure."""
EXIT_CODES = {signal.SIGTERM: EXIT_REQUEUE, signal.SIGUSR1: EXIT_REQUEUE, signal.SIGINT: EXIT_INTERRUPTED}


class Preemption:
    def __init__(self, world: int) -> None:
        self.requested = 0
        self._before = {sig: signal.signal(sig, self._handle) for sig in EXIT_CODES}
        self.group = None
        if world > 1:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = max(self.requested, EXIT_CODES[signum])
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self) -> int:
        """Call once per step on every rank: 0 to go on; once any rank was signalled, the same exit code on all
        ranks at the same step (EXIT_REQUEUE, or EXIT_INTERRUPTED if any rank got Ctrl-C)."""
        if self.group is None:
            return self.requested
        decided = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            decided = int(flag.item())
        flag = torch.tensor([self.requested], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        if decided:
            self.settle()
        return decided

    def all_true(self, value: bool) -> bool:
        """True on every rank only if `value` is True on every rank (a blocking, host-side all-reduce)."""
        if self.group is None:
            return value
        flag = torch.tensor([int(value)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def restore(self) -> None:
        """The signal handlers as they were before (a process may train again, or be a test runner)."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def settle(self) -> None:
        """Finish the all-reduce in flight, so every rank leaves with the same collectives completed."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def mark_requeue(run: Path, step: int) -> None:
    """RUN/requeue.json (temp name, then rename), for launchers that lose the exit code."""
    write_atomic(run / REQUEUE_MARKER, json.dumps({"step": step, "exit_code": EXIT_REQUEUE}).encode())


def clear_requeue(run: Path) -> None:
    (run / REQUEUE_MARKER).unlink(missing_ok=True)
