"""DALI's colour jitter against torchvision's definitions: fixed factors through
`engine.data.dali_pipeline.colour_jitter` (the function training calls with its random draws) and through
torchvision's functional ops, on real photographs (scikit-image's samples, 96 px)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")
photos_module = pytest.importorskip("skimage.data")

from nvidia.dali import fn, pipeline_def  # noqa: E402
from torchvision.transforms.v2 import ColorJitter  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402

from engine.data.dali_pipeline import _factor, colour_jitter, random_order  # noqa: E402

OPS = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)  # ColorJitter's numbering
NEUTRAL = (1.0, 1.0, 1.0, 0.0)
IN_ORDER = (0, 1, 2, 3)
DEVICES = ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU case runs the same ops")])]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """A face, a cup, a cat, a rocket: skin tones, saturated colours, dark and bright regions."""
    names = ("astronaut", "coffee", "chelsea", "rocket")
    return [np.asarray(Image.fromarray(getattr(photos_module, n)()[..., :3]).resize((96, 96), Image.BILINEAR))
            for n in names]


def dali(images: list[np.ndarray], factors: list[tuple], orders: list[tuple], device: str = "cpu") -> list:
    """`colour_jitter` on sample i with (brightness, contrast, saturation, hue) factors[i] and order orders[i],
    all fed as per-sample tensors, as training's draws are."""

    def column(rows: list[tuple], k: int, dtype: type):
        return fn.external_source(source=lambda: [np.array(r[k], dtype) for r in rows], batch=True)

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=0 if device == "gpu" else None,
                  enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: images, layout="HWC", batch=True)
        x = x.gpu() if device == "gpu" else x
        return colour_jitter(x, *(column(factors, k, np.float32) for k in range(4)),
                             [column(orders, k, np.int32) for k in range(4)])

    p = pipe()
    p.build()
    (out,) = p.run()
    out = out.as_cpu() if device == "gpu" else out
    return [np.asarray(out[i]) for i in range(len(images))]


def torchvision(image: np.ndarray, factors: tuple, order: tuple, pil: bool = True,
                only: int | None = None) -> np.ndarray:
    """ColorJitter's transform with fixed draws: op k at step order[k] (or op `only` alone); on a PIL image
    (what the torch loader runs) or a uint8 tensor (torchvision's float arithmetic)."""
    x = Image.fromarray(image) if pil else torch.from_numpy(image.copy()).permute(2, 0, 1)
    for k in sorted(range(4), key=lambda k: order[k]) if only is None else [only]:
        x = OPS[k](x, factors[k])
    return np.asarray(x) if pil else x.permute(1, 2, 0).numpy()


def grey_levels(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.mean()), float(d.max())


def test_neutral_factors_leave_the_image_unchanged(photos) -> None:
    got = dali(photos, [NEUTRAL] * len(photos), [IN_ORDER] * len(photos))
    assert all(np.array_equal(g, p) for g, p in zip(got, photos, strict=True))


