"""The contract between what `python -m pack` writes and what the engine reads; docs/data-format.md explains it.

One place for the manifest (read and written through `Manifest`, its `version` checked on read), the
DALI index (`v1.2` header, one line per sample), the label encoding, the sample-key rule and the error
a reader raises when any of it is missing or damaged. The packer writes through it, the engine and the
verifier read through it; nothing else spells these formats out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from base.errors import UsageError
from base.files import write_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2
"""2: sample keys safe for every reader (see `sample_key`) and each shard's index sha256 recorded.
1: the first packer; still read (its shards are the same layout), never resumed into."""
READABLE_VERSIONS = (1, 2)

INDEX_HEADER = "v1.2"
"""DALI's webdataset index format, as `wds2idx` writes it: `v1.2 <samples>`, then one line per sample."""

SAMPLE_MEMBERS = ("cls", "jpg", "json")
"""Every sample's members, in the order they are written."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9_-]")


class ShardError(UsageError):
    """A packed dataset (manifest, shard or index) is missing, damaged or of an unknown format; the message
    names the file and says what to do, in one line."""


# -- sample keys --------------------------------------------------------------------------------------

def sample_key(path: str) -> str:
    """`02/nm0000002_rm1_1924-9-16_1991.jpg` -> `02_nm0000002_rm1_1924-9-16_1991`.

    The extension goes, and every character but ASCII letters, digits, `_` and `-` becomes `_`: webdataset
    and DALI cut a member's name at its first dot, the index splits its lines at whitespace, and non-ASCII
    names depend on the reader's encoding. The original path stays in the sample's json.
    """
    name = path.rsplit("/", 1)[-1]
    stem = path[: len(path) - len(name)] + (name.rsplit(".", 1)[0] if "." in name else name)
    return _UNSAFE_IN_KEY.sub("_", stem) or "_"


def sample_keys(paths: Iterable[str]) -> dict[str, str]:
    """Each path's key, unique: where two paths give the same `sample_key`, the later one (in sorted order)
    gets `_` and the first 12 hex digits of its path's sha256 appended. Depends only on the set of paths."""
    keys: dict[str, str] = {}
    taken: set[str] = set()
    for path in sorted(set(paths)):
        key = sample_key(path)
        if key in taken:
            base = f"{key}_{hashlib.sha256(path.encode()).hexdigest()[:12]}"
            key, n = base, 1
            while key in taken:
                n += 1
                key = f"{base}_{n}"
        taken.add(key)
        keys[path] = key
    return keys


def member_name(key: str, ext: str) -> str:
    return f"{key}.{ext}"


def split_member_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member's name, cut at the first dot of its last component (webdataset's rule)."""
    head, _, last = name.rpartition("/")
    stem, dot, ext = last.partition(".")
    return (f"{head}/{stem}" if head else stem), ext if dot else ""


# -- labels -------------------------------------------------------------------------------------------

def encode_label(cls: int) -> bytes:
    """The class index as ASCII decimal: what webdataset's default decoder turns into an int."""
    return str(int(cls)).encode("ascii")


def decode_label(data: bytes) -> int:
    text = bytes(data).decode("ascii", errors="replace").strip()
    if not text.isdigit():
        raise ShardError(f"label {text[:20]!r} is not a class number")
    return int(text)


# -- the DALI index -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class IndexedMember:
    ext: str
    offset: int
    """Byte offset of the member's data (not its header) in the tar."""
    size: int


def index_header(samples: int) -> str:
    return f"{INDEX_HEADER} {samples}"


def index_line(members: Iterable[tuple[str, int, int, str]]) -> str:
    """One sample's line: `ext offset size name` for each member (ext, data offset, size, member name)."""
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def parse_index(text: str, where: str) -> list[tuple[str, list[IndexedMember]]]:
    """Every sample's (key, members) in tar order; a ShardError naming `where` and the line if malformed."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_HEADER or not head[1].isdigit():
        raise ShardError(f"index {where} does not start with '{INDEX_HEADER} <samples>' (re-pack, or restore it)")
    if int(head[1]) != len(lines) - 1:
        raise ShardError(f"index {where} declares {head[1]} samples but lists {len(lines) - 1} (damaged index)")
    out = []
    for n, line in enumerate(lines[1:], start=2):
        f = line.split()
        if not f or len(f) % 4 or not all(f[i + 1].isdigit() and f[i + 2].isdigit() for i in range(0, len(f), 4)):
            raise ShardError(f"index {where} line {n} is not 'ext offset size name' groups (damaged index)")
        key = split_member_name(f[3])[0]
        members = [IndexedMember(f[i], int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)]
        if any(split_member_name(f[i + 3]) != (key, f[i]) for i in range(0, len(f), 4)):
            raise ShardError(f"index {where} line {n}: member names disagree with key '{key}' (damaged index)")
        out.append((key, members))
    return out


# -- the manifest -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name of the tar, beside the manifest; its index is the same name with `.idx`."""
    samples: int
    bytes: int
    sha256: str
    index_sha256: str | None = None
    """None in version 1 manifests, which did not record it."""

    @property
    def index_name(self) -> str:
        return self.name.removesuffix(".tar") + ".idx"


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    identities: int
    shards: list[ShardInfo]


