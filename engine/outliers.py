"""Embedding outliers, and whether the packer's image flags are over-represented among them.

The seed project's finding was that images with colour streaks end up as outliers in the embedding. The
packer flags such images (`streaks`, `grayscale`, `low_contrast`, `duplicate`, in each sample's json);
this module ranks images by how far they sit from the rest of their identity and measures, per flag, its
share among the top outliers against its share of all ranked images.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from engine.data.shards import Entry, read_member

FLAGS = ("streaks", "grayscale", "low_contrast", "duplicate")
TOP_SHARES = (0.01, 0.05)
Z95 = 1.959963984540054

SCORING = ("outlier score = cosine distance (1 - cosine similarity) between an image's embedding and the "
           "normalised mean embedding of the other images of its identity (leave-one-out centroid); higher = "
           "farther from its identity. Images whose identity has no other image are not ranked.")
INTERVALS = ("share in the top: Wilson 95% score interval; enrichment = share in the top / share among all ranked "
             "images, its interval the Wilson bounds divided by that base share; p = one-sided hypergeometric "
             "P(at least this many flagged in a random draw of the same size)")


def outlier_scores(emb: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Leave-one-out centroid distance per image (see SCORING); NaN for identities with one image."""
    emb = emb.float()
    labels = labels.to(emb.device)
    sums = torch.zeros(int(labels.max()) + 1, emb.shape[1], device=emb.device).index_add_(0, labels, emb)
    others = sums[labels] - emb
    counts = torch.bincount(labels)[labels]
    cos = (emb * torch.nn.functional.normalize(others, dim=1)).sum(1)
    score = (1 - cos).double().cpu().numpy()
    score[(counts < 2).cpu().numpy()] = np.nan
    return score


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial share k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ranking(scores: np.ndarray) -> np.ndarray:
    """Indices of ranked images, highest score first (ties: lower index first); unranked images left out."""
    ranked = np.flatnonzero(np.isfinite(scores))
    return ranked[np.argsort(-scores[ranked], kind="stable")]


def enrichment(scores: np.ndarray, flags: list[list[str]], shares: tuple[float, ...] = TOP_SHARES,
               names: tuple[str, ...] = FLAGS) -> list[dict]:
    """Per flag and top share: flagged count and share among the top ceil(share x N) ranked images against
    the share among all N ranked images, with the intervals and p-value of INTERVALS."""
    from scipy.stats import hypergeom  # here, not at the top: scipy is for the report only
    order = ranking(scores)
    n_all = len(order)
    rows = []
    for name in names:
        has = np.array([name in flags[i] for i in order], dtype=bool)
        k_all = int(has.sum())
        base = k_all / n_all if n_all else 0.0
        for share in shares:
            n_top = min(n_all, max(1, math.ceil(share * n_all)))
            k_top = int(has[:n_top].sum())
            lo, hi = wilson(k_top, n_top)
            p_value = float(hypergeom.sf(k_top - 1, n_all, k_all, n_top)) if n_all else 1.0
            rows.append({"flag": name, "top_share": share, "top_n": n_top, "top_flagged": k_top,
                         "share_in_top": k_top / n_top if n_top else 0.0, "share_in_top_ci": [lo, hi],
                         "ranked": n_all, "flagged": k_all, "share_in_split": base,
                         "enrichment": (k_top / n_top) / base if base else None,
                         "enrichment_ci": [lo / base, hi / base] if base else None, "p_value": p_value})
    return rows


def _path_and_flags(entry: Entry) -> tuple[str, list[str]]:
    """The source path and the packer's flags, from the sample's json (none where it has no json)."""
    if "json" not in entry.members:
        return "", []
    meta = json.loads(read_member(entry.members["json"]))
    return meta.get("path", ""), list(meta.get("flags", []))


def outlier_report(embeddings: dict[str, torch.Tensor], labels: torch.Tensor, entries: list[Entry]
                   ) -> tuple[list[dict], dict]:
    """The model's ranking (one row per ranked image, farthest first: outliers.csv and outliers.png) and the
    report's summary: flag counts over ranked images and the flag enrichment for the model and random init.
    `entries[i]` is the sample of row i of each embedding."""
    info = [_path_and_flags(e) for e in entries]
    flags = [f for _, f in info]
    scores = {name: outlier_scores(embeddings[name], labels) for name in ("model", "random_init")}
    order = ranking(scores["model"])
    rows = [{"rank": r + 1, "index": int(i), "key": entries[i].key, "path": info[i][0], "identity": int(labels[i]),
             "score": round(float(scores["model"][i]), 5), "flags": ",".join(flags[i])} for r, i in enumerate(order)]
    counts = {name: sum(name in flags[i] for i in order) for name in FLAGS}  # over ranked images, as the table
    return rows, {"scoring": SCORING, "intervals": INTERVALS, "ranked": len(order), "flag_counts": counts,
                  "enrichment": {name: enrichment(s, flags) for name, s in scores.items()}}
