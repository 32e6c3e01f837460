"""Embedding metrics, computed in blocks of queries so that N embeddings never need an N x N matrix, on
whatever device the embeddings are on. docs/evaluation.md defines each figure and its protocol.

Embeddings are L2-normalised rows; similarity is their dot product (cosine). Ranking ties are broken
by the candidate's index (lower first), so every figure is deterministic. Two families:
- identity metrics on a labelled split (retrieval, and verification over pairs drawn from the labels);
- pair-list verification (`pair_verification`): the fixed pairs of LFW-style benchmarks, scored with the
  LFW / insightface protocol (squared L2 distance, best threshold from the other nine folds).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 512
KNN_K = 20
KNN_T = 0.07


def _ranked_neighbours(emb: torch.Tensor, k: int, block: int = BLOCK
                       ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """For each block of queries: the top-k other rows (self excluded), most similar first, ties by index."""
    n = emb.shape[0]
    # float64 ranking key: similarity minus a tie-breaker far below float32's resolution at 1.0 (6e-8)
    tiebreak = torch.arange(n, device=emb.device, dtype=torch.float64) * (1e-9 / max(n, 1))
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sims = (emb[lo:hi] @ emb.T).double() - tiebreak
        sims[torch.arange(hi - lo), torch.arange(lo, hi)] = float("-inf")
        top = torch.topk(sims, k, dim=1)
        yield slice(lo, hi), top.indices, (top.values + tiebreak[top.indices]).float()


@dataclass
class Retrieval:
    precision_at_1: float
    map_at_r: float
    r_precision: float
    knn_accuracy: float
    queries: int


def retrieval(emb: torch.Tensor, labels: torch.Tensor, block: int = BLOCK) -> Retrieval:
    """precision@1, MAP@R, R-precision and weighted 20-NN accuracy over queries that have another image
    of their identity; queries without one stay in the gallery as distractors."""
    n = emb.shape[0]
    labels = labels.to(emb.device)
    counts = torch.bincount(labels)
    r_all = counts[labels] - 1
    k = int(min(n - 1, max(int(r_all.max()), KNN_K)))
    p1 = mapr = rprec = knn = 0.0
    queries = 0
    classes = int(labels.max()) + 1
    for rows, idx, sims in _ranked_neighbours(emb, k, block):
        q_labels = labels[rows]
        r = r_all[rows]
        valid = r > 0
        rel = (labels[idx] == q_labels[:, None]).float()
        ranks = torch.arange(1, k + 1, device=emb.device)
        within_r = (ranks[None, :] <= r[:, None]).float()
        rel_r = rel * within_r
        precision_at_i = torch.cumsum(rel_r, dim=1) / ranks[None, :]
        r_safe = r.clamp(min=1).float()
        p1 += float(rel[valid, 0].sum())
        rprec += float((rel_r.sum(1) / r_safe)[valid].sum())
        mapr += float(((precision_at_i * rel_r).sum(1) / r_safe)[valid].sum())
        kk = min(KNN_K, k)
        votes = torch.zeros(len(q_labels), classes, device=emb.device)
        votes.scatter_add_(1, labels[idx[:, :kk]], torch.exp(sims[:, :kk] / KNN_T))
        knn += float((votes.argmax(1) == q_labels)[valid].sum())
        queries += int(valid.sum())
    if queries == 0:
        raise ValueError("no identity has two images: retrieval is undefined")
    return Retrieval(p1 / queries, mapr / queries, rprec / queries, knn / queries, queries)


def precision_at_1(emb: torch.Tensor, labels: torch.Tensor, block: int = BLOCK) -> float:
    """Share of queries whose nearest other image shares their identity (queries with no other image of
    their identity excluded). The training loop's online monitor calls this."""
    labels = labels.to(emb.device)
    has_pair = (torch.bincount(labels)[labels] - 1) > 0
    hits = 0
    for rows, idx, _ in _ranked_neighbours(emb, 1, block):
        hits += int(((labels[idx[:, 0]] == labels[rows]) & has_pair[rows]).sum())
    return hits / max(int(has_pair.sum()), 1)


# -- verification ---------------------------------------------------------------------------------

