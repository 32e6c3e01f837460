"""The baseline, and the fallback where DALI is missing: what a user of the original project or of lightly
runs. The shards are read by the `webdataset` library, decoded by PIL, and each view made by PIL-based
torchvision transforms (the ones lightly's `SimCLRTransform` composes) in DataLoader workers.

Per epoch and rank the reading follows DALI's reader: the shards, in an order seeded by (seed, epoch), form
one sequence of samples; rank r takes the r-th of `world` equal contiguous ranges (the tail that makes no
full batch is left out), cuts it into `steps` batches, and its DataLoader worker L makes batches
L, L + W, ... from its own sub-range, through a seeded shuffle buffer. So every rank gets exactly `steps`
batches, the ranks' samples are disjoint, and resuming at step k re-reads only the tar headers before it
(decoding nothing) and then gives exactly the batches an uninterrupted run would (same world size and
`workers`). Each view's randomness is seeded by (seed, epoch, sample position), whatever worker makes it.

For a GPU the views leave the workers as uint8 HWC tensors and ToTensor's scaling and Normalize run on the
batch on the device (the same arithmetic, a quarter of the bytes through shared memory and over PCIe); for
the CPU they run in the workers, as in lightly's transform, where the cores work in parallel.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageFilter

from base.signals import ignore_stop_signals, stop_signals_held
from engine.data.augment import AugmentConfig
from engine.data.errors import DecodeError
from engine.data.shards import Entry, ShardError, Split, read_member
from pack.format import decode_label


class PILGaussianBlur:
    """Gaussian blur with probability p, sigma ~ U(sigma): PIL's own filter, as lightly and the original
    project use (torchvision's blur turns a PIL image into a tensor and back); drawn from torch's RNG."""

    def __init__(self, p: float, sigma: tuple[float, float]):
        self.p, self.sigma = p, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(()) >= self.p:
            return image
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def simclr_view(cfg: AugmentConfig) -> T.Compose:
    """PIL image -> one augmented PIL view (normalisation comes later, on the batch)."""
    return T.Compose([
        T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        T.RandomHorizontalFlip(cfg.flip_p),
        T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.gray_p),
        PILGaussianBlur(cfg.blur_p, cfg.blur_sigma),
    ])


def eval_transform(cfg: AugmentConfig) -> T.Compose:
    """One centred view: the stored image is already a centre crop; only its size may change."""
    return T.Compose([T.ToImage(), T.Resize(cfg.size, antialias=True), T.CenterCrop(cfg.size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(cfg.mean, cfg.std)])


def decode(entry: Entry) -> Image.Image:
    return Image.open(io.BytesIO(read_member(entry.members["jpg"]))).convert("RGB")


def label(entry: Entry) -> int:
    return decode_label(read_member(entry.members["cls"]))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def _shuffle_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, stream, 1]).generate_state(1)[0])


def hwc_uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())


def two_views(image: Image.Image, transform: T.Compose, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views of one image as HxWx3 uint8, drawn from torch's RNG seeded with `seed`."""
    torch.manual_seed(seed)
    return hwc_uint8(transform(image)), hwc_uint8(transform(image))


class SimCLRViews:
    """image, seed -> the two views as HxWx3 uint8, or normalised float32 with `normalize` (the workers'
    default; another callable can stand in, e.g. for a bench)."""

    def __init__(self, aug: AugmentConfig, normalize: bool = False):
        self.transform = simclr_view(aug)
        std = torch.tensor(aug.std)
        self.scale, self.shift = (1.0 / (255.0 * std), -torch.tensor(aug.mean) / std) if normalize else (None, None)

    def __call__(self, image: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = two_views(image, self.transform, seed)
        if self.scale is None:
            return views
        return tuple(v.float() * self.scale + self.shift for v in views)


# -- which samples a rank and worker read ------------------------------------------------------

@dataclass(frozen=True)
class StreamPlan:
    """One worker's share of one epoch: samples [lo, hi) of the epoch's sequence, found in `shards`
    (url, position of the shard's first sample in the sequence)."""

    shards: tuple[tuple[str, int], ...]
    lo: int
    hi: int


def shard_sizes(split: Split) -> list[int]:
    """Samples per shard, in `split.tars` order (from the indexes)."""
    count = dict.fromkeys(split.tars, 0)
    for entry in split.entries():
        count[entry.members["jpg"].shard] += 1
    return [count[t] for t in split.tars]


def plan_streams(tars: list[str], sizes: list[int], seed: int, epoch: int, rank: int, world: int, batch: int,
                 steps: int, streams: int) -> list[StreamPlan]:
    """The `streams` workers' shares of this rank's epoch; stream L makes batches L, L + streams, ..."""
    order = np.random.default_rng([seed, epoch]).permutation(len(tars))
    starts = np.concatenate([[0], np.cumsum([sizes[i] for i in order])])
    lo = rank * int(starts[-1]) // world
    plans = []
    for stream in range(streams):
        hi = lo + len(range(stream, steps, streams)) * batch
        touched = tuple((tars[order[i]], int(starts[i])) for i in range(len(order))
                        if starts[i] < hi and starts[i + 1] > lo)
        plans.append(StreamPlan(touched, lo, hi))
        lo = hi
    return plans


def _positions(plan: StreamPlan):
    """A webdataset stage: keep the samples of [plan.lo, plan.hi), each tagged with its position."""

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        first = dict(plan.shards)
        url, index = None, 0
        for sample in samples:
            if sample["__url__"] != url:
                url, index = sample["__url__"], 0
            pos = first[url] + index
            index += 1
            if pos >= plan.hi:
                return
            if pos >= plan.lo:
                sample["__pos__"] = pos
                yield sample

    return stage


def _report_decode_errors(batches: Iterator) -> Iterator:
    """Turn a failed decode into an item naming its shard and key (exceptions raised in a DataLoader worker
    reach the main process as text only)."""
    import webdataset as wds

    try:
        yield from batches
    except wds.autodecode.DecodingError as e:
        yield {"decode_error": [e.url], "message": f"cannot decode sample {e.key} ({e.k}): {e.__cause__}"}


class EpochStreams(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs for one rank's epoch from step `start`: a webdataset pipeline."""

    def __init__(self, plans: list[StreamPlan], views: Callable, batch: int, seed: int, epoch: int, rank: int,
                 start: int, shuffle: int):
        self.plans, self.make_views, self.batch, self.seed, self.epoch = plans, views, batch, seed, epoch
        self.rank, self.start, self.shuffle = rank, start, shuffle

    def __iter__(self) -> Iterator:
        import webdataset as wds  # imported here: the DALI loader and the eval loader work without it

        info = torch.utils.data.get_worker_info()
        streams = len(self.plans)
        # After a resume at step k the DataLoader still asks worker 0 first: it makes batch k.
        stream = ((info.id if info else 0) + self.start) % streams
        plan = self.plans[stream]
        skip = len(range(stream, self.start, streams)) * self.batch

        def views(sample: tuple) -> tuple:
            image, cls, key, pos = sample
            v1, v2 = self.make_views(image, sample_seed(self.seed, self.epoch, pos))
            return v1, v2, cls, key

        # Shards go to ranks and workers by the plan above (nodesplitter, workersplitter off): webdataset's
        # own splitters deal whole shards, which gives ranks unequal step counts and idles workers when there
        # are fewer shards than readers.
        pipeline = (
            wds.WebDataset([url for url, _ in plan.shards], shardshuffle=False, nodesplitter=None,
                           workersplitter=None, empty_check=False)
            .compose(_positions(plan))
            .shuffle(self.shuffle, initial=self.shuffle, seed=_shuffle_seed(self.seed, self.epoch, self.rank, stream))
            .slice(skip, None)
            .decode("pil", only=["jpg", "cls"])
            .to_tuple("jpg", "cls", "__key__", "__pos__")
            .map(views)
            .batched(self.batch, partial=False)
            .compose(_report_decode_errors)
        )
        return iter(pipeline)


def epoch_loader(split: Split, sizes: list[int], views: Callable, batch: int, steps: int, workers: int,
                 prefetch: int, shuffle: int, seed: int, epoch: int, rank: int, world: int, start: int,
                 pin_memory: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
    """This rank's batches of one epoch from step `start`: (view1, view2) as `views` makes them (SimCLRViews:
    uint8 NHWC), labels, keys."""
    import webdataset as wds

    streams = max(1, workers)
    plans = plan_streams(split.tars, sizes, seed, epoch, rank, world, batch, steps, streams)
    dataset = EpochStreams(plans, views, batch, seed, epoch, rank, start, shuffle)
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                           prefetch_factor=prefetch if workers else None, persistent_workers=False,
                           worker_init_fn=ignore_stop_signals)
    shards = sorted({url for p in plans for url, _ in p.shards})
    produced = start
    with stop_signals_held():  # the workers start here: a stop signal to the group is the main process's
        items = iter(loader)
    for item in items:
        if isinstance(item, dict):
            raise DecodeError(item["decode_error"], item["message"])
        view1, view2, cls, keys = item
        produced += 1
        if produced == steps:  # let the workers finish before the last batch goes out: nothing left to drain
            for extra in items:
                if isinstance(extra, dict):
                    raise DecodeError(extra["decode_error"], extra["message"])
        yield view1, view2, torch.as_tensor(cls, dtype=torch.int64), list(keys)
    if produced != steps:
        raise ShardError(f"the shards gave {produced} of {steps} batches: shards and indexes disagree "
                         f"({', '.join(shards)})")


class OneView(torch.utils.data.Dataset):
    def __init__(self, entries: list[Entry], cfg: AugmentConfig):
        self.entries, self.transform = entries, eval_transform(cfg)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        e = self.entries[index]
        return self.transform(decode(e)), label(e), e.key


def preview_views(split: Split, aug: AugmentConfig, n: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """(source, view1, view2) uint8 HWC for the first n samples, as the training workers make them."""
    transform = simclr_view(aug)
    out = []
    for i, entry in enumerate(split.entries()[:n]):
        image = decode(entry)
        v1, v2 = two_views(image, transform, sample_seed(seed, 0, i))
        out.append((np.asarray(image), v1.numpy(), v2.numpy()))
    return out

