"""Is a packed dataset still what its manifest says? Sizes and sha256 of every shard and index, and with
`--decode` every sample's jpg decoded and its cls and json parsed.

    python -m pack verify --data DIR [--decode] [--split S] [--workers N]

Exit 0 when all is well, 1 when anything is bad (each bad shard and key is named), 2 for bad input.
The engine calls `ensure_verified` before training or evaluating (its result cached in the run folder)
and `find_undecodable` to name the sample behind a decode failure.

Cost, measured with `python -m pack.bench verify --data <synthetic pack at 224 px> --out DIR --gb 3
--workers 2` on 3.13 GB of shards (226,138 samples, mean JPEG 11.0 KB) on the 2-core x86_64 machine while
it ran at a load of about 10 (other jobs), so the wall-clock figures are pessimistic and the CPU figures
are the work itself:

| check | workers | wall s/GB | CPU s/GB |
|---|---|---|---|
| size + sha256, page cache dropped (from disk) | 2 threads | 6.5 | 2.8 |
| size + sha256, warm page cache | 2 threads | 4.8 | 2.5 |
| `--decode`, every sample (PIL) | 1 process | 185 | 75 (1.05 ms a sample) |

Hashing is about 2.5-2.8 CPU seconds per GB, spread over the worker threads until the disk's read rate
bounds it; decoding costs per sample, not per byte (larger JPEGs cost fewer seconds per GB).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from base.cli import OneLineParser, positive
from base.errors import UsageError, entry_point
from base.files import file_sha256, write_atomic
from pack.format import (
    SAMPLE_MEMBERS,
    Manifest,
    ShardError,
    ShardInfo,
    decode_label,
    parse_index,
    split_member_name,
)

PROG = "python -m pack verify"
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Problem:
    """One thing wrong: the shard's path, the sample's key when one sample is to blame, and what, in words."""

    shard: str
    key: str | None
    what: str

    def __str__(self) -> str:
        return f"shard {self.shard}" + (f", sample {self.key}" if self.key else "") + f": {self.what}"


def check_shard(root: Path, shard: ShardInfo) -> list[Problem]:
    """Size and sha256 of the tar and its index against the manifest, and the index's sample count."""
    tar, idx = root / shard.name, root / shard.index_name
    name = str(tar)
    if not tar.is_file():
        return [Problem(name, None, "missing")]
    problems = []
    size = tar.stat().st_size
    if size != shard.bytes:
        problems.append(Problem(name, None, f"has {size} bytes, the manifest says {shard.bytes} (truncated or "
                                            "replaced; re-pack or restore it)"))
    elif file_sha256(tar) != shard.sha256:
        problems.append(Problem(name, None, "sha256 differs from the manifest's (its bytes changed: damaged or "
                                            "replaced; re-pack or restore it)"))
    if not idx.is_file():
        return [*problems, Problem(name, None, f"index {idx.name} is missing")]
    data = idx.read_bytes()
    if shard.index_sha256 is not None and hashlib.sha256(data).hexdigest() != shard.index_sha256:
        return [*problems, Problem(name, None, f"index {idx.name}: sha256 differs from the manifest's (damaged or "
                                               "replaced; re-pack or restore it)")]
    try:
        entries = parse_index(data.decode("utf-8", errors="replace"), str(idx))
    except ShardError as e:
        return [*problems, Problem(name, None, str(e))]
    if len(entries) != shard.samples:
        problems.append(Problem(name, None, f"index {idx.name} lists {len(entries)} samples, the manifest "
                                            f"{shard.samples}"))
    return problems


