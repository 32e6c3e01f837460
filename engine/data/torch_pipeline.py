"""The original project's way, kept as the baseline and the fallback where DALI is missing:
PIL decode and torchvision.transforms.v2 in DataLoader workers, with the same augmentation config.

Samples are read by offset through the DALI indexes (a map-style dataset) rather than streamed with
`webdataset`: streaming splits work by shard, which gives ranks unequal step counts (a DDP hang), and
it cannot resume mid-epoch. Each sample's augmentation is seeded by (seed, epoch, index), so the
stream is the same whatever the worker count, and resume is exact.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from engine.data.augment import AugmentConfig
from engine.data.shards import Entry, read_member


def simclr_transform(cfg: AugmentConfig) -> T.Compose:
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.gray_p),
        T.RandomApply([T.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)], p=cfg.blur_p),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(cfg.mean, cfg.std),
    ])


def eval_transform(cfg: AugmentConfig) -> T.Compose:
    """One centred view: the stored image is already a centre crop; only its size may change."""
    return T.Compose([T.ToImage(), T.Resize(cfg.size, antialias=True), T.CenterCrop(cfg.size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(cfg.mean, cfg.std)])


def decode(entry: Entry) -> Image.Image:
    return Image.open(io.BytesIO(read_member(entry.members["jpg"]))).convert("RGB")


def label(entry: Entry) -> int:
    return int(read_member(entry.members["cls"]).decode())


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class TwoViews(torch.utils.data.Dataset):
    """Item (index, epoch) -> (view1, view2, label), seeded by (seed, epoch, index)."""

    def __init__(self, entries: list[Entry], cfg: AugmentConfig, seed: int, with_source: bool = False):
        self.entries, self.cfg, self.seed, self.with_source = entries, cfg, seed, with_source
        self.transform = simclr_transform(cfg)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: tuple[int, int]):
        index, epoch = item
        image = decode(self.entries[index])
        torch.manual_seed(sample_seed(self.seed, epoch, index))
        out = (self.transform(image), self.transform(image), label(self.entries[index]))
        if self.with_source:
            out += (T.functional.pil_to_tensor(image),)
        return out


class OneView(torch.utils.data.Dataset):
    def __init__(self, entries: list[Entry], cfg: AugmentConfig):
        self.entries, self.transform = entries, eval_transform(cfg)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        e = self.entries[index]
        return self.transform(decode(e)), label(e), e.key


def epoch_batches(n: int, batch: int, steps: int, rank: int, world: int, seed: int, epoch: int, start: int
                  ) -> list[list[tuple[int, int]]]:
    """This rank's batches of (index, epoch): a seeded permutation per epoch, dealt round-robin, the same
    number of full batches on every rank, from step `start` on."""
    order = np.random.default_rng([seed, epoch]).permutation(n)[rank::world][: steps * batch]
    return [[(int(i), epoch) for i in order[s * batch:(s + 1) * batch]] for s in range(start, steps)]
