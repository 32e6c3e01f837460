"""Time the packer against the naive way on the same input, in one run; and time `python -m pack verify`.

    python -m pack.bench --src SRC [--workers N] [--limit N] [--json PATH]
    python -m pack.bench verify --data PACKED --out DIR [--gb 3] [--workers N] [--json PATH]

Baseline: one process; for every candidate image, full PIL decode, RGB, resize (shorter side, Lanczos),
centre crop, JPEG encode. Packer: `python -m pack` itself (metadata selection, decode checks, draft-mode
decode, flags, shards, index, manifest) over the same candidates (--min-images 1, so it reads them all).

The ratio depends on the crop sizes (draft decoding only pays from twice the target up), so a second
table gives the per-image cost of both, one process each, by crop side, on up to --per-bucket images each.

`verify` writes a dataset of --gb GB into DIR by repeating the stored samples of a packed output (real
JPEG bytes, new keys, shards of about 128 MB), then times `pack.verify.verify_shards`: sizes and sha256 of
the whole set with the page cache dropped for its files (posix_fadvise DONTNEED: read from disk) and again
warm, in --workers threads, and the full decode of two extra shards in one process. It prints seconds per
GB of each, wall-clock and CPU (this process's threads), so that a figure taken on a busy machine can be
told apart from the work itself.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from dataclasses import replace
from itertools import cycle
from pathlib import Path

from PIL import Image, ImageOps

from base.cli import OneLineParser, non_negative, output_file, positive
from base.errors import UsageError, entry_point
from measure.hardware import hardware
from measure.record import save
from pack.format import Manifest, ShardError, SplitInfo, parse_index
from pack.images import check
from pack.listing import list_imdb
from pack.packer import TARGET_SHARD_BYTES, pack
from pack.selection import Params, select_metadata
from pack.shards import Sample, write_shard

PROG = "python -m pack.bench"
REAL_SET_IMAGES = 460_723
PROJECT_CORES = 16


def naive(data: bytes, size: int) -> bytes:
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.LANCZOS)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    buf = io.BytesIO()
    im.crop((left, top, left + size, top + size)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@entry_point(PROG)
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        return verify_bench(argv[1:])
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog=f"{PROG} verify --help: the cost of `python -m pack verify`")
    ap.add_argument("--src", type=Path, required=True, help="an extracted imdb_crop folder")
    ap.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=positive(int), default=None, help="use only the first N identities (by nm id)")
    ap.add_argument("--meta", type=Path, default=None, help="imdb.mat, if not found beside --src")
    ap.add_argument("--per-bucket", type=non_negative(int), default=300,
                    help="images per crop-side bucket (0: skip the table)")
    ap.add_argument("--json", type=output_file, default=None)
    a = ap.parse_args(argv)
    if not a.src.is_dir():
        raise UsageError(f"--src {a.src} is not a folder (give an extracted imdb_crop folder)")
    listing = list_imdb(a.src, a.meta)  # the packer's own reading of the download
    rows = listing.rows
    p = Params(min_images=1)
    groups, _ = select_metadata(rows, p)
    if a.limit:
        keep = set(list(groups)[: a.limit])
        rows = [r for r in rows if r.identity in keep]
        groups = {nm: g for nm, g in groups.items() if nm in keep}
    paths = [r.path for g in groups.values() for r in g]

    t0 = time.perf_counter()
    done = 0
    for path in paths:
        try:
            naive((listing.src / path).read_bytes(), p.size)
            done += 1
        except Exception:  # the naive way has no checks: a broken file is simply skipped
            pass
    base_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pack(replace(listing, rows=rows), Path(tmp) / "out", replace(p), a.workers, progress=False)
        pack_s = time.perf_counter() - t0

    n = len(paths)
    per_core = n / pack_s / a.workers
    result = {
        "images": n,
        "baseline": {"images_per_s": round(n / base_s, 1), "seconds": round(base_s, 4), "processes": 1},
        "packer": {"images_per_s": round(n / pack_s, 1), "seconds": round(pack_s, 4), "workers": a.workers},
        "ratio": round(base_s / pack_s, 2),
        "projected_minutes_real_set_16_cores": round(REAL_SET_IMAGES / (per_core * PROJECT_CORES) / 60, 1),
    }
    print(f"{n} candidate images, same input, one run")
    print(f"  {'baseline (1 process, naive PIL)':<36}{result['baseline']['images_per_s']:>9.1f} images/s")
    print(f"  {f'packer ({a.workers} workers)':<36}{result['packer']['images_per_s']:>9.1f} images/s")
    print(f"  {'ratio':<36}{result['ratio']:>9.2f}x")
    print(f"  projected for {REAL_SET_IMAGES:,} images at {PROJECT_CORES} cores (linear in cores, same image sizes): "
          f"{result['projected_minutes_real_set_16_cores']} min")
    if a.per_bucket:
        result["by_crop_side"] = by_crop_side(listing.src, paths, p.size, p.min_size, a.per_bucket)
        print(f"per image, one process each, by the crop's shorter side (up to {a.per_bucket} images each)")
        print(f"  {'crop side':<16}{'images':>8}{'baseline ms':>13}{'packer ms':>11}{'ratio':>8}")
        for b in result["by_crop_side"]:
            print(f"  {b['bucket']:<16}{b['images']:>8}{b['baseline_ms']:>13.2f}{b['packer_ms']:>11.2f}"
                  f"{b['ratio']:>7.2f}x")
    save("pack", result, a.json)
    return 0


def by_crop_side(src: Path, paths: list[str], size: int, min_size: int, per_bucket: int) -> list[dict]:
    """Per-image CPU time of the naive way and of `pack.images.check`, by crop side, on images that decode."""
    buckets: dict[str, list[bytes]] = {f"< {size}": [], f"{size}-{2 * size - 1}": [], f">= {2 * size} (draft)": []}
    names = list(buckets)
    for path in paths:
        if not (src / path).is_file():
            continue
        data = (src / path).read_bytes()
        c = check(data, size, min_size)
        if c.reason is not None:
            continue  # both ways are timed on images that decode
        side = min(c.width, c.height)
        group = buckets[names[0 if side < size else 1 if side < 2 * size else 2]]
        if len(group) < per_bucket:
            group.append(data)
        if all(len(g) >= per_bucket for g in buckets.values()):
            break
    rows = []
    for name, datas in buckets.items():
        if not datas:
            continue
        t0 = time.process_time()
        for data in datas:
            naive(data, size)
        base = (time.process_time() - t0) / len(datas) * 1e3
        t0 = time.process_time()
        for data in datas:
            check(data, size, min_size)
        ours = (time.process_time() - t0) / len(datas) * 1e3
        rows.append({"bucket": name, "images": len(datas), "baseline_ms": round(base, 3), "packer_ms": round(ours, 3),
                     "ratio": round(base / ours, 2)})
    return rows


def _stored_samples(data: Path) -> list[tuple[bytes, bytes, bytes]]:
    """(cls, jpg, json) of every train sample of a packed output, read through its indexes."""
    manifest = Manifest.read(data)
    out = []
    for shard in manifest.split("train", data).shards:
        blob = (data / shard.name).read_bytes()
        for _, members in parse_index((data / shard.index_name).read_text(), shard.index_name):
            m = {x.ext: blob[x.offset:x.offset + x.size] for x in members}
            out.append((m["cls"], m["jpg"], m["json"]))
    return out


def build_copies(data: Path, samples: list[tuple[bytes, bytes, bytes]], out: Path, gb: float,
                 shard_bytes: int = TARGET_SHARD_BYTES) -> Manifest:
    """A dataset of about `gb` GB in `out` (train) plus two shards (eval), every sample one of `samples` (the
    stored samples of `data`) under a new key. Reused when `out` already holds one of this size."""
    source = Manifest.read(data)
    want = int(gb * 1e9)
    if Manifest.path(out).is_file():
        old = Manifest.read(out)
        if sum(s.bytes for s in old.splits["train"].shards) >= want:
            return old
    out.mkdir(parents=True, exist_ok=True)
    per_shard = max(1, int(shard_bytes // (sum(len(j) for _, j, _ in samples) / len(samples) + 2048)))
    supply, n, splits = cycle(samples), 0, {}
    for split, limit in (("train", want), ("eval", 2 * shard_bytes)):
        shards, total = [], 0
        while total < limit:
            batch = []
            for cls, jpg, meta in (next(supply) for _ in range(per_shard)):
                batch.append(Sample(f"copy{n:09d}", [("cls", cls), ("jpg", jpg), ("json", meta)]))
                n += 1
            shards.append(write_shard(out / f"{split}-{len(shards):06d}.tar", batch))
            total += shards[-1].bytes
        splits[split] = SplitInfo(sum(s.samples for s in shards), 0, shards)
    manifest = Manifest(image_size=source.image_size, num_classes=source.num_classes, splits=splits,
                        params={"copies_of": str(data)})
    manifest.write(out)
    return manifest


def _drop_cache(root: Path, manifest: Manifest) -> None:
    """Evict the shards and indexes from the page cache (their pages are clean once fsynced), so the next
    read comes from the disk."""
    for split in manifest.splits.values():
        for s in split.shards:
            for f in (root / s.name, root / s.index_name):
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def verify_bench(argv: list[str]) -> int:
    from pack.verify import verify_shards

    prog = f"{PROG} verify"
    ap = OneLineParser(prog=prog, description="The cost of `python -m pack verify` per GB (see the module docstring).")
    ap.add_argument("--data", type=Path, required=True, help="a packed output whose samples are repeated")
    ap.add_argument("--out", type=Path, required=True, help="folder for the repeated dataset (reused if present)")
    ap.add_argument("--gb", type=positive(float), default=3.0, help="size of the dataset to verify (default 3)")
    ap.add_argument("--shard-mb", type=positive(float), default=TARGET_SHARD_BYTES / 2**20,
                    help="shard size in MiB (default: the packer's, 128)")
    ap.add_argument("--workers", type=positive(int), default=os.cpu_count() or 1)
    ap.add_argument("--json", type=output_file, default=None)
    a = ap.parse_args(argv)
    try:
        samples = _stored_samples(a.data)
        manifest = build_copies(a.data, samples, a.out, a.gb, int(a.shard_mb * 2**20))
    except ShardError as e:
        raise UsageError(str(e), prog=prog) from None
    except OSError as e:
        raise UsageError(f"cannot write the dataset to --out {a.out}: {e.strerror or e}", prog=prog) from None
    train = manifest.splits["train"]
    gb = sum(s.bytes for s in train.shards) / 1e9
    eval_gb = sum(s.bytes for s in manifest.splits["eval"].shards) / 1e9
    rows = {}
    _drop_cache(a.out, manifest)
    for name, split, decode, workers, size in (
            ("sha256, cold cache", "train", False, a.workers, gb),
            ("sha256, warm cache", "train", False, a.workers, gb),
            ("decode, one process", "eval", True, 1, eval_gb)):
        t0, c0 = time.perf_counter(), time.process_time()
        problems = verify_shards(a.out, [split], workers, decode=decode, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if problems:
            raise UsageError(f"the generated dataset has problems: {problems[0]}", prog=prog)
        rows[name] = {"gb": size, "workers": workers, "seconds": seconds, "s_per_gb": seconds / size,
                      "cpu_s_per_gb": cpu / size}
    jpg_kb = sum(len(j) for _, j, _ in samples) / len(samples) / 1e3
    result = {"rows": rows, "workers": a.workers, "samples": train.samples, "mean_jpg_kb": round(jpg_kb, 1),
              "hardware": hardware()}
    print(f"python -m pack verify on {gb:.2f} GB ({train.samples} samples, mean jpg {jpg_kb:.1f} KB), "
          f"{a.workers} workers, {result['hardware']}")
    print(f"  {'check':<24}{'GB':>8}{'workers':>9}{'seconds':>10}{'s/GB':>8}{'CPU s/GB':>10}")
    for name, r in rows.items():
        print(f"  {name:<24}{r['gb']:>8.2f}{r['workers']:>9}{r['seconds']:>10.2f}{r['s_per_gb']:>8.2f}"
              f"{r['cpu_s_per_gb']:>10.2f}")
    save("pack-verify", result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
