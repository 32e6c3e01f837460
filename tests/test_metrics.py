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
from sklearn.model_selection import KFold

from engine.metrics import (
    MIN_IMPOSTORS_ABOVE,
    _impostor_pairs,
    far_caveat,
    file_order_folds,
    pair_verification,
    precision_at_1,
    retrieval,
    roc_auc,
    roc_curve,
    tar_at_far,
    verification,
)


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


@pytest.mark.slow
def test_fifty_thousand_embeddings_within_4_gb() -> None:
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"50,000 x 512 embeddings: peak RSS {result['peak_rss_gb']:.2f} GB")
    assert result["peak_rss_gb"] < 4.0


# -- guards ------------------------------------------------------------------------------------------

def test_one_identity_is_refused_not_looped_on() -> None:
    """_impostor_pairs used to loop for ever when every image had one identity."""
    labels = torch.zeros(8, dtype=torch.long)
    emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    with pytest.raises(ValueError, match="at least two identities"):
        verification(emb, labels)
    with pytest.raises(ValueError, match="at least two identities"):
        _impostor_pairs(labels.numpy(), np.random.default_rng(0), 10)
    with pytest.raises(ValueError, match="an identity with two images"):
        verification(emb, torch.arange(8))


def test_few_identities_give_no_fold_accuracy_rather_than_a_crash() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    v = verification(torch.nn.functional.normalize(torch.randn(6, 4), dim=1), labels)
    assert v["verification_folds"] == 0 and np.isnan(v["verification_accuracy"]) and 0 <= v["roc_auc"] <= 1


# -- the pair-list protocol (LFW pairs.txt, insightface .bin) ---------------------------------------

@pytest.mark.parametrize("n", [10, 80, 6000, 7003])
def test_file_order_folds_are_sklearn_kfold(n: int) -> None:
    fold = file_order_folds(n)
    for f, (_, test) in enumerate(KFold(n_splits=10, shuffle=False).split(np.zeros(n))):
        assert np.array_equal(np.flatnonzero(fold == f), test)


@pytest.mark.parametrize(("n", "seed"), [(6000, 0), (7003, 1), (600, 2)])
def test_pair_protocol_equals_an_independent_sweep(n: int, seed: int) -> None:
    """Accuracy per fold at the threshold (0..4 by 0.01) best on the other folds, written out again with
    scikit-learn's KFold; AUC against roc_auc_score."""
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    dist = np.clip(np.where(issame, rng.normal(0.9, 0.35, n), rng.normal(1.5, 0.35, n)), 0, 4)
    ours = pair_verification(dist, issame, file_order_folds(n))
    thresholds = np.arange(0, 4, 0.01)
    accs, chosen = [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(dist):
        best = thresholds[np.argmax([np.mean((dist[train] < t) == issame[train]) for t in thresholds])]
        chosen.append(best)
        accs.append(np.mean((dist[test] < best) == issame[test]))
    assert ours["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert ours["accuracy_std"] == pytest.approx(np.std(accs), abs=1e-12)
    assert ours["thresholds"] == pytest.approx(chosen, abs=1e-9)
    assert ours["roc_auc"] == pytest.approx(roc_auc_score(issame, -dist), abs=1e-9)
    assert 0.75 < ours["accuracy"] < 0.9 and ours["folds"] == 10 and ours["pairs"] == n


def test_pair_protocol_needs_both_kinds_of_pair() -> None:
    with pytest.raises(ValueError, match="both matched and mismatched"):
        pair_verification(np.ones(20), np.ones(20, bool), file_order_folds(20))


def test_roc_curve_is_tar_at_far_at_every_point() -> None:
    rng = np.random.default_rng(3)
    g, i = rng.normal(1, 1, 500).round(1), rng.normal(0, 1, 20_000).round(1)
    fars, tars = roc_curve(g, i, points=50)
    assert np.array_equal(tars, [tar_at_far(g, i, f) for f in fars])


def test_a_tar_at_far_on_too_few_impostor_pairs_carries_its_caveat() -> None:
    """The rule: TAR@FAR=f is caveated when fewer than MIN_IMPOSTORS_ABOVE impostor pairs lie above its threshold
    (fewer than 10/f pairs); the split's million impostor pairs never are, a benchmark's few thousand always."""
    assert MIN_IMPOSTORS_ABOVE == 10
    assert far_caveat(1e-3, 10_000) is None and far_caveat(1e-4, 1_000_000) is None
    assert "9,999 impostor pairs: 9 of them above its threshold" in far_caveat(1e-3, 9_999)
    assert "3,000 impostor pairs: 3 of them above" in far_caveat(1e-3, 3_000)  # LFW's mismatched pairs
    assert "150 impostor pairs: none may lie above its threshold" in far_caveat(1e-3, 150)

    rng = np.random.default_rng(0)
    n = 60
    issame = np.arange(n) % 3 == 0
    block = pair_verification(rng.uniform(0, 4, n), issame, file_order_folds(n))
    assert block["impostor_pairs"] == 40 and block["matched_pairs"] == 20
    assert list(block["caveats"]) == ["tar_at_far_1e-3"] and "40 impostor pairs" in block["caveats"]["tar_at_far_1e-3"]
    emb, labels = clustered(12, 6, 8, 0.5, seed=4)
    assert "caveats" not in verification(emb, labels)