@dataclass
class Manifest:
    """`manifest.json`: what the shards hold, how they were made, and each shard's size and sha256."""

    image_size: int
    """Side of the stored square images in pixels. Required: a reader must never guess it."""
    num_classes: int
    splits: dict[str, SplitInfo]
    params: dict = field(default_factory=dict)
    """The packer's parameters (pack.selection.Params); a resumed run must match them."""
    shard_samples: int = 0
    funnel: list[dict] = field(default_factory=list)
    """Images left after each selection step, in order (see pack.selection.REASONS)."""
    flags: dict[str, int] = field(default_factory=dict)
    """Outlier flags counted over the kept images."""
    layout: str = "imdb"
    """How the source was laid out (pack/listing.py): imdb, folders or csv. Absent before layouts: imdb."""
    identities: list[str] = field(default_factory=list)
    """Each class's identity, by cls: the nm id (imdb), the folder's name (folders), the list's identity (csv).
    Empty in manifests written before layouts (identities.csv has them)."""
    version: int = MANIFEST_VERSION

    @staticmethod
    def path(root: Path | str) -> Path:
        return Path(root) / MANIFEST_NAME

    @classmethod
    def read(cls, root: Path | str) -> Manifest:
        """The manifest of the packed dataset in `root`; ShardError (one line) if absent, damaged or unknown."""
        path = cls.path(root)
        if not path.is_file():
            raise ShardError(f"{path} not found: is {root} the --out of `python -m pack`?")
        try:
            return cls.from_json(path.read_bytes(), str(path))
        except OSError as e:
            raise ShardError(f"{path} cannot be read: {e.strerror or e}") from None

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            d = json.loads(data)
        except ValueError:
            raise ShardError(f"{where} is not valid JSON (damaged; re-pack or restore it)") from None
        if not isinstance(d, dict):
            raise ShardError(f"{where} is not a JSON object (damaged; re-pack or restore it)")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ShardError(f"{where} has no format version (not written by `python -m pack`?)")
        if version > MANIFEST_VERSION:
            raise ShardError(f"{where} has format version {version}, newer than this faceclr reads "
                             f"(up to {MANIFEST_VERSION}); update faceclr")
        if version not in READABLE_VERSIONS:
            raise ShardError(f"{where} has unknown format version {version} (this faceclr reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}); re-pack with `python -m pack`")
        try:
            return cls._from_dict(d, version, where)
        except (KeyError, TypeError, ValueError) as e:
            what = f"lacks '{e.args[0]}'" if isinstance(e, KeyError) else str(e)
            raise ShardError(f"{where} {what} (damaged or not written by `python -m pack`; re-pack)") from None

    @classmethod
    def _from_dict(cls, d: dict, version: int, where: str) -> Manifest:
        splits = {}
        for split, info in _typed(d["splits"], dict, "splits").items():
            shards = []
            for s in _typed(info["shards"], list, f"splits.{split}.shards"):
                name = _typed(s["name"], str, "a shard name")
                if "/" in name or "\\" in name or not name.endswith(".tar") or name.startswith("."):
                    raise ValueError(f"names shard '{name}', not a .tar file beside it")
                for key in ("sha256", "index_sha256"):
                    if (s.get(key) is not None or key == "sha256") and not _SHA256.fullmatch(str(s.get(key))):
                        raise ValueError(f"has no valid {key} for shard {name}")
                shards.append(ShardInfo(name, _count(s["samples"], "samples"), _count(s["bytes"], "bytes"),
                                        s["sha256"], s.get("index_sha256")))
            splits[split] = SplitInfo(_count(info["samples"], "samples"), _count(info.get("identities", 0),
                                                                                 "identities"), shards)
        size = d["image_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"has image_size {size!r}, not a positive integer")
        num_classes = _count(d.get("num_classes", 0), "num_classes")
        layout = _typed(d.get("layout", "imdb"), str, "layout")
        identities = _typed(d.get("identities", []), list, "identities")
        if identities and (len(identities) != num_classes or not all(isinstance(i, str) for i in identities)):
            raise ValueError(f"has identities that are not {num_classes} names, one per class")
        return cls(image_size=size, num_classes=num_classes, splits=splits, params=d.get("params", {}),
                   shard_samples=d.get("shard_samples", 0), funnel=d.get("funnel", []), flags=d.get("flags", {}),
                   layout=layout, identities=identities, version=version)

    def to_json(self) -> bytes:
        d = {
            "version": self.version,
            "params": self.params,
            "shard_samples": self.shard_samples,
            "image_size": self.image_size,
            "funnel": self.funnel,
            "flags": self.flags,
            "splits": {name: {"samples": s.samples, "identities": s.identities,
                              "shards": [{"name": sh.name, "samples": sh.samples, "bytes": sh.bytes,
                                          "sha256": sh.sha256, "index_sha256": sh.index_sha256}
                                         for sh in s.shards]}
                       for name, s in self.splits.items()},
            "num_classes": self.num_classes,
            "layout": self.layout,
            "identities": self.identities,
        }
        return json.dumps(d, indent=1).encode()

    def write(self, root: Path | str) -> None:
        """Written atomically: a reader sees the old manifest or the new one, never half of one."""
        write_atomic(self.path(root), self.to_json())

    def split(self, name: str, root: Path | str = "") -> SplitInfo:
        if name not in self.splits:
            raise ShardError(f"{root or 'the dataset'} has no split '{name}' (has: {', '.join(self.splits)})")
        return self.splits[name]


def _typed(value: object, kind: type, what: str):
    if not isinstance(value, kind):
        raise ValueError(f"has {what} of type {type(value).__name__}, not {kind.__name__}")
    return value


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"has {what} {value!r}, not a count")
    return value
