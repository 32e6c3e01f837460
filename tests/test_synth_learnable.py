"""Identity in the synthetic faces is learnable from shape, and colour alone does not give it away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage.feature import hog

from pack.synth import SynthConfig, generate


def colour_histogram(img: Image.Image) -> np.ndarray:
    """Joint 8x8x8 RGB histogram (square-rooted): everything colour says, nothing about shape."""
    a = np.asarray(img.resize((64, 64))) // 32
    h = np.bincount((a[..., 0] * 64 + a[..., 1] * 8 + a[..., 2]).ravel(), minlength=512).astype(float)
    return np.sqrt(h / h.sum())


def hog_feature(img: Image.Image) -> np.ndarray:
    """Histogram of oriented gradients on a 64 px grayscale face: shape, no colour."""
    gray = np.asarray(img.convert("L").resize((64, 64)), dtype=float) / 255
    return hog(gray, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2))


def nearest_neighbour_accuracy(features: np.ndarray, ids: np.ndarray, seed: int = 0) -> float:
    """Half of each identity's images are the gallery, the other half are held-out queries."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    gallery = np.zeros(len(ids), bool)
    for i in np.unique(ids):
        idx = np.flatnonzero(ids == i)
        rng.shuffle(idx)
        gallery[idx[: len(idx) // 2]] = True
    query = ~gallery & np.isin(ids, ids[gallery])
    best = (f[query] @ f[gallery].T).argmax(axis=1)
    return float((ids[gallery][best] == ids[query]).mean())


def test_shape_identifies_and_colour_does_not(tmp_path: Path) -> None:
    truth = generate(SynthConfig(identities=40, median_images=12, dirt={}), tmp_path, workers=2, progress=False)
    paths = sorted(truth["images"])
    ids = np.array([truth["images"][p]["identity"] for p in paths])
    images = [Image.open(tmp_path / "imdb_crop" / p).convert("RGB") for p in paths]
    by_colour = nearest_neighbour_accuracy(np.stack([colour_histogram(i) for i in images]), ids)
    by_shape = nearest_neighbour_accuracy(np.stack([hog_feature(i) for i in images]), ids)
    chance = 1 / len(np.unique(ids))
    print(f"1-NN on held-out images: colour {by_colour:.3f}, HOG {by_shape:.3f}, chance {chance:.3f}")
    assert by_shape > 0.3, "a shape-aware feature identifies faces well above chance"
    assert by_shape > 2 * by_colour, "colour alone scores well below shape"
    assert by_colour < 0.3
