"""engine.metrics against maintained implementations, and on embeddings whose answer is known."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.metrics import roc_auc_score

from engine.metrics import precision_at_1, retrieval, roc_auc, tar_at_far, verification


def clustered(n_ids: int, per_id: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_ids, dim, generator=g)
    counts = torch.randint(1, per_id + 1, (n_ids,), generator=g)  # uneven, some singletons
    labels = torch.repeat_interleave(torch.arange(n_ids), counts)
    emb = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return torch.nn.functional.normalize(emb, dim=1), labels


@pytest.mark.parametrize(("spread", "seed"), [(0.3, 0), (1.5, 1), (100.0, 2)])
def test_retrieval_matches_pytorch_metric_learning(spread: float, seed: int) -> None:
    emb, labels = clustered(40, 12, 32, spread, seed)
    ours = retrieval(emb, labels, block=37)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
                              k="max_bin_count", knn_func=CustomKNN(CosineSimilarity()))
    ref = calc.get_accuracy(emb, labels, emb, labels, ref_includes_query=True)
    assert ours.precision_at_1 == pytest.approx(ref["precision_at_1"], abs=1e-6)
    assert ours.map_at_r == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert ours.r_precision == pytest.approx(ref["r_precision"], abs=1e-6)
    assert precision_at_1(emb, labels, block=11) == pytest.approx(ours.precision_at_1, abs=1e-12)


def test_auc_and_tar_match_sklearn_and_the_definition() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(1.0, 1.0, 3000).round(2)  # rounded: many ties
    i = rng.normal(0.0, 1.0, 50_000).round(2)
    y = np.r_[np.ones(len(g)), np.zeros(len(i))]
    assert roc_auc(g, i) == pytest.approx(roc_auc_score(y, np.r_[g, i]), abs=1e-9)
    t = tar_at_far(g, i, 1e-3)
    thr = np.sort(i)[::-1][int(1e-3 * len(i))]
    assert (i > thr).mean() <= 1e-3 and t == (g > thr).mean()


def test_perfect_separation_scores_one_everywhere() -> None:
    labels = torch.arange(30).repeat_interleave(5)
    emb = torch.nn.functional.one_hot(labels, 64).float()
    r = retrieval(emb, labels)
    assert (r.precision_at_1, r.map_at_r, r.r_precision, r.knn_accuracy) == (1.0, 1.0, 1.0, 1.0)
    v = verification(emb, labels)
    assert v["roc_auc"] == 1.0 and v["tar_at_far_1e-3"] == 1.0 and v["tar_at_far_1e-4"] == 1.0
    assert v["verification_accuracy"] == 1.0 and v["impostor_pairs"] >= 1_000_000


def test_random_embeddings_score_chance() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(50).repeat_interleave(20)
    emb = torch.nn.functional.normalize(torch.randn(len(labels), 64, generator=g), dim=1)
    r = retrieval(emb, labels)
    chance = 19 / 999  # another image of the same identity among the 999 others
    assert abs(r.precision_at_1 - chance) < 0.015
    v = verification(emb, labels)
    assert abs(v["roc_auc"] - 0.5) < 0.02
    assert abs(v["verification_accuracy"] - 0.5) < 0.05


def test_ties_are_broken_deterministically_by_index() -> None:
    emb = torch.nn.functional.normalize(torch.ones(6, 4), dim=1)  # all identical
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    # every neighbour ties; the lowest other index wins: row 0 -> 1 (wrong), row 1 -> 0 (wrong), row 2 -> 0 ...
    assert precision_at_1(emb, labels) == pytest.approx(sum([0, 0, 1, 0, 0, 0]) / 6)


MEMORY_SCRIPT = """
import json, resource, torch
from engine.metrics import retrieval, verification
g = torch.Generator().manual_seed(0)
labels = torch.randint(0, 1000, (50_000,), generator=g)
emb = torch.nn.functional.normalize(torch.randn(50_000, 512, generator=g), dim=1)
r = retrieval(emb, labels)
v = verification(emb, labels)
print(json.dumps({"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "p1": r.precision_at_1}))
"""


def test_fifty_thousand_embeddings_within_4_gb() -> None:
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"50,000 x 512 embeddings: peak RSS {result['peak_rss_gb']:.2f} GB")
    assert result["peak_rss_gb"] < 4.0
