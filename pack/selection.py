"""Which listed images become samples, and why each other one does not.

Cheapest first: metadata (no_face, second_face), a deterministic identity sample (not_sampled),
the file (missing; too_small and too_large from its header; corrupt from a full decode), measured
flags (flagged, with --drop-flagged), then the identity's count (few_images) and the cap (capped).
No file is read for an image the metadata drops, nor for an identity that can no longer reach
--min-images, and no image is decoded whose header failed a size check.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from pack.images import MAX_PIXELS
from pack.meta import Row

REASONS = ("no_face", "second_face", "not_sampled", "missing", "too_small", "too_large", "corrupt", "flagged",
           "few_images", "capped")


@dataclass(frozen=True)
class Params:
    """Everything that decides the output's bytes (not where it is read from, nor how many workers)."""

    size: int = 224
    min_size: int = 100
    max_pixels: int = MAX_PIXELS
    min_images: int = 50
    min_face_score: float | None = None
    keep_second_face: bool = False
    max_images_per_identity: int | None = None
    identities: int | None = None
    eval_identities: float = 0.1
    shard_samples: int | None = None
    drop_flagged: bool = False
    seed: int = 0


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
            groups.setdefault(row.nm_id, []).append(row)
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


def split_identities(nm_ids: list[str], fraction_or_count: float) -> set[str]:
    """Eval identities: a fraction (< 1) by hash threshold, so adding identities never moves existing
    ones, or a count (>= 1) of the lowest hashes. A non-zero fraction keeps at least one."""
    ranked = sorted(nm_ids, key=stable_hash)
    if fraction_or_count >= 1:
        return set(ranked[: int(fraction_or_count)])
    chosen = {nm for nm in ranked if stable_hash(nm) < fraction_or_count}
    if not chosen and fraction_or_count > 0 and ranked:
        chosen = {ranked[0]}
    return chosen


def cap(paths: list[str], limit: int | None, seed: int, nm_id: str) -> set[str]:
    """The paths kept under --max-images-per-identity: a seeded, per-identity random subset."""
    if limit is None or len(paths) <= limit:
        return set(paths)
    rng = np.random.default_rng([seed, int(stable_hash(nm_id) * 2**32)])
    return {paths[i] for i in rng.choice(len(paths), size=limit, replace=False)}

