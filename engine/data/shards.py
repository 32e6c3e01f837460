"""The packer's output as the engine sees it: manifest, shard paths, and random access via the indexes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ShardError(Exception):
    """A shard or its index is missing or damaged; the message names it."""


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
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise ShardError(f"{manifest_path} not found: is {root} the --out of `python -m pack`?")
        manifest = json.loads(manifest_path.read_text())
        if name not in manifest["splits"]:
            raise ShardError(f"{root} has no split '{name}' (has: {', '.join(manifest['splits'])})")
        info = manifest["splits"][name]
        tars, indexes = [], []
        for shard in info["shards"]:
            tar = root / shard["name"]
            idx = tar.with_suffix(".idx")
            if not tar.is_file():
                raise ShardError(f"shard {tar} is missing")
            if tar.stat().st_size != shard["bytes"]:
                raise ShardError(f"shard {tar} has {tar.stat().st_size} bytes, the manifest says {shard['bytes']}: "
                                 "truncated or replaced")
            if not idx.is_file():
                raise ShardError(f"index {idx} is missing")
            tars.append(str(tar))
            indexes.append(str(idx))
        if not tars:
            raise ShardError(f"split '{name}' of {root} has no shards")
        return cls(root, name, tars, indexes, info["samples"], manifest.get("image_size", 224),
                   manifest.get("num_classes", 0))

    def entries(self) -> list[Entry]:
        """Every sample's members (extension -> offset and size), in shard order."""
        out = []
        for tar, idx in zip(self.tars, self.indexes, strict=True):
            lines = Path(idx).read_text().splitlines()
            if not lines or not lines[0].startswith("v1.2 "):
                raise ShardError(f"index {idx} is not a DALI v1.2 index")
            for line in lines[1:]:
                f = line.split()
                members = {f[i]: Member(tar, int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
                key = f[3].rsplit(".", 1)[0]
                out.append(Entry(key, members))
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
