"""Write a file so that it is never read half-written: to a temp name beside it, then rename.

The temp name ends in `.partial`; the packer deletes such leftovers of a killed run before it resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

SUFFIX = ".partial"


def write_atomic(path: Path, data: bytes | list[bytes]) -> None:
    """`data` may be a list of pieces, written in order without joining them first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + SUFFIX)
    with open(tmp, "wb") as f:
        if isinstance(data, list):
            f.writelines(data)
        else:
            f.write(data)
    os.replace(tmp, path)
