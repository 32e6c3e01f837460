"""WebDataset shards written byte for byte by us, with the DALI index known while writing.

We write the tar ourselves (with `tarfile`'s headers) rather than through `webdataset.ShardWriter`
because the index needs each member's data offset, and because the bytes must not depend on the
clock or the user: fixed mtime, uid, gid and names make two runs byte-identical.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pack.atomic import write_atomic

MTIME = 0
INDEX_VERSION = "v1.2"


@dataclass
class Sample:
    key: str
    members: list[tuple[str, bytes]]
    """(extension, bytes) in the order they are written."""


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")


def shard_bytes(samples: list[Sample]) -> tuple[bytes, str]:
    """The tar's bytes and its DALI index text, identical to what `wds2idx` makes from that tar.

    The layout is tarfile's own (`TarInfo.tobuf` headers, data padded to 512-byte blocks, two zero
    blocks, padding to a 10 KiB record), assembled here so each member's offset is known as it is written.
    """
    parts: list[bytes] = []
    pos = 0
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        groups = []
        for ext, data in sample.members:
            name = f"{sample.key}.{ext}"
            header = _header(name, len(data))
            pad = -len(data) % tarfile.BLOCKSIZE
            groups.append(f"{ext} {pos + len(header)} {len(data)} {name}")
            parts += [header, data, tarfile.NUL * pad]
            pos += len(header) + len(data) + pad
        lines.append(" ".join(groups))
    end = pos + 2 * tarfile.BLOCKSIZE
    parts.append(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
    return b"".join(parts), "\n".join(lines) + "\n"


def write_shard(path: Path, samples: list[Sample]) -> dict:
    """Write `path` and its `.idx` (temp name, then rename), unless identical bytes are already there."""
    data, index = shard_bytes(samples)
    digest = hashlib.sha256(data).hexdigest()
    idx_path = path.with_suffix(".idx")
    same = (path.is_file() and path.stat().st_size == len(data)
            and hashlib.sha256(path.read_bytes()).hexdigest() == digest
            and idx_path.is_file() and idx_path.read_text() == index)
    if not same:
        write_atomic(idx_path, index.encode())
        write_atomic(path, data)
    return {"name": path.name, "samples": len(samples), "bytes": len(data), "sha256": digest, "reused": same}
