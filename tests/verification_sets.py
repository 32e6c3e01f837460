"""Synthetic verification benchmarks in the exact real layouts, made from pack.synth faces.

- LFW: `DIR/lfw/<Name>/<Name>_<NNNN>.jpg` (250 x 250 JPEGs, names with underscores, numbered from 1) and
  `DIR/pairs.txt`: header `SETS\\tN`, then per set N matched lines `name\\tn1\\tn2` and N mismatched lines
  `name1\\tn1\\tname2\\tn2`; the sets are identity-disjoint, as LFW's.
- insightface .bin: the same pairs in the same order, `pickle.dump((bins, issame))` with `bins` the
  112 x 112 JPEG bytes of each pair's two images, consecutively.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Pairs:
    """Pairs in file order: ((name, number), (name, number), same) with images by (name, number)."""

    sets: int
    per_set: int
    rows: list[tuple[tuple[str, int], tuple[str, int], bool]]
    images: dict[tuple[str, int], Path]


def _square(path: Path, side: int) -> Image.Image:
    im = Image.open(path).convert("RGB")
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((side, side), Image.Resampling.BILINEAR)


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def plan_pairs(download: Path, sets: int = 10, per_set: int = 12, seed: int = 0,
               nm_ids: set[str] | None = None) -> Pairs:
    """Clean faces (no dirt, at least 100 px) of identities with two or more of them, dealt round-robin to
    identity-disjoint sets; per set `per_set` matched then `per_set` mismatched pairs, without repeats."""
    truth = json.loads((download / "synth_truth.json").read_text())["images"]
    by_name: dict[str, list[str]] = {}
    for path, t in sorted(truth.items()):
        if t["dirt"] or not t["decodable"] or min(t["width"], t["height"]) < 100:
            continue
        if nm_ids is not None and t["nm_id"] not in nm_ids:
            continue
        by_name.setdefault(t["name"].replace(" ", "_"), []).append(path)
    names = sorted(n for n, paths in by_name.items() if len(paths) >= 2)
    if len(names) < 2 * sets:
        raise ValueError(f"{len(names)} usable identities for {sets} identity-disjoint sets")
    rng = np.random.default_rng(seed)
    names = [names[i] for i in rng.permutation(len(names))]
    images = {(n, k + 1): download / "imdb_crop" / p for n in names for k, p in enumerate(by_name[n])}
    rows = []
    for s in range(sets):
        group = names[s::sets]
        matched, mismatched = set(), set()
        while len(matched) < per_set:
            n = group[int(rng.integers(len(group)))]
            a, b = sorted(rng.choice(len(by_name[n]), 2, replace=False) + 1)
            matched.add(((n, int(a)), (n, int(b))))
            if len(matched) == sum(len(by_name[x]) * (len(by_name[x]) - 1) // 2 for x in group):
                raise ValueError(f"set {s} has too few matched pairs for {per_set}")
        while len(mismatched) < per_set:
            i, j = sorted(rng.choice(len(group), 2, replace=False))
            a = int(rng.integers(len(by_name[group[i]]))) + 1
            b = int(rng.integers(len(by_name[group[j]]))) + 1
            mismatched.add(((group[i], a), (group[j], b)))
        rows += [(a, b, True) for a, b in sorted(matched)] + [(a, b, False) for a, b in sorted(mismatched)]
    return Pairs(sets, per_set, rows, images)


def write_lfw(pairs: Pairs, out: Path) -> Path:
    """The LFW folder and pairs.txt (tab-separated, as distributed); returns the pairs.txt path."""
    used = {x for a, b, _ in pairs.rows for x in (a, b)}
    for name, number in sorted(used):
        target = out / "lfw" / name / f"{name}_{number:04d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_jpeg(_square(pairs.images[(name, number)], 250)))
    lines = [f"{pairs.sets}\t{pairs.per_set}"]
    for (n1, k1), (n2, k2), same in pairs.rows:
        lines.append(f"{n1}\t{k1}\t{k2}" if same else f"{n1}\t{k1}\t{n2}\t{k2}")
    (out / "pairs.txt").write_text("\n".join(lines) + "\n")
    return out / "pairs.txt"


def write_bin(pairs: Pairs, path: Path, as_arrays: bool = False, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    """The insightface .bin of the same pairs; `as_arrays` stores each image as a 1-D uint8 numpy array of
    its JPEG bytes (as some conversions do) instead of bytes."""
    bins = []
    for a, b, _ in pairs.rows:
        for key in (a, b):
            data = _jpeg(_square(pairs.images[key], 112))
            bins.append(np.frombuffer(data, np.uint8).copy() if as_arrays else data)
    issame = [same for _, _, same in pairs.rows]
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=protocol)
    return path
