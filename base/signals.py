"""Worker processes that leave the stop signals to their parent.

SLURM, systemd, `docker stop`, Kubernetes and a terminal's Ctrl-C signal the whole process group. The main process
handles SIGTERM and SIGUSR1 (preemption) and SIGINT (a user's stop) by stopping at a step with a checkpoint; a
worker that died of the same signal first would fail that step instead (PyTorch's DataLoader workers die of a
SIGTERM that their parent did not send, and raise KeyboardInterrupt on SIGINT).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(*_: object) -> None:
    """Run first in a worker (a DataLoader's `worker_init_fn`), best started with the stop signals blocked
    (`stop_signals_held`). SIGINT and SIGUSR1 are ignored. SIGTERM stays blocked and a thread takes it: one from the
    parent ends the worker, as PyTorch's own handler does (the DataLoader and multiprocessing's exit stop a worker
    that way, and would otherwise wait for it forever); one from anyone else is left to the parent."""
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR1})
    threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _exit_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Around starting workers: a forked worker begins with the stop signals blocked, so none reaches it before it
    deals with them. One sent to this process meanwhile waits, and is handled on leaving."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
