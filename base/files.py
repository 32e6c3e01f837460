"""Files that are never read half-written, their hashes, and folders proven writable before work starts."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from base.errors import UsageError

PARTIAL = ".partial"
"""The suffix of a file being written; a killed writer's leftovers carry it, and nothing reads them."""
NEARLY_FULL = 1 << 20
"""Free bytes under which a disk that just failed a write is taken to be full."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """The temp name `path.partial` to write in the `with` block, renamed to `path` when the block ends: a reader
    sees the old file or the whole new one. A block that fails (a full disk, Ctrl-C) removes the temp file, and
    its OSError names `path` (write() errors name no file). For writers that need a file name (tarfile, say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + PARTIAL)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)
        raise


def write_atomic(path: Path, data: bytes | str | list[bytes]) -> None:
    """`data` written through `atomic_path`: text as UTF-8, a list as pieces in order without joining them first."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if isinstance(data, list):
            f.writelines(data)
        else:
            f.write(data.encode() if isinstance(data, str) else data)


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


def disk_error(error: Exception, path: Path) -> OSError | None:
    """The filesystem's refusal behind a failed write under `path`, as an OSError naming `path` (for `refusal`); None
    when the filesystem is not to blame. Writers in other languages carry no errno: safetensors puts Rust's
    `os error N` in its message, torch.save says "unexpected pos" on a full disk; so a failure on a disk left with
    almost no room is taken to be ENOSPC. Call it before removing what the failed write left."""
    code = error.errno if isinstance(error, OSError) else None
    found = re.search(r"os error (\d+)", str(error))
    if code is None and found:
        code = int(found.group(1))
    if code is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path).free < NEARLY_FULL:
                code = errno.ENOSPC
    return None if code is None else OSError(code, os.strerror(code), str(path))


def write_png(picture, path: Path, dpi: int = 100) -> None:
    """A matplotlib figure or a PIL image as a PNG, rendered in memory and written atomically (`savefig(path)`
    and `Image.save(path)` write in place, so a full disk would leave half a picture)."""
    buf = io.BytesIO()
    if hasattr(picture, "savefig"):
        picture.savefig(buf, format="png", dpi=dpi)
    else:
        picture.save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


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
