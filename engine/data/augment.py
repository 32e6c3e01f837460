"""The SimCLR augmentations as one dataclass, shared by the DALI pipeline and the torch baseline so both
draw from the same distributions, and the normalisation as a module that can run inside the model.

The recipe (Chen et al. 2020, appendix A), applied to each of the two views independently:
- random resized crop: area uniform in 8%-100% of the image, aspect ratio log-uniform in [3/4, 4/3],
  resized to the output side;
- horizontal flip with probability 0.5;
- colour jitter with probability 0.8: brightness, contrast and saturation factors uniform in
  [max(0, 1 - 0.8 s), 1 + 0.8 s], hue shift uniform in [-0.2 s, 0.2 s] of the colour circle (s = 1),
  the four in a random order (torchvision's ColorJitter: contrast around the image's mean grey, hue in HSV);
- grayscale with probability 0.2;
- Gaussian blur with probability 0.5, sigma uniform in [0.1, 2.0], kernel about 10% of the side;
- normalisation by the ImageNet channel mean and standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


class Normalize(torch.nn.Module):
    """uint8 views (0-255, any memory format) -> normalised floats, as one fused op inside a compiled model.

    The loaders can hand over raw uint8 pixels (`LoaderConfig.handover = "uint8"`: a quarter of fp32's bytes
    from the loader to the device); this module then does the cast and the normalisation where
    torch.compile fuses them into the first convolution's input. `x * (1 / (255 std)) - mean / std` equals
    `(x / 255 - mean) / std` to float rounding; elementwise ops keep channels-last inputs channels-last.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t,
                             persistent=False)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return (views.float() * self.scale + self.shift).to(self.dtype)
