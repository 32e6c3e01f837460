"""Write a file so that it is never read half-written: to a temp name beside it, then rename.

The temp name ends in `.partial`; a failed write (a full disk) removes its own, and the packer deletes
the leftovers of a killed run before it resumes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

SUFFIX = ".partial"


def write_atomic(path: Path, data: bytes | list[bytes]) -> None:
    """`data` may be a list of pieces, written in order without joining them first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + SUFFIX)
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, list):
                f.writelines(data)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