GENUINE_CAP = 500_000
FARS = (1e-3, 1e-4)
IMPOSTOR_FACTOR = 100
"""Impostor pairs: at least this many times the 1/FAR that the smallest FAR needs (1e6 for 1e-4)."""


def _genuine_pairs(labels: np.ndarray, rng: np.random.Generator, cap: int) -> np.ndarray:
    pairs = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > 1:
            i, j = np.triu_indices(len(idx), 1)
            pairs.append(np.stack([idx[i], idx[j]], 1))
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), int)
    if len(pairs) > cap:
        pairs = pairs[np.sort(rng.choice(len(pairs), cap, replace=False))]
    return pairs


def _impostor_pairs(labels: np.ndarray, rng: np.random.Generator, n: int, pool: np.ndarray | None = None) -> np.ndarray:
    """`n` random pairs of images of different identities, drawn with replacement from `pool`."""
    pool = np.arange(len(labels)) if pool is None else pool
    if len(np.unique(labels[pool])) < 2:
        raise ValueError("impostor pairs need at least two identities")
    out = np.zeros((0, 2), int)
    while len(out) < n:
        a, b = rng.choice(pool, (2, 2 * (n - len(out)) + 16))
        keep = labels[a] != labels[b]
        out = np.concatenate([out, np.stack([a[keep], b[keep]], 1)])
    return out[:n]


