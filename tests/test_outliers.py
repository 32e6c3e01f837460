"""Outlier scores and the flag enrichment, against brute force and scipy's own intervals and tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from engine.outliers import enrichment, outlier_scores, ranking, wilson


def test_scores_are_leave_one_out_centroid_distances() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    emb = torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=1)
    scores = outlier_scores(emb, labels)
    for i in range(10):
        others = [j for j in range(10) if labels[j] == labels[i] and j != i]
        if not others:
            assert np.isnan(scores[i])
            continue
        centre = torch.nn.functional.normalize(emb[others].sum(0), dim=0)
        assert scores[i] == pytest.approx(1 - float(emb[i] @ centre), abs=1e-6)
    assert 5 not in ranking(scores) and len(ranking(scores)) == 9


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 41), (9, 9), (76, 802), (1, 1)])
def test_wilson_interval_is_scipys(k: int, n: int) -> None:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_enrichment_counts_intervals_and_p_values() -> None:
    """200 ranked images, 10 flagged 'streaks' of which the 4 highest scores; one unranked image."""
    rng = np.random.default_rng(0)
    scores = np.append(rng.random(200), np.nan)
    order = np.argsort(-scores[:200])
    flags: list[list[str]] = [[] for _ in range(201)]
    for i in [*order[:4], *order[100:106]]:
        flags[i] = ["streaks"]
    flags[200] = ["streaks", "grayscale"]  # unranked: counts nowhere
    rows = {(r["flag"], r["top_share"]): r for r in enrichment(scores, flags)}
    top1, top5 = rows[("streaks", 0.01)], rows[("streaks", 0.05)]
    assert (top1["top_n"], top1["top_flagged"], top1["flagged"], top1["ranked"]) == (2, 2, 10, 200)
    assert (top5["top_n"], top5["top_flagged"]) == (10, 4)
    assert top5["enrichment"] == pytest.approx((4 / 10) / (10 / 200))
    assert top5["enrichment_ci"] == pytest.approx([b / (10 / 200) for b in wilson(4, 10)])
    p = sum(math.comb(10, j) * math.comb(190, 10 - j) for j in range(4, 11)) / math.comb(200, 10)
    assert top5["p_value"] == pytest.approx(p, rel=1e-9)
    gray = rows[("grayscale", 0.05)]
    assert gray["flagged"] == 0 and gray["enrichment"] is None and gray["p_value"] == 1.0
