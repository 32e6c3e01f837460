"""One writer per run folder: RUN/lock.json names the process that trains into it.

A second training on the same folder stops at once, naming the holder, instead of interleaving its metrics
and overwriting its checkpoints (a job submitted twice, a manual run beside a requeued one). A lock whose
holder is gone is taken over with a warning: same host and that process no longer exists, or the same
SLURM job (a requeued job restarts, perhaps on another node, after its earlier run ended). Only the main
process holds the lock; the other ranks of the job train under it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from base.errors import UsageError

LOCK = "lock.json"


class RunLocked(UsageError):
    """Another live run holds the folder; the message names it and says what to do."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), which tells a reused pid from the holder."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    ticks = _start_ticks(pid)
    return ticks is None or holder.get("start_ticks") in (None, ticks)


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


class RunLock:
    def __init__(self, run: Path) -> None:
        self.path = Path(run) / LOCK
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise RunLocked naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _me()
        for _ in range(2):
            if self._create(me):
                self.held = True
                return
            holder = self._read()
            if holder is not None and not self._stale(holder, me):
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                       + (f" (SLURM job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else ""))
                raise RunLocked(f"{self.path.parent} is in use by another training, {who} (wait for it to end, "
                                f"choose another --out, or delete {self.path} if that run is gone)")
            if holder is not None:
                warnings.warn(f"taking over {self.path} from pid {holder.get('pid')} on {holder.get('host')}, "
                              "which is no longer running", stacklevel=2)
            self.path.unlink(missing_ok=True)
        raise RunLocked(f"could not take {self.path}: another process keeps taking it (check who trains into "
                        f"{self.path.parent})")

    def _create(self, me: dict) -> bool:
        """Write the record to a temp file and link it into place: the lock file is never seen half-written."""
        tmp = self.path.with_name(f"{LOCK}.{me['pid']}.partial")
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _stale(holder: dict, me: dict) -> bool:
        if not holder:
            return True  # unreadable: no process can be named, and every writer links whole records
        if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return holder.get("host") != me["host"] or not _alive(holder)  # requeued: the earlier run has ended
        return holder.get("host") == me["host"] and not _alive(holder)

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False
