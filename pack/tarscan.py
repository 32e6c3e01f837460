"""One sequential pass over a downloaded tar, where a cut-off download is one clear error, not a silent end.

`tarfile` ends its member iteration quietly at a truncated or garbled header, and only raises
"unexpected end of data" when a member's own bytes are cut; an interrupted download of `imdb_crop.tar`
(7 GB) would then look like a complete one with files missing. Here the pass ends only at the tar's
end-of-archive block, and every other ending raises `IncompleteTar` naming the byte and the member.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from base.errors import UsageError


class IncompleteTar(UsageError):
    """The tar stops before its end-of-archive marker; the message names where, in one line."""


@dataclass
class TarMember:
    name: str
    size: int
    read: Callable[..., bytes]
    """`read()` for all of the member's bytes, `read(n)` for its first n; IncompleteTar if they are cut off."""
    kind: str = "file"
    """file, dir, symbolic link, hard link or special file."""


def _kind(info: tarfile.TarInfo) -> str:
    if info.isdir():
        return "dir"
    if info.issym():
        return "symbolic link"
    return "hard link" if info.islnk() else "special file"


def _no_data(n: int = -1) -> bytes:
    return b""


def _where(size: int) -> str:
    return f"byte {size:,} ({size / 1e9:.2f} GB)"


def _cut_inside(path: Path, size: int, info: tarfile.TarInfo) -> IncompleteTar:
    return IncompleteTar(f"{path} ends at {_where(size)}, inside member {info.name} (which runs to byte "
                         f"{info.offset_data + info.size:,}): the download is incomplete; download it again")


def _reader(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path) -> Callable[..., bytes]:
    def read(n: int = -1) -> bytes:
        try:
            return tar.extractfile(info).read(n)
        except (tarfile.ReadError, EOFError):
            raise _cut_inside(path, path.stat().st_size, info) from None

    return read


def members(path: Path, every: bool = False) -> Iterator[TarMember]:
    """The regular files of the tar at `path` (with `every`, its other members too), in order; a member's data is
    read only when asked for."""
    last = None
    with tarfile.open(path, "r:") as tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.ReadError, EOFError):  # seeking past a cut-off member; named below
                break
            if info is None:
                break
            last = info
            if info.isfile():
                yield TarMember(info.name, info.size, _reader(tar, info, path))
            elif every:
                yield TarMember(info.name, 0, _no_data, _kind(info))
        end = tar.offset
    size = path.stat().st_size
    if last is not None and last.offset_data + last.size > size:
        raise _cut_inside(path, size, last)
    with open(path, "rb") as f:
        f.seek(end)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not any(block):
        return
    after = f"after member {last.name}" if last is not None else "before its first member"
    if len(block) < tarfile.BLOCKSIZE:
        raise IncompleteTar(f"{path} ends at {_where(size)}, {after} and before the end-of-archive marker: the "
                            "download is incomplete; download it again")
    raise IncompleteTar(f"{path} holds no valid tar header at {_where(end)}, {after}: the file is damaged; "
                        "download it again")
