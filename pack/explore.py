"""`python -m pack --dry-run`: the funnel from metadata and image headers alone, for the chosen
thresholds and their neighbours, and histograms to choose them by (OUT/explore.png). No shards."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from base.files import write_png
from pack.images import header_size, size_reason
from pack.listing import Listing, Row, tar_path
from pack.selection import Params, select_metadata
from pack.tarscan import members

HEADER_BYTES = 1 << 16
"""Enough of a JPEG or PNG to hold its dimensions and EXIF orientation."""
BATCH = 1024
"""Headers handed to the workers at a time: bounds what a tar pass holds (64 KB each) while they parse."""


def _folder_header(file: str) -> tuple[int, int] | None:
    try:
        with open(file, "rb") as fh:
            return header_size(fh.read(HEADER_BYTES))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _parse_header(item: tuple[str, bytes]) -> tuple[int, int] | None:
    return header_size(item[1])


def _batches(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, n)):
        yield batch


def read_headers(src: Path, paths: set[str], progress: bool, workers: int = 1,
                 strip: int = 1) -> dict[str, tuple[int, int] | None]:
    """Upright (width, height) of each listed file from its first bytes; None if missing or unreadable.

    `workers` processes read (from a folder) and parse the headers; a tar is still read in one sequential pass.
    """
    sizes: dict[str, tuple[int, int] | None] = dict.fromkeys(paths)
    bar = tqdm(total=len(paths), unit="img", desc="headers", disable=not progress)
    with ExitStack() as stack:
        pool = stack.enter_context(get_context("fork").Pool(workers)) if workers > 1 else None

        def run(func, batch: list) -> list:
            return pool.map(func, batch, chunksize=16) if pool else list(map(func, batch))

        if src.is_dir():
            for batch in _batches(sorted(paths), BATCH):
                sizes.update(zip(batch, run(_folder_header, [str(src / path) for path in batch]), strict=True))
                bar.update(len(batch))
        else:
            for batch in _batches(_tar_headers(src, paths, strip), BATCH):
                sizes.update(zip((path for path, _ in batch), run(_parse_header, batch), strict=True))
                bar.update(len(batch))
    bar.close()
    return sizes


def _tar_headers(src: Path, paths: set[str], strip: int) -> Iterator[tuple[str, bytes]]:
    for member in members(src):
        rel = tar_path(member.name, strip)
        if rel in paths:
            yield rel, member.read(HEADER_BYTES)


def outcome(rows: list[Row], sizes: dict, p: Params) -> tuple[int, int]:
    """(images, identities) kept under `p`, counting unreadable headers as lost (decoding is not tried)."""
    groups, _ = select_metadata(rows, replace(p, min_images=1))
    images = ids = 0
    for group in groups.values():
        ok = [r for r in group if sizes.get(r.path) and size_reason(*sizes[r.path], p.min_size, p.max_pixels) is None]
        if len(ok) >= p.min_images:
            n = min(len(ok), p.max_images_per_identity or len(ok))
            images, ids = images + n, ids + 1
    return images, ids


def explore(listing: Listing, p: Params, out: Path, workers: int = 1, progress: bool = True) -> str:
    rows = listing.rows
    groups, _ = select_metadata(rows, replace(p, min_images=1))
    sizes = read_headers(listing.src, {r.path for g in groups.values() for r in g}, progress, workers, listing.strip)
    lines = [f"dry run over {len(rows)} listed images (metadata and headers only; no image decoded)",
             f"  {'min-images':>10} {'min-size':>9} {'images':>9} {'identities':>11}"]
    for mi in sorted({10, 20, 50, 100, p.min_images}):
        for ms in sorted({64, 100, 150, p.min_size}):
            n, k = outcome(rows, sizes, replace(p, min_images=mi, min_size=ms))
            mark = "  <- chosen" if (mi, ms) == (p.min_images, p.min_size) else ""
            lines.append(f"  {mi:>10} {ms:>9} {n:>9} {k:>11}{mark}")
    _plot(rows, sizes, groups, out / "explore.png")
    lines.append(f"histograms: {out / 'explore.png'}")
    return "\n".join(lines)


def _plot(rows: list[Row], sizes: dict, groups: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [min(s) for s in sizes.values() if s]
    per_id = [len(g) for g in groups.values()]
    scores = [r.face_score for r in rows if np.isfinite(r.face_score)]
    fig, ax = plt.subplots(1, 3 if scores else 2, figsize=(15 if scores else 10, 4))
    ax[0].hist(sides, bins=60)
    ax[0].set(title="shorter crop side (px)", xlabel="pixels", ylabel="images")
    ax[1].hist(per_id, bins=np.unique(np.geomspace(1, max(per_id + [2]), 40).astype(int)))
    ax[1].set(title="images per identity (after metadata)", xscale="log", xlabel="images", ylabel="identities")
    if scores:  # the imdb layout's face scores; the other layouts have none
        ax[2].hist(scores, bins=60)
        ax[2].set(title=f"face score ({sum(1 for r in rows if np.isneginf(r.face_score))} rows are -inf)",
                  xlabel="score", ylabel="images")
    fig.tight_layout()
    write_png(fig, path, dpi=90)
    plt.close(fig)
