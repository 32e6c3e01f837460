"""The SimCLR augmentations (REFERENCE.md §2) as one dataclass, shared by the DALI pipeline and the
torch baseline so both draw from the same distributions."""

from __future__ import annotations

import math
from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Each view independently: random resized crop, flip, colour jitter, grayscale, blur, normalise."""

    size: int = 224
    """Output side in pixels."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Random resized crop: range of the crop's area as a share of the image."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Random resized crop: range of width / height (sampled uniformly in log space)."""
    flip_p: float = 0.5
    jitter_p: float = 0.8
    """Probability of colour jitter (brightness, contrast, saturation 0.8 s; hue 0.2 s)."""
    strength: float = 1.0
    """The paper's colour strength s."""
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    """Gaussian kernel side as a share of the output side (made odd)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def brightness(self) -> float:
        return 0.8 * self.strength

    @property
    def contrast(self) -> float:
        return 0.8 * self.strength

    @property
    def saturation(self) -> float:
        return 0.8 * self.strength

    @property
    def hue(self) -> float:
        return 0.2 * self.strength

    @property
    def blur_kernel(self) -> int:
        k = max(3, int(round(self.size * self.blur_kernel_frac)))
        return k if k % 2 else k + 1

    @property
    def log_ratio(self) -> tuple[float, float]:
        return math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
