"""The packer's output as the engine sees it: shard paths, and random access to samples via the indexes.

The format itself (manifest, index lines, labels, keys, `ShardError`) is pack.format's; this module opens one
split of it for the loaders, and holds the rules every loader follows: which samples a rank reads
(`rank_range`, `shards_in`) and the size a stored image must have (`check_size`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from pack.format import Manifest, ShardError, parse_index

__all__ = ["Entry", "Member", "ShardError", "Split", "check_size", "rank_range", "read_member", "shards_in"]


@dataclass(frozen=True)
class Member:
    shard: str
    offset: int
    size: int


@dataclass(frozen=True)
class Entry:
    key: str
    members: dict[str, Member]


@dataclass
class Split:
    """One split of a packed dataset: its shards, their indexes and its sample count."""

    root: Path
    name: str
    tars: list[str]
    indexes: list[str]
    samples: int
    image_size: int
    num_classes: int

    @classmethod
    def open(cls, root: Path | str, name: str = "train") -> Split:
        """Checks that every shard and index exists and that each shard has the manifest's size (cheap; the
        sha256 check is pack.verify's)."""
        root = Path(root)
        manifest = Manifest.read(root)
        info = manifest.split(name, root)
        tars, indexes = [], []
        for shard in info.shards:
            tar, idx = root / shard.name, root / shard.index_name
            if not tar.is_file():
                raise ShardError(f"shard {tar} is missing")
            if tar.stat().st_size != shard.bytes:
                raise ShardError(f"shard {tar} has {tar.stat().st_size} bytes, the manifest says {shard.bytes}: "
                                 "truncated or replaced")
            if not idx.is_file():
                raise ShardError(f"index {idx} is missing")
            tars.append(str(tar))
            indexes.append(str(idx))
        if not tars:
            raise ShardError(f"split '{name}' of {root} has no shards")
        return cls(root, name, tars, indexes, info.samples, manifest.image_size, manifest.num_classes)

    def entries(self) -> list[Entry]:
        """Every sample's members (extension -> offset and size), in shard order."""
        out = []
        for tar, idx in zip(self.tars, self.indexes, strict=True):
            for key, members in parse_index(Path(idx).read_text(), idx):
                out.append(Entry(key, {m.ext: Member(tar, m.offset, m.size) for m in members}))
        if len(out) != self.samples:
            raise ShardError(f"the indexes of split '{self.name}' list {len(out)} samples, the manifest {self.samples}")
        return out


def read_member(m: Member) -> bytes:
    with open(m.shard, "rb") as f:
        f.seek(m.offset)
        data = f.read(m.size)
    if len(data) != m.size:
        raise ShardError(f"shard {m.shard} ends before offset {m.offset + m.size}: truncated")
    return data


# -- which samples a rank reads ------------------------------------------------------------------

def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s share [lo, hi) of an epoch's `total` samples: the r-th of `world` contiguous ranges, cut as
    DALI's readers cut theirs (`shard_id` of `num_shards`), so both training loaders give a rank the same count."""
    return rank * total // world, (rank + 1) * total // world


def shards_in(tars: list[str], sizes: list[int], lo: int, hi: int) -> list[tuple[str, int, int]]:
    """(tar, position of its first sample, its sample count) of each shard, in the given order, that holds samples
    of [lo, hi) of the sequence the shards form in that order."""
    out, first = [], 0
    for tar, n in zip(tars, sizes, strict=True):
        if first < hi and first + n > lo:
            out.append((tar, first, n))
        first += n
    return out


# -- what a stored image must be ---------------------------------------------------------------------

def check_size(shard: str, key: str, width: int, height: int, size: int) -> None:
    """ShardError unless the image is `size` x `size`, the manifest's image size (the packer stores square
    centre crops of that side): a shard that disagrees with its manifest would train at another scale unnoticed."""
    if (width, height) != (size, size):
        raise ShardError(f"shard {shard}, sample {key}: the image is {width}x{height} px, the manifest says {size} px "
                         "(the shards are not the ones this manifest describes: pack again, or restore them)")


def find_wrong_size(split: Split, shards: list[str], size: int) -> tuple[str, str, int, int] | None:
    """The first sample of `shards` (in manifest order) whose stored image is not `size` x `size`, as (shard, key,
    width, height), read from the image headers only; None if all agree. For a loader that saw a wrong size
    without knowing which sample it was."""
    from PIL import Image  # only when a loader found a wrong size

    wanted = set(shards)
    for entry in split.entries():
        jpg = entry.members.get("jpg")
        if jpg is None or jpg.shard not in wanted:
            continue
        try:
            with Image.open(io.BytesIO(read_member(jpg))) as image:
                width, height = image.size
        except (OSError, ShardError):
            continue  # not this check's concern: the decode path names it
        if (width, height) != (size, size):
            return jpg.shard, entry.key, width, height
    return None
