"""One writer per folder: a lock file names the process (host, pid and its start time, SLURM job) that writes into it.

A second writer stops at once, naming the holder, instead of interleaving its files with the first one's (a job
submitted twice, a manual run beside a requeued one). A lock whose holder is gone is taken over with a warning: the
same host and that process no longer exists (a pid reused since is told apart by its start time), or the same SLURM
job (a requeued job restarts, perhaps on another node, after its earlier run ended). The record is written whole to
a temp file and linked into place, so no one ever reads half of it and exactly one of two racing writers wins.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from base.errors import UsageError


class Locked(UsageError):
    """Another live process holds the folder; the message names it and says what to do."""


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), which tells a reused pid from the holder."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(holder: dict) -> bool:
    """Whether the process a lock record names still runs on this host."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    ticks = start_ticks(pid)
    return ticks is None or holder.get("start_ticks") in (None, ticks)


def me() -> dict:
    """This process's lock record."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def stale(holder: dict, mine: dict) -> bool:
    """Whether `holder`'s lock may be taken over by the process recorded as `mine`."""
    if not holder:
        return True  # unreadable: no process can be named, and every writer links whole records
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == mine["slurm_job_id"]:
        return holder.get("host") != mine["host"] or not alive(holder)  # requeued: the earlier run has ended
    return holder.get("host") == mine["host"] and not alive(holder)


class FolderLock:
    """The lock file `path`, taken by `acquire` and removed by `release` (also as a context manager).

    `kind` names the holders in messages ("another training is using ..."), `verb` what they do to the folder
    ("trains into"); `error` is the UsageError subclass raised; `warn` reports a takeover (default: a UserWarning).
    """

    def __init__(self, path: Path, kind: str, verb: str, error: type[Locked] = Locked,
                 warn: Callable[[str], None] | None = None) -> None:
        self.path = Path(path)
        self.kind, self.verb, self.error = kind, verb, error
        self.warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise `error` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = me()
        for _ in range(2):
            if self._create(mine):
                self.held = True
                return
            holder = self._read()
            if holder is not None and not stale(holder, mine):
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
                       + (f" (SLURM job {holder['slurm_job_id']})" if holder.get("slurm_job_id") else ""))
                raise self.error(f"{self.path.parent} is in use by another {self.kind}, {who} (wait for it to end, "
                                 f"choose another --out, or delete {self.path} if that run is gone)")
            if holder is not None:
                self.warn(f"taking over {self.path} from pid {holder.get('pid')} on {holder.get('host')}, "
                          "which is no longer running")
            self.path.unlink(missing_ok=True)
        raise self.error(f"could not take {self.path}: another process keeps taking it (check who {self.verb} "
                         f"{self.path.parent})")

    def _create(self, mine: dict) -> bool:
        """Write the record to a temp file and link it into place: the lock file is never seen half-written."""
        tmp = self.path.with_name(f"{self.path.name}.{mine['pid']}.partial")
        try:
            tmp.write_text(json.dumps(mine))
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

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
