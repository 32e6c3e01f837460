"""Time the packer against the naive way on the same input, in one run.

    python -m pack.bench --src SRC [--workers N] [--limit N] [--json PATH]

Baseline: one process; for every candidate image, full PIL decode, RGB, resize (shorter side, Lanczos),
centre crop, JPEG encode. Packer: `python -m pack` itself (metadata selection, decode checks, draft-mode
decode, flags, shards, index, manifest) over the same candidates (--min-images 1, so it reads them all).

The ratio depends on the crop sizes (draft decoding only pays from twice the target up), so a second
table gives the per-image cost of both, one process each, by crop side, on up to --per-bucket images each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image, ImageOps

from pack.cli import fail
from pack.images import check
from pack.meta import MetaError, locate, parse_mat
from pack.packer import pack
from pack.selection import Params, select_metadata

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pack.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, required=True, help="an extracted imdb_crop folder")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N identities (by nm id)")
    ap.add_argument("--meta", type=Path, default=None, help="imdb.mat, if not found beside --src")
    ap.add_argument("--per-bucket", type=int, default=300, help="images per crop-side bucket (0: skip the table)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    try:
        rows = parse_mat(*locate(a.src, a.meta))
    except MetaError as e:
        fail(str(e))
    p = Params(min_images=1)
    groups, _ = select_metadata(rows, p)
    if a.limit:
        keep = set(list(groups)[: a.limit])
        rows = [r for r in rows if r.nm_id in keep]
        groups = {nm: g for nm, g in groups.items() if nm in keep}
    paths = [r.path for g in groups.values() for r in g]

    t0 = time.perf_counter()
    done = 0
    for path in paths:
        try:
            naive((a.src / path).read_bytes(), p.size)
            done += 1
        except Exception:  # the naive way has no checks: a broken file is simply skipped
            pass
    base_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pack(a.src, Path(tmp) / "out", rows, replace(p), a.workers, progress=False)
        pack_s = time.perf_counter() - t0

    n = len(paths)
    per_core = n / pack_s / a.workers
    result = {
        "images": n,
        "baseline": {"images_per_s": round(n / base_s, 1), "seconds": round(base_s, 2), "processes": 1},
        "packer": {"images_per_s": round(n / pack_s, 1), "seconds": round(pack_s, 2), "workers": a.workers},
        "ratio": round(base_s / pack_s, 2),
        "projected_minutes_real_set_16_cores": round(REAL_SET_IMAGES / (per_core * PROJECT_CORES) / 60, 1),
        "hardware": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    print(f"{n} candidate images, same input, one run")
    print(f"  {'baseline (1 process, naive PIL)':<36}{result['baseline']['images_per_s']:>9.1f} images/s")
    print(f"  {f'packer ({a.workers} workers)':<36}{result['packer']['images_per_s']:>9.1f} images/s")
    print(f"  {'ratio':<36}{result['ratio']:>9.2f}x")
    print(f"  projected for {REAL_SET_IMAGES:,} images at {PROJECT_CORES} cores (linear in cores, same image sizes): "
          f"{result['projected_minutes_real_set_16_cores']} min")
    if a.per_bucket:
        result["by_crop_side"] = by_crop_side(a.src, paths, p.size, p.min_size, a.per_bucket)
        print(f"per image, one process each, by the crop's shorter side (up to {a.per_bucket} images each)")
        print(f"  {'crop side':<16}{'images':>8}{'baseline ms':>13}{'packer ms':>11}{'ratio':>8}")
        for b in result["by_crop_side"]:
            print(f"  {b['bucket']:<16}{b['images']:>8}{b['baseline_ms']:>13.2f}{b['packer_ms']:>11.2f}"
                  f"{b['ratio']:>7.2f}x")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
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


if __name__ == "__main__":
    sys.exit(main())