def _scores(emb: torch.Tensor, pairs: np.ndarray, block: int = 1 << 15) -> np.ndarray:
    """Cosine similarity of each pair: looked up in the N x N Gram matrix when that is smaller than the pair
    list (a 1,000-image split with 1,000,000 pairs), else gathered pair by pair in blocks."""
    n = emb.shape[0]
    if n * n <= len(pairs):
        gram = (emb @ emb.T).float().cpu().numpy()
        return gram[pairs[:, 0], pairs[:, 1]] if len(pairs) else np.zeros(0, np.float32)
    out = []
    for lo in range(0, len(pairs), block):
        p = torch.from_numpy(pairs[lo:lo + block]).to(emb.device)
        out.append((emb[p[:, 0]] * emb[p[:, 1]]).sum(1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Probability that a genuine pair outscores an impostor pair (ties count half): the ROC area."""
    scores = np.concatenate([genuine, impostor])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2
    ranks[order] = np.repeat(avg, counts)
    n_g, n_i = len(genuine), len(impostor)
    return float((ranks[:n_g].sum() - n_g * (n_g + 1) / 2) / (n_g * n_i))


def far_thresholds(impostor: np.ndarray, fars: np.ndarray | float) -> np.ndarray:
    """The threshold of each false accept rate: the impostor score that at most `far` of the impostor pairs
    exceed (the floor(far x N)-th highest of N, counting from 0), or -inf where every impostor may pass.
    TAR@FAR and the ROC curve both use this one rule."""
    imp = np.sort(impostor)[::-1]
    allowed = np.floor(np.asarray(fars) * len(imp)).astype(int)
    return np.where(allowed < len(imp), imp[np.minimum(allowed, len(imp) - 1)], -np.inf)


def tar_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """Share of genuine pairs above the threshold that at most `far` of impostor pairs exceed."""
    return float((genuine > far_thresholds(impostor, far)).mean())


def roc_curve(genuine: np.ndarray, impostor: np.ndarray, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(FAR, TAR) on a log grid of FAR from 1/len(impostor) to 1: `tar_at_far` at each FAR, genuine sorted once."""
    fars = np.geomspace(max(1.0 / len(impostor), 1e-6), 1.0, points)
    gen = np.sort(genuine)
    above = len(gen) - np.searchsorted(gen, far_thresholds(impostor, fars), side="right")
    return fars, above / len(gen)


MIN_IMPOSTORS_ABOVE = 10
"""TAR@FAR=f rests on the floor(f x N) highest of N impostor scores. With fewer than 10 of them above the
threshold (N under 10/f), the false accept rate met there is uncertain by a third or more (Poisson: one
over the square root of the count), and at N under 1/f the threshold is the highest impostor score (TAR at
a FAR of 0 on this sample). Such a figure is reported with its impostor-pair count and a caveat."""


def far_name(far: float) -> str:
    """1e-3 for 0.001: how the report names a false accept rate (`tar_at_far_1e-3`)."""
    return f"{far:.0e}".replace("e-0", "e-")


def far_caveat(far: float, impostors: int) -> str | None:
    """One sentence when TAR@FAR=`far` rests on too few of `impostors` pairs (MIN_IMPOSTORS_ABOVE), else None."""
    above = int(np.floor(far * impostors))
    if above >= MIN_IMPOSTORS_ABOVE:
        return None
    enough = f"{MIN_IMPOSTORS_ABOVE / far:,.0f} pairs or more put {MIN_IMPOSTORS_ABOVE} above it"
    where = ("none may lie above its threshold, so it is the TAR above the highest impostor score" if above == 0
             else f"{above} of them above its threshold")
    return (f"TAR@FAR={far_name(far)} rests on {impostors:,} impostor pairs: {where} ({enough}); a rough figure, "
            "not one to compare models by")


def _best_threshold(g: np.ndarray, i: np.ndarray) -> float:
    candidates = np.unique(np.concatenate([g, i]))
    acc = [((g > t).sum() + (i <= t).sum()) / (len(g) + len(i)) for t in candidates[:: max(1, len(candidates) // 2000)]]
    return float(candidates[:: max(1, len(candidates) // 2000)][int(np.argmax(acc))])


def verification(emb: torch.Tensor, labels: torch.Tensor, seed: int = 0, folds: int = 10) -> dict:
    """ROC AUC, TAR@FAR and LFW-style 10-fold accuracy (identity-disjoint folds, balanced pairs, threshold
    chosen on the other nine folds; fewer folds when there are under 20 identities), with the pair counts
    behind each figure."""
    rng = np.random.default_rng(seed)
    lab = labels.cpu().numpy()
    if len(np.unique(lab)) < 2:
        raise ValueError(f"verification needs at least two identities; these {len(lab)} images have "
                         f"{len(np.unique(lab))}")
    genuine = _genuine_pairs(lab, rng, GENUINE_CAP)
    if len(genuine) == 0:
        raise ValueError("verification needs an identity with two images; every identity here has one")
    n_imp = int(IMPOSTOR_FACTOR / min(FARS))
    impostor = _impostor_pairs(lab, rng, n_imp)
    g, i = _scores(emb, genuine), _scores(emb, impostor)
    out = {"roc_auc": roc_auc(g, i), "genuine_pairs": len(g), "impostor_pairs": len(i)}
    for far in FARS:
        out[f"tar_at_far_{far_name(far)}"] = tar_at_far(g, i, far)
    caveats = {f"tar_at_far_{far_name(far)}": c for far in FARS if (c := far_caveat(far, len(i)))}
    if caveats:  # never with IMPOSTOR_FACTOR's pair count; kept so that the rule holds wherever TAR@FAR is
        out["caveats"] = caveats

    ids = np.unique(lab)
    folds = min(folds, len(ids) // 2)  # every fold needs two identities for impostor pairs
    fold_of_id = dict(zip(rng.permutation(ids), np.arange(len(ids)) % folds, strict=True))
    fold = np.array([fold_of_id[c] for c in lab])
    fold_pairs = []
    for f in range(folds):
        members = np.flatnonzero(fold == f)
        gp = genuine[(fold[genuine[:, 0]] == f)]
        if len(gp) == 0 or len(np.unique(lab[members])) < 2:
            continue
        n = min(len(gp), 3000)
        gp = gp[rng.choice(len(gp), n, replace=False)]
        ip = _impostor_pairs(lab, rng, n, pool=members)
        fold_pairs.append((_scores(emb, gp), _scores(emb, ip)))
    accs = []
    for k, (gk, ik) in enumerate(fold_pairs if len(fold_pairs) > 1 else []):  # a threshold needs other folds
        g_rest = np.concatenate([p[0] for j, p in enumerate(fold_pairs) if j != k])
        i_rest = np.concatenate([p[1] for j, p in enumerate(fold_pairs) if j != k])
        t = _best_threshold(g_rest, i_rest)
        accs.append(((gk > t).sum() + (ik <= t).sum()) / (len(gk) + len(ik)))
    out["verification_accuracy"] = float(np.mean(accs)) if accs else float("nan")
    out["verification_accuracy_std"] = float(np.std(accs)) if accs else float("nan")
    out["verification_folds"] = len(accs)
    out["verification_pairs"] = int(sum(len(a) + len(b) for a, b in fold_pairs))
    out["_curves"] = (g, i)
    return out


# -- pair-list verification (LFW pairs.txt, insightface .bin) -------------------------------------

THRESHOLDS = np.arange(0, 4, 0.01)
"""Squared-L2 thresholds swept on unit vectors (distance 0 to 4), as insightface's verification.py."""
PAIR_FARS = (1e-3,)


def file_order_folds(n: int, folds: int = 10) -> np.ndarray:
    """Fold of each of `n` items in file order: contiguous blocks, the first `n % folds` one item longer
    (scikit-learn's `KFold(n_splits=folds, shuffle=False)`)."""
    if n < folds:
        raise ValueError(f"{n} pairs cannot make {folds} folds")
    sizes = np.full(folds, n // folds) + (np.arange(folds) < n % folds)
    return np.repeat(np.arange(folds), sizes)


def pair_distances(emb1: torch.Tensor, emb2: torch.Tensor) -> np.ndarray:
    """Squared L2 distance between row i of each (unit) embedding matrix: 2 - 2 cos."""
    return ((emb1.double() - emb2.double()) ** 2).sum(1).cpu().numpy()


def _accuracy(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of `same iff dist < t` for every t."""
    predicted = dist[None, :] < thresholds[:, None]
    return (predicted == issame[None, :]).mean(1)


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, fold: np.ndarray, thresholds: np.ndarray = THRESHOLDS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per fold: the accuracy on the fold at the threshold that is best on all other folds (the first such
    threshold of the sweep), and that threshold."""
    accs, chosen = [], []
    for f in np.unique(fold):
        test = fold == f
        best = int(np.argmax(_accuracy(dist[~test], issame[~test], thresholds)))
        chosen.append(thresholds[best])
        accs.append(float(_accuracy(dist[test], issame[test], thresholds[best:best + 1])[0]))
    return np.array(accs), np.array(chosen)


def pair_verification(dist: np.ndarray, issame: np.ndarray, fold: np.ndarray) -> dict:
    """The benchmark protocol on fixed pairs: 10-fold accuracy (mean and std over folds, threshold from the
    other folds), ROC AUC and TAR@FAR=1e-3 over all pairs, similarity = -distance."""
    issame = np.asarray(issame, dtype=bool)
    if issame.all() or not issame.any():
        raise ValueError("the pairs must include both matched and mismatched pairs")
    accs, thresholds = kfold_accuracy(dist, issame, fold)
    genuine, impostor = -dist[issame], -dist[~issame]
    out = {"accuracy": float(accs.mean()), "accuracy_std": float(accs.std()), "roc_auc": roc_auc(genuine, impostor)}
    for far in PAIR_FARS:
        out[f"tar_at_far_{far_name(far)}"] = tar_at_far(genuine, impostor, far)
    out.update({"fold_accuracies": [round(float(a), 6) for a in accs],
                "thresholds": [round(float(t), 4) for t in thresholds], "pairs": len(dist),
                "matched_pairs": int(issame.sum()), "impostor_pairs": len(impostor), "folds": len(accs)})
    caveats = {f"tar_at_far_{far_name(far)}": c for far in PAIR_FARS if (c := far_caveat(far, len(impostor)))}
    if caveats:
        out["caveats"] = caveats
    out["_curves"] = (genuine, impostor)
    return out


# -- one network's figures, as the report holds them ------------------------------------------------

def score_split(emb: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """Identity metrics of one embedding of a labelled split (retrieval and verification); `_curves` holds the
    (genuine, impostor) scores for the ROC picture."""
    r = retrieval(emb, labels)
    block = {"precision_at_1": r.precision_at_1, "map_at_r": r.map_at_r, "r_precision": r.r_precision,
             "knn_accuracy": r.knn_accuracy, "retrieval_queries": r.queries}
    block.update(verification(emb, labels, seed=seed))
    return block


def score_pairs(emb: torch.Tensor, pairs: np.ndarray, issame: np.ndarray, fold: np.ndarray) -> dict:
    """The benchmark protocol (`pair_verification`) on one embedding of a pair list's images."""
    return pair_verification(pair_distances(emb[pairs[:, 0]], emb[pairs[:, 1]]), issame, fold)
