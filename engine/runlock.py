"""One writer per run folder: RUN/lock.json names the process that trains into it.

A second training on the same folder stops at once, naming the holder, instead of interleaving its metrics
and overwriting its checkpoints (a job submitted twice, a manual run beside a requeued one). A lock whose
holder is gone is taken over with a warning (base/lock.py says when). Only the main process holds the lock;
the other ranks of the job train under it.
"""

from __future__ import annotations

from pathlib import Path

from base.lock import FolderLock, Locked

LOCK = "lock.json"


class RunLocked(Locked):
    """Another live run holds the folder; the message names it and says what to do."""


class RunLock(FolderLock):
    def __init__(self, run: Path) -> None:
        super().__init__(Path(run) / LOCK, kind="training", verb="trains into", error=RunLocked)
