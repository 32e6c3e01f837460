"""Files that are never read half-written, their hashes, and folders proven writable before work starts."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from base.errors import UsageError

PARTIAL = ".partial"
"""The suffix of a file being written; a killed writer's leftovers carry it, and nothing reads them."""


def write_atomic(path: Path, data: bytes | str | list[bytes]) -> None:
    """Write to `path.partial` beside it, then rename: a reader sees the old file or the whole new one. A failed
    write (a full disk) removes its own temp file and names `path` in its OSError (write() errors name no file).
    `data` may be text (UTF-8) or a list of pieces written in order without joining them first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL)
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, list):
                f.writelines(data)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line whole: a write that fails (a full disk) is cut back to where the file ended, so a reader
    never meets half a line, and its OSError names `path`."""
    data = memoryview((line.rstrip("\n") + "\n").encode())
    with open(path, "ab", buffering=0) as f:
        end = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data):]
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(end)
            if e.filename is None:
                e.filename = str(path)
            raise


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def ensure_writable(out: Path, flag: str = "--out") -> None:
    """Create `out` if needed and prove it takes a file, before any work is done; a UsageError otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"cannot write to {flag} {out}: {e.strerror or e}") from None