def one_op(photos: list[np.ndarray], op: int, values: tuple[float, ...], device: str = "cpu", pil: bool = True):
    """Op `op` at each value on each photo, the other three neutral (which leaves the image as it is: see the
    test above), against torchvision's op alone (PIL's 8-bit HSV round trip at hue 0 moves pixels by up to
    4 levels): (value, mean, max) grey-level differences."""
    cases = list(itertools.product(values, photos))
    factors = [NEUTRAL[:op] + (v,) + NEUTRAL[op + 1:] for v, _ in cases]
    got = dali([p for _, p in cases], factors, [IN_ORDER] * len(cases), device)
    return [(v, *grey_levels(g, torchvision(p, f, IN_ORDER, pil, only=op)))
            for (v, p), f, g in zip(cases, factors, got, strict=True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("op", "name"), [(0, "brightness"), (1, "contrast"), (2, "saturation")])
def test_brightness_contrast_saturation_match_torchvision_on_pil(photos, device: str, op: int, name: str) -> None:
    """Within rounding: DALI rounds where PIL truncates, and PIL's contrast pivots on the mean grey rounded
    to a level. Contrast pivoting on grey 128 (DALI's default centre) instead fails this by 9-23 levels on
    average at these factors."""
    diffs = one_op(photos, op, (0.2, 0.6, 1.4, 1.8), device)
    assert all(mean <= 1.0 and worst <= 2 for _, mean, worst in diffs), (name, diffs)


@pytest.mark.parametrize("device", DEVICES)
def test_hue_is_torchvisions_hsv_shift(photos, device: str) -> None:
    """Exact against torchvision's float HSV arithmetic; against PIL, whose HSV image stores hue and
    saturation in 8 bits, within that quantisation. A YIQ rotation (DALI's fn.hue) is 10-15 levels off."""
    shifts = (-0.2, -0.05, 0.1, 0.2)
    exact = one_op(photos, 3, shifts, device, pil=False)
    assert all(mean <= 0.15 and worst <= 1 for _, mean, worst in exact), exact
    pil = one_op(photos, 3, shifts, device)
    assert all(mean <= 1.0 and worst <= 10 for _, mean, worst in pil), pil


def test_all_four_in_each_samples_order_match_torchvision(photos) -> None:
    """Strong factors, so clipping makes the order matter; each sample has its own order. Each op's rounding
    (about half a level) is amplified by the gains of the ops after it: up to 2.4 levels on average."""
    factors = [(1.6, 0.4, 1.7, 0.15), (0.5, 1.8, 0.3, -0.2)]
    orders = [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1)]
    cases = list(itertools.product(photos, factors, orders))
    got = dali([p for p, _, _ in cases], [f for _, f, _ in cases], [o for _, _, o in cases])
    diffs = [grey_levels(g, torchvision(p, f, o)) for (p, f, o), g in zip(cases, got, strict=True)]
    assert all(mean <= 3.0 for mean, _ in diffs) and np.mean([mean for mean, _ in diffs]) <= 1.5, diffs
    swapped = [grey_levels(g, torchvision(p, f, orders[(orders.index(o) + 1) % 4]))[0]
               for (p, f, o), g in zip(cases, got, strict=True)]
    assert np.mean(swapped) > 5, "another order gives about the same images: this test cannot see the order"


def test_random_order_is_a_uniform_permutation() -> None:
    """torch.randperm's distribution: each of the 24 orders about equally often."""

    @pipeline_def(batch_size=480, num_threads=1, device_id=None, seed=5)
    def pipe():
        return tuple(random_order(4))

    p = pipe()
    p.build()
    orders = []
    for _ in range(5):
        steps = [np.asarray(t.as_tensor()).reshape(-1) for t in p.run()]
        orders += list(zip(*(s.tolist() for s in steps), strict=True))
    counts = {o: orders.count(o) for o in itertools.permutations(range(4))}
    assert sum(counts.values()) == len(orders) == 2400, "every draw is a permutation of the four steps"
    assert min(counts.values()) > 60 and max(counts.values()) < 140, counts  # 100 expected, sd 10


def test_factors_are_drawn_from_torchvisions_ranges() -> None:
    """U(max(0, 1 - spread), 1 + spread): at colour strength s = 2 (spread 1.6) a factor never goes negative."""
    spreads = (0.4, 0.8, 1.6)

    @pipeline_def(batch_size=500, num_threads=1, device_id=None, seed=3)
    def pipe():
        return tuple(_factor(s) for s in spreads)

    p = pipe()
    p.build()
    for spread, draws in zip(spreads, p.run(), strict=True):
        lo, hi = ColorJitter(brightness=spread).brightness
        x = np.asarray(draws.as_tensor()).reshape(-1)
        edge = 0.02 * (hi - lo)  # 500 draws come within 2% of each end but for a 2e-5 chance
        assert lo <= x.min() < lo + edge and hi - edge < x.max() <= hi, (spread, x.min(), x.max())
