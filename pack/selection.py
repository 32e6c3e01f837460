"""Which listed images become samples, and why each other one does not.

Cheapest first: metadata (no_face, second_face), a deterministic identity sample (not_sampled),
the file (missing; too_small and too_large from its header; corrupt from a full decode), measured
flags (flagged, with --drop-flagged), then the identity's count (few_images) and the cap (capped).
No file is read for an image the metadata drops, nor for an identity that can no longer reach
--min-images, and no image is decoded whose header failed a size check. The metadata steps read imdb.mat's
face scores: the other layouts have none, so no row of theirs is dropped there.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from dataclasses import dataclass, field

from base.cli import non_negative, positive
from pack.listing import Row

REASONS = ("no_face", "second_face", "not_sampled", "missing", "too_small", "too_large", "corrupt", "flagged",
           "few_images", "capped")

MAX_PIXELS = 40_000_000
"""Default --max-pixels. Face crops are far smaller (the synthetic ones at most 600 x 600); an image that
declares more is broken or hostile, and decoding it costs 3 bytes a pixel in one worker (a 19,000 x 19,000
PNG: 1.1 GB, per worker)."""


def fraction_or_count(text: str) -> float:
    """An argparse type for --eval-identities: a fraction in [0, 1), or a whole count of 1 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: '{text}'") from None
    if not (0 <= value < 1 or (math.isfinite(value) and value >= 1 and value == int(value))):
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1) or a whole count, got {text}")
    return value


def _flag(default: object, check: object) -> object:
    """A field whose flag parses its value with `check` (an argparse type that refuses values out of range)."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class Params:
    """Everything that decides the output's bytes (not where it is read from, nor how many workers).

    Each field is a flag of `python -m pack` (`min_size` is `--min-size`) and its docstring is the flag's help:
    this class is the one place they are declared (pack/__main__.py builds the parser from it).
    """

    size: int = _flag(224, positive(int))
    """Stored side in pixels: the shorter side is resized to it, then the centre square kept."""
    min_size: int = _flag(100, non_negative(int))
    """Drop images whose shorter side is under this, read from the header (too_small)."""
    max_pixels: int = _flag(MAX_PIXELS, positive(int))
    """Drop images whose header declares more pixels, before decoding them (too_large)."""
    min_images: int = _flag(50, positive(int))
    """Drop identities left with fewer images (few_images)."""
    min_face_score: float | None = None
    """imdb layout only: also drop face scores under this (default: only -inf, where no face was found)."""
    keep_second_face: bool = False
    """imdb layout only: keep crops where a second face was detected."""
    max_images_per_identity: int | None = _flag(None, positive(int))
    """Keep at most this many images per identity, a seeded random subset (capped)."""
    identities: int | None = _flag(None, positive(int))
    """Pack a deterministic sample of this many identities, by a hash of their names (not_sampled)."""
    eval_identities: float = _flag(0.1, fraction_or_count)
    """Identities held out for evaluation: a fraction if under 1, else a count."""
    shard_samples: int | None = _flag(None, positive(int))
    """Samples per shard (default: about 128 MB a shard)."""
    drop_flagged: bool = False
    """Drop images flagged as outliers (grayscale, low_contrast, streaks, duplicate) instead of keeping them
    flagged."""
    seed: int = 0
    """Seed of --max-images-per-identity's subset and of the shuffle."""


def stable_hash(text: str) -> float:
    """A number in [0, 1) fixed by `text` alone: the same identity lands in the same place every run."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def metadata_reason(row: Row, p: Params) -> str | None:
    if math.isinf(row.face_score) and row.face_score < 0:
        return "no_face"
    if p.min_face_score is not None and row.face_score < p.min_face_score:
        return "no_face"
    if not p.keep_second_face and not math.isnan(row.second_face_score):
        return "second_face"
    return None


def select_metadata(rows: list[Row], p: Params) -> tuple[dict[str, list[Row]], dict[str, tuple[str, str]]]:
    """Candidates grouped by identity (paths sorted), and the reason for every row dropped already."""
    rejected: dict[str, tuple[str, str]] = {}
    groups: dict[str, list[Row]] = {}
    for row in rows:
        reason = metadata_reason(row, p)
        if reason:
            rejected[row.path] = (reason, f"face_score={row.face_score:g} second_face_score={row.second_face_score:g}")
        else:
            groups.setdefault(row.identity, []).append(row)
    for nm in list(groups):
        if len(groups[nm]) < p.min_images:
            for row in groups.pop(nm):
                rejected[row.path] = ("few_images", "identity below --min-images after metadata")
    if p.identities is not None and len(groups) > p.identities:
        keep = set(sorted(groups, key=stable_hash)[: p.identities])
        for nm in [n for n in groups if n not in keep]:
            for row in groups.pop(nm):
                rejected[row.path] = ("not_sampled", f"--identities {p.identities}")
    for nm in groups:
        groups[nm].sort(key=lambda r: r.path)
    return dict(sorted(groups.items())), rejected


def split_identities(identities: list[str], fraction_or_count: float) -> set[str]:
    """Eval identities: a fraction (< 1) by hash threshold, so adding identities never moves existing
    ones, or a count (>= 1) of the lowest hashes. A non-zero fraction keeps at least one."""
    ranked = sorted(identities, key=stable_hash)
    if fraction_or_count >= 1:
        return set(ranked[: int(fraction_or_count)])
    chosen = {nm for nm in ranked if stable_hash(nm) < fraction_or_count}
    if not chosen and fraction_or_count > 0 and ranked:
        chosen = {ranked[0]}
    return chosen


def cap(paths: list[str], limit: int | None, seed: int, identity: str) -> set[str]:
    """The paths kept under --max-images-per-identity: a seeded, per-identity random subset."""
    if limit is None or len(paths) <= limit:
        return set(paths)
    import numpy as np

    rng = np.random.default_rng([seed, int(stable_hash(identity) * 2**32)])
    return {paths[i] for i in rng.choice(len(paths), size=limit, replace=False)}

