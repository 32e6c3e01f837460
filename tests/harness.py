"""What the tests that start real processes share: a free TCP port, and polling a condition with a deadline
(never a fixed sleep that hopes the other process is done)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], T], timeout: float, what: str, every: float = 0.5) -> T:
    """Poll `check` every `every` s until it returns something truthy, and return that; AssertionError naming
    `what` after `timeout` s. The default pace suits checks that start a process (scontrol); a check that reads
    a file can poll faster."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
