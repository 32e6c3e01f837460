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
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image, ImageFilter

from base.signals import ignore_stop_signals, stop_signals_held
from engine.data.augment import AugmentConfig, Normalize
from engine.data.errors import DecodeError
from engine.data.shards import Entry, ShardError, Split, check_size, rank_range, read_member, shards_in
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
    default; another callable can stand in, e.g. for a bench). The normalisation is `Normalize`'s, applied
    to the HWC views through a channels-first view of them (elementwise: no copy, the layout kept)."""

    def __init__(self, aug: AugmentConfig, normalize: bool = False):
        self.transform = simclr_view(aug)
        self.normalize = Normalize(aug.mean, aug.std) if normalize else None

    def __call__(self, image: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        views = two_views(image, self.transform, seed)
        if self.normalize is None:
            return views
        return tuple(self.normalize(v.permute(2, 0, 1)[None])[0].permute(1, 2, 0) for v in views)


# -- which samples a rank and worker read ------------------------------------------------------

@dataclass(frozen=True)
class StreamPlan:
    """One worker's share of one epoch: samples [lo, hi) of the epoch's sequence, found in `shards`
    (url, position of the shard's first sample in the sequence, its sample count)."""

    shards: tuple[tuple[str, int, int], ...]
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
    """The `streams` workers' shares of this rank's epoch: the shards in an order seeded by (seed, epoch),
    this rank's `rank_range` of the sequence they form, cut into runs of whole batches; stream L makes
    batches L, L + streams, ..."""
    order = np.random.default_rng([seed, epoch]).permutation(len(tars))
    tars, sizes = [tars[i] for i in order], [sizes[i] for i in order]
    lo, _ = rank_range(sum(sizes), rank, world)
    plans = []
    for stream in range(streams):
        hi = lo + len(range(stream, steps, streams)) * batch
        plans.append(StreamPlan(tuple(shards_in(tars, sizes, lo, hi)), lo, hi))
        lo = hi
    return plans


# -- the stages of a worker's webdataset pipeline ---------------------------------------------------

TAR_ERRORS = (tarfile.TarError, EOFError, OSError)


def _whole_shards(plan: StreamPlan):
    """A webdataset stage: every sample has its jpg and cls, and each shard gives the samples its index lists,
    else a DecodeError naming the shard and the sample. Python's tarfile, which webdataset reads with, ends a
    shard without a word at a damaged member header (one flipped byte dropped 19 of a shard's 40 samples), and
    a worker a sample short would make one batch fewer than the other ranks; so the loader stops with one line,
    as DALI's does on an undecodable sample, rather than skip."""
    counts = {url: n for url, _, n in plan.shards}

    def cut(url: str, seen: int, key: str | None) -> DecodeError:
        after = f"after sample {key}" if key else "from its start"
        return DecodeError([url], f"shard {url}: the tar ends {after}, {seen} of the {counts[url]} samples its index "
                                  "lists (a member header there is damaged, or the tar is cut off)")

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        url, key, seen = None, None, 0
        try:
            for sample in samples:
                if sample["__url__"] != url:
                    if url is not None and seen < counts[url]:
                        raise cut(url, seen, key)
                    url, key, seen = sample["__url__"], None, 0
                missing = [ext for ext in ("jpg", "cls") if ext not in sample]
                key = sample["__key__"]
                if missing:
                    raise DecodeError([url], f"shard {url}, sample {key}: no {' or '.join(missing)} member (the tar "
                                             "is damaged there: a member header, or its end)")
                seen += 1
                if seen > counts[url]:
                    raise DecodeError([url], f"shard {url}, sample {key}: more samples than the {counts[url]} its "
                                             "index lists (the tar and its index disagree)")
                yield sample
        except TAR_ERRORS as e:  # webdataset appends the url of the shard it was reading to the exception's args
            if isinstance(e, OSError) and e.errno is not None:
                raise  # the machine's problem (a permission, a vanished disk), not the shard's
            where = next((a for a in reversed(e.args) if isinstance(a, str) and a in counts), url)
            what = str(e.args[0]).split(" @ ")[0] if e.args else ""
            after = f"after sample {key}" if where == url and key else "from its start"
            raise DecodeError([where], f"shard {where}: the tar cannot be read {after} ({type(e).__name__}: "
                                       f"{what})") from None
        if url is not None and seen < counts[url]:
            raise cut(url, seen, key)

    return stage


def _positions(plan: StreamPlan):
    """A webdataset stage: keep the samples of [plan.lo, plan.hi), each tagged with its position."""

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        first = {url: start for url, start, _ in plan.shards}
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


def _stored_size(size: int):
    """A webdataset stage after decoding: each image has the manifest's size (`check_size`); a PIL image's
    size is read from its header, so the check costs nothing measurable."""

    def stage(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            check_size(sample["__url__"], sample["__key__"], *sample["jpg"].size, size)
            yield sample

    return stage


def _errors_as_items(batches: Iterator) -> Iterator:
    """A worker's failure as its last item, the exception itself (DecodeError, ShardError and OSError pickle
    whole): raised in a DataLoader worker it would reach the main process as a traceback's text. webdataset's
    DecodingError becomes a DecodeError naming the shard and the key; an OSError with an errno (a permission,
    a vanished disk) keeps it, for the entry point's one line naming the path."""
    import webdataset as wds

    try:
        yield from batches
    except wds.autodecode.DecodingError as e:
        yield DecodeError([e.url], f"cannot decode sample {e.key} ({e.k}): {e.__cause__}")
    except (DecodeError, ShardError) as e:
        yield e
    except OSError as e:
        if e.errno is None:
            raise
        yield e


class EpochStreams(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs for one rank's epoch from step `start`: a webdataset pipeline."""

    def __init__(self, plans: list[StreamPlan], views: Callable, batch: int, seed: int, epoch: int, rank: int,
                 start: int, shuffle: int, size: int):
        self.plans, self.make_views, self.batch, self.seed, self.epoch = plans, views, batch, seed, epoch
        self.rank, self.start, self.shuffle, self.size = rank, start, shuffle, size

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
            wds.WebDataset([url for url, _, _ in plan.shards], shardshuffle=False, nodesplitter=None,
                           workersplitter=None, empty_check=False)
            .compose(_whole_shards(plan))
            .compose(_positions(plan))
            .shuffle(self.shuffle, initial=self.shuffle, seed=_shuffle_seed(self.seed, self.epoch, self.rank, stream))
            .slice(skip, None)
            .decode("pil", only=["jpg", "cls"])
            .compose(_stored_size(self.size))
            .to_tuple("jpg", "cls", "__key__", "__pos__")
            .map(views)
            .batched(self.batch, partial=False)
            .compose(_errors_as_items)
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
    dataset = EpochStreams(plans, views, batch, seed, epoch, rank, start, shuffle, split.image_size)
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                           prefetch_factor=prefetch if workers else None, persistent_workers=False,
                           worker_init_fn=ignore_stop_signals)
    shards = sorted({url for p in plans for url, _, _ in p.shards})
    produced = start
    with stop_signals_held():  # the workers start here: a stop signal to the group is the main process's
        items = iter(loader)
    try:
        for item in items:
            if isinstance(item, Exception):  # a worker's failure (see _errors_as_items)
                raise item
            view1, view2, cls, keys = item
            produced += 1
            if produced == steps:  # let the workers finish before the last batch goes out: nothing left to drain
                for extra in items:
                    if isinstance(extra, Exception):
                        raise extra
            yield view1, view2, torch.as_tensor(cls, dtype=torch.int64), list(keys)
    except BaseException:
        # Stop the workers here and now: this frame, kept by the traceback, would otherwise hold them until a
        # process forked later collects it there (torch then prints an AssertionError from __del__).
        del items
        raise
    if produced != steps:
        raise ShardError(f"the shards gave {produced} of {steps} batches: shards and indexes disagree "
                         f"({', '.join(shards)})")


class OneView(torch.utils.data.Dataset):
    """One centred view of each entry, read through the index. A sample that cannot be read or decoded, or
    whose image has not the split's size, comes back as its failure (a DecodeError or ShardError naming the
    shard and key; an OSError of the machine's as it is) for the main process to raise: raised in a DataLoader
    worker, it would arrive as a traceback's text."""

    def __init__(self, entries: list[Entry], cfg: AugmentConfig, split: Split):
        self.entries, self.transform, self.split = entries, eval_transform(cfg), split

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        e = self.entries[index]
        shard = e.members["jpg"].shard
        try:
            image = decode(e)
        except (ShardError, OSError) as failure:  # past the tar's end (read_member), or no image there (PIL)
            if isinstance(failure, OSError) and failure.errno is not None:
                return failure  # the machine's problem (a permission, a vanished disk), raised as it is
            what = "cannot be read" if isinstance(failure, ShardError) else "does not decode"
            return DecodeError([shard], f"shard {shard}, sample {e.key}: jpg {what} ({failure})", self.split.name)
        try:
            check_size(shard, e.key, *image.size, self.split.image_size)
            return self.transform(image), label(e), e.key
        except ShardError as failure:
            return failure if str(failure).startswith("shard ") else ShardError(f"shard {shard}, sample {e.key}: "
                                                                                f"{failure}")


def preview_views(split: Split, aug: AugmentConfig, n: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """(source, view1, view2) uint8 HWC for the first n samples, as the training workers make them."""
    transform = simclr_view(aug)
    out = []
    for i, entry in enumerate(split.entries()[:n]):
        image = decode(entry)
        v1, v2 = two_views(image, transform, sample_seed(seed, 0, i))
        out.append((np.asarray(image), v1.numpy(), v2.numpy()))
    return out

