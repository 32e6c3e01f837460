"""Time the packer against the naive way on the same input, in one run.

    python -m pack.bench --src SRC [--workers N] [--limit N] [--json PATH]

Baseline: one process; for every candidate image, full PIL decode, RGB, resize (shorter side, Lanczos),
centre crop, JPEG encode. Packer: `python -m pack` itself (metadata selection, decode checks, draft-mode
decode, flags, shards, index, manifest) over the same candidates (--min-images 1, so it reads them all).
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

from pack.meta import locate, parse_mat
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
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = parse_mat(*locate(a.src, None))
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
        pack(a.src, Path(tmp) / "out", rows, replace(p), a.workers, "bench", progress=False)
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
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