def decode_jpeg(data: bytes, size: int | None = None) -> str | None:
    """None when `data` decodes in full as an image (of `size` x `size` pixels, when given); else what went wrong.
    PIL warnings count as failures."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            im = Image.open(io.BytesIO(data))
            im.load()
    except UnidentifiedImageError:
        return "jpg does not decode (no image format recognised: its header is damaged)"
    except Exception as e:
        return f"jpg does not decode ({type(e).__name__}: {str(e)[:80]})"
    if size is not None and im.size != (size, size):
        return f"jpg is {im.width}x{im.height} pixels, the manifest's image_size says {size}x{size} (re-pack)"
    return None


def _check_sample(key: str, members: dict[str, bytes], num_classes: int, image_size: int | None) -> list[str]:
    bad = [f"lacks its {ext}" for ext in SAMPLE_MEMBERS if ext not in members]
    bad += [f"has an unexpected member .{ext}" for ext in members if ext not in SAMPLE_MEMBERS]
    if "jpg" in members and (why := decode_jpeg(members["jpg"], image_size)):
        bad.append(why)
    if "cls" in members:
        try:
            label = decode_label(members["cls"])
            if num_classes and label >= num_classes:
                bad.append(f"cls {label} is not below the manifest's num_classes {num_classes}")
        except ShardError as e:
            bad.append(f"cls: {e}")
    if "json" in members:
        try:
            if not isinstance(json.loads(members["json"]), dict):
                bad.append("json is not an object")
        except ValueError:
            bad.append("json does not parse")
    return bad


def decode_shard(root: Path, shard: ShardInfo, num_classes: int, image_size: int | None = None) -> list[Problem]:
    """Every sample of the tar, read with `tarfile` (independently of the index): jpg decoded in full (and of the
    manifest's image_size, when given), cls and json parsed, members complete; and the index's offsets checked
    against the tar's."""
    tar_path, idx = root / shard.name, root / shard.index_name
    name = str(tar_path)
    if not tar_path.is_file():
        return []
    indexed: dict[str, dict[str, tuple[int, int]]] = {}
    if idx.is_file():
        with contextlib.suppress(ShardError):  # check_shard names a damaged index
            indexed = {k: {m.ext: (m.offset, m.size) for m in ms}
                       for k, ms in parse_index(idx.read_text(errors="replace"), str(idx))}
    problems: list[Problem] = []
    seen: set[str] = set()

    def finish(key: str, members: dict[str, bytes], where: dict[str, tuple[int, int]]) -> None:
        if key in seen:
            problems.append(Problem(name, key, "key appears twice"))
        seen.add(key)
        problems.extend(Problem(name, key, what) for what in _check_sample(key, members, num_classes, image_size))
        if indexed and indexed.get(key) != where:
            problems.append(Problem(name, key, "the index disagrees with the tar about this sample's members"))

    key, members, where = None, {}, {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for info in tar:
                k, ext = split_member_name(info.name)
                if k != key:
                    if key is not None:
                        finish(key, members, where)
                    key, members, where = k, {}, {}
                members[ext] = tar.extractfile(info).read() if info.isfile() else b""
                where[ext] = (info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append(Problem(name, key, f"the tar cannot be read past this sample ({type(e).__name__}: {e})"))
        return problems
    if key is not None:
        finish(key, members, where)
    if len(seen) != shard.samples:
        problems.append(Problem(name, None, f"the tar holds {len(seen)} samples, the manifest {shard.samples}"))
    return problems


def _check_task(root: Path, shard: ShardInfo, decode: bool, num_classes: int, image_size: int) -> list[Problem]:
    problems = check_shard(root, shard)
    return problems + decode_shard(root, shard, num_classes, image_size) if decode else problems


def _shards(manifest: Manifest, root: Path, splits: Sequence[str] | None) -> list[ShardInfo]:
    return [s for split in (splits or list(manifest.splits)) for s in manifest.split(split, root).shards]


def verify_shards(root: Path, splits: Sequence[str] | None = None, workers: int = 4, decode: bool = False,
                  progress: bool = True) -> list[Problem]:
    """Every problem of the named splits' shards (all splits by default), in shard order.

    Hashing runs in `workers` threads (hashlib releases the GIL); decoding in `workers` processes (spawned,
    so a caller holding CUDA or threads is safe). ShardError if the manifest itself is absent or unreadable.
    """
    root = Path(root)
    manifest = Manifest.read(root)
    shards = _shards(manifest, root, splits)
    chosen = list(splits or manifest.splits)
    empty = []  # an output with nothing in it is not "all good"
    if sum(manifest.splits[split].samples for split in chosen) == 0:
        which = f"split{'s' if len(chosen) > 1 else ''} {' and '.join(chosen)}" if chosen else "the manifest"
        empty = [Problem(str(Manifest.path(root)), None, f"{which} hold{'s' if len(chosen) < 2 else ''} no samples "
                                                         "(nothing was packed: re-pack)")]
    bar = tqdm(total=sum(s.bytes for s in shards), unit="B", unit_scale=True, desc="verify", disable=not progress)
    pool: Executor = (ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if decode and workers > 1
                      else ThreadPoolExecutor(workers))
    found: dict[int, list[Problem]] = {}
    with pool:
        futures = {pool.submit(_check_task, root, s, decode, manifest.num_classes, manifest.image_size): i
                   for i, s in enumerate(shards)}
        for future in as_completed(futures):
            found[futures[future]] = future.result()
            bar.update(shards[futures[future]].bytes)
    bar.close()
    return empty + [p for i in range(len(shards)) for p in found[i]]


def _stats(root: Path, shards: list[ShardInfo]) -> dict[str, list[int] | None]:
    out: dict[str, list[int] | None] = {}
    for s in shards:
        try:
            tar, idx = (root / s.name).stat(), (root / s.index_name).stat()
            out[s.name] = [tar.st_size, tar.st_mtime_ns, idx.st_size, idx.st_mtime_ns]
        except OSError:
            out[s.name] = None
    return out


def summary_line(problems: list[Problem], root: Path) -> str:
    """One line naming the first bad shard and what is wrong with it, and how many others are bad."""
    others = len({p.shard for p in problems}) - 1
    more = (f"; {others} other shard{'s are' if others > 1 else ' is'} bad too" if others else "")
    return f"{problems[0]}{more} (`python -m pack verify --data {root}` lists every problem)"


def ensure_verified(root: Path, splits: Sequence[str], cache: Path | None, workers: int = 4,
                    progress: bool = True) -> bool:
    """Check the sizes and sha256 of `splits`' shards and indexes against the manifest; ShardError (one line)
    naming the first bad shard if any is wrong.

    With `cache` (a JSON file in the run folder) a previous success for the same manifest bytes and the same
    shard and index sizes and mtimes is reused without hashing again, so a requeued job does not pay twice.
    True when it hashed, False when the cache answered.
    """
    root = Path(root)
    path = Manifest.path(root)
    manifest = Manifest.read(root)
    digest = file_sha256(path)
    stats = _stats(root, _shards(manifest, root, splits))
    saved: dict = {}
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
        except (OSError, ValueError):
            saved = {}
        if not isinstance(saved, dict) or saved.get("manifest_sha256") != digest:
            saved = {}
        known = saved.get("shards", {})
        if saved and all(st is not None and known.get(name) == st for name, st in stats.items()):
            return False
    problems = verify_shards(root, splits, workers, decode=False, progress=progress)
    if problems:
        raise ShardError(summary_line(problems, root))
    if cache is not None:
        record = {"manifest": str(path), "manifest_sha256": digest, "shards": {**saved.get("shards", {}), **stats}}
        write_atomic(cache, json.dumps(record, indent=1, sort_keys=True).encode())
    return True


def find_undecodable(root: Path, split: str, shards: Sequence[str] | None = None,
                     limit: int | None = None) -> list[Problem]:
    """The samples of `split` whose jpg does not decode in full, read through the index as DALI reads them.

    `shards` narrows the search (file names or paths of the split's tars); `limit` stops after that many.
    """
    root = Path(root)
    manifest = Manifest.read(root)
    chosen = manifest.split(split, root).shards
    if shards is not None:
        wanted = {Path(s).name for s in shards}
        unknown = wanted - {s.name for s in chosen}
        if unknown:
            raise ShardError(f"split '{split}' of {root} has no shard {', '.join(sorted(unknown))}")
        chosen = [s for s in chosen if s.name in wanted]
    problems: list[Problem] = []
    for shard in chosen:
        tar, idx = root / shard.name, root / shard.index_name
        entries = parse_index(idx.read_text(errors="replace"), str(idx))
        with open(tar, "rb") as f:
            for key, members in entries:
                jpg = next((m for m in members if m.ext == "jpg"), None)
                if jpg is None:
                    why: str | None = "lacks its jpg"
                else:
                    data = os.pread(f.fileno(), jpg.size, jpg.offset)
                    why = (f"jpg cut off ({len(data)} of {jpg.size} bytes)" if len(data) != jpg.size
                           else decode_jpeg(data))
                if why:
                    problems.append(Problem(str(tar), key, why))
                    if limit is not None and len(problems) >= limit:
                        return problems
    return problems


def _table(manifest: Manifest, splits: list[str], problems: list[Problem], root: Path) -> str:
    lines = [f"  {'split':<7}{'shards':>7}{'samples':>10}{'GB':>9}{'bad shards':>12}{'bad samples':>13}"]
    for split in splits:
        info = manifest.splits[split]
        names = {str(root / s.name) for s in info.shards}
        mine = [p for p in problems if p.shard in names]
        gb = sum(s.bytes for s in info.shards) / 1e9
        lines.append(f"  {split:<7}{len(info.shards):>7}{info.samples:>10}{gb:>9.3f}"
                     f"{len({p.shard for p in mine}):>12}{len({(p.shard, p.key) for p in mine if p.key}):>13}")
    return "\n".join(lines)


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the --out folder of `python -m pack`")
    p.add_argument("--decode", action="store_true",
                   help="also decode every sample's jpg in full and parse its cls and json (slower)")
    p.add_argument("--split", action="append", choices=SPLITS, default=None,
                   help="check only this split (repeatable; default: all)")
    p.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1,
                   help="threads for hashing, processes for decoding (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not a.data.is_dir():
        raise UsageError(f"--data {a.data} is not a folder (give the --out folder of `python -m pack`)")
    manifest = Manifest.read(a.data)
    splits = a.split or list(manifest.splits)
    t0 = time.perf_counter()
    problems = verify_shards(a.data, splits, a.workers, a.decode, progress=not a.no_progress)
    seconds = time.perf_counter() - t0
    gb = sum(s.bytes for split in splits for s in manifest.splits[split].shards) / 1e9
    print(_table(manifest, splits, problems, a.data))
    what = "sizes, sha256 and every sample decoded" if a.decode else "sizes and sha256"
    print(f"checked {gb:.3f} GB ({what}) in {seconds:.1f}s with {a.workers} workers")
    for problem in problems:
        print(f"  BAD {problem}")
    print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''}" if problems else "all good")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
