"""Bytes of the listed files, per identity: from an extracted folder, or from the tar in one pass.

Both yield the same jobs (identity, its candidate rows, their bytes or a folder to read them from),
so the rest of the packer cannot tell the two apart and writes identical shards.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pack.listing import Row, tar_path
from pack.tarscan import members


@dataclass
class Job:
    identity: str
    rows: list[Row]
    folder: str | None = None
    """Read the files from here (the folder source)..."""
    data: dict[str, bytes] | None = None
    """...or take them from here (the tar source; a path absent here is missing)."""

    def read(self, path: str) -> bytes | None:
        if self.data is not None:
            return self.data.get(path)
        try:
            return (Path(self.folder) / path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None


def folder_jobs(src: Path, groups: dict[str, list[Row]]) -> Iterator[Job]:
    for nm, rows in groups.items():
        yield Job(nm, rows, folder=str(src))


def tar_jobs(src: Path, groups: dict[str, list[Row]], window: threading.Semaphore | None = None,
             strip: int = 1) -> Iterator[Job]:
    """One sequential pass over the tar; a job is released as soon as all of its identity's files were seen.
    A member's listed path is its name less `strip` leading folders (`imdb_crop/02/x.jpg` -> `02/x.jpg`).

    Only the members of pending identities are read; others are skipped over. `window` bounds how many
    identities' bytes are held at once (released by the consumer as results come back). The real tar
    keeps an identity's files together, so little is held; a tar in another order holds more. A cut-off
    tar raises IncompleteTar before any identity with files still unseen is released as if they were missing.
    """
    owner = {row.path: nm for nm, rows in groups.items() for row in rows}
    pending = {nm: {row.path for row in rows} for nm, rows in groups.items()}
    collected: dict[str, dict[str, bytes]] = {nm: {} for nm in groups}
    for member in members(src):
        path = tar_path(member.name, strip)
        nm = owner.get(path)
        if nm is None or path not in pending.get(nm, ()):
            continue
        collected[nm][path] = member.read()
        pending[nm].discard(path)
        if not pending[nm]:
            del pending[nm]
            if window:
                window.acquire()
            yield Job(nm, groups[nm], data=collected.pop(nm))
    for nm in list(pending):  # identities with missing files: release them with what was found
        if window:
            window.acquire()
        yield Job(nm, groups[nm], data=collected.pop(nm))
