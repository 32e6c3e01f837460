"""What a network makes of images: L2-normalised embeddings of a packed split or of a benchmark's images, for
several networks in one pass, and the networks and data an evaluation starts from.

A library for `python -m engine.evaluate`, the training loop's online monitor and the quality bench: it
raises UsageError (one line) for what a user can fix, and never exits.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from base.errors import UsageError
from engine.archs import FEATURE_DIMS
from engine.data import AugmentConfig, EvalLoader, ShardError, Split
from engine.data.errors import DecodeError, undecodable
from engine.data.shards import Entry
from engine.data.torch_pipeline import eval_transform, label
from engine.model import CheckpointError, Loaded, ModelConfig, SimCLRNet, load_checkpoint
from engine.pairsets import ImageTooLarge, PairSet, decode
from pack.verify import ensure_verified

PIXEL_SIDE = 16
"""The pixels reference: each image area-downscaled to 16 x 16, its 3 x 16 x 16 values minus their mean."""
Nets = dict[str, SimCLRNet | None]
"""Networks by name; None is the pixels reference."""


# -- the networks ------------------------------------------------------------------------------------

def load_model(checkpoint: str, arch: str | None) -> Loaded:
    """The network to score: any checkpoint `load_checkpoint` reads, or 'none' (random init, seeded 0)."""
    if checkpoint == "none":
        if arch is None:
            raise UsageError(f"--checkpoint none needs --arch (one of {', '.join(FEATURE_DIMS)})")
        torch.manual_seed(0)
        return Loaded(SimCLRNet(ModelConfig(arch=arch)), True, {}, "none: random init")
    try:
        return load_checkpoint(checkpoint, arch)
    except CheckpointError as e:
        raise UsageError(str(e)) from None


def with_references(net: SimCLRNet, device: torch.device, seed: int) -> Nets:
    """The model beside what it is compared with on the same images: the same architecture untrained (seeded
    by `seed`) and raw pixels; on `device`, channels-last, in eval mode."""
    torch.manual_seed(seed)
    nets: Nets = {"model": net, "random_init": SimCLRNet(net.cfg), "pixels": None}
    for n in nets.values():
        if n is not None:
            n.to(device).to(memory_format=torch.channels_last).eval()
    return nets


# -- one batch -----------------------------------------------------------------------------------------

def _embed_batch(model: SimCLRNet | None, x: torch.Tensor, features: str, amp: bool) -> torch.Tensor:
    if model is None:
        e = F.interpolate(x.float(), size=(PIXEL_SIDE, PIXEL_SIDE), mode="area").flatten(1)
        return e - e.mean(dim=1, keepdim=True)
    amp_ctx = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda")
    with amp_ctx if amp else nullcontext():
        return model.embed(x, features).float()


def embed_tensor(model: SimCLRNet | None, x: torch.Tensor, features: str = "backbone", amp: bool = True,
                 flip: bool = False) -> torch.Tensor:
    """L2-normalised embeddings of one batch; with `flip`, of the image's plus its mirror's raw embedding."""
    e = _embed_batch(model, x, features, amp)
    if flip:
        e = e + _embed_batch(model, x.flip(3), features, amp)
    return F.normalize(e.float(), dim=1)


# -- a packed split ------------------------------------------------------------------------------------

@torch.no_grad()
def embed(model: SimCLRNet | None, loader: EvalLoader, features: str = "backbone", amp: bool = True,
          flip: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """L2-normalised embeddings (model, or downscaled raw pixels when model is None), labels, keys.

    `amp`: bf16 autocast on CUDA; False leaves whatever autocast the caller has set (the training loop's).
    """
    embeddings, labels, keys = embed_all({"model": model}, loader, features, amp, flip)
    return embeddings["model"], labels, keys


@torch.no_grad()
def embed_all(models: Nets, loader: EvalLoader, features: str = "backbone", amp: bool = True,
              flip: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """`embed` for several networks over one pass of the loader (each image read and decoded once).

    A sample the loader cannot read or decode is a UsageError naming its shard and key."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    labels, keys = [], []
    for model in models.values():
        if model is not None:
            model.eval()
    try:
        for batch in loader:
            for name, model in models.items():
                out[name].append(embed_tensor(model, batch["image"], features, amp, flip))
            labels.append(batch["label"])
            keys += batch["key"]
    except DecodeError as e:  # the eval loader names the shard and the key in its own words
        raise UsageError(undecodable(loader.split.root, e.split, e.shards, e.message)) from None
    return {name: torch.cat(e) for name, e in out.items()}, torch.cat(labels), keys


@dataclass
class LabelledSplit:
    """A packed split ready to score: its shards, every sample's members and their identities."""

    split: Split
    entries: list[Entry]
    labels: torch.Tensor


def open_split(data: Path, name: str) -> Split:
    """The split's shards and indexes, present and of the manifest's sizes (cheap: nothing is hashed or read)."""
    try:
        return Split.open(data, name)
    except (ShardError, OSError, ValueError) as e:
        raise UsageError(f"--data {data}: {e} (pass the --out folder of `python -m pack`)") from None


def read_split(split: Split, verify: bool = True, cache: Path | None = None, workers: int = 1) -> LabelledSplit:
    """Every sample's members and identity, refused at once when the split cannot be scored.

    With `verify`, the shards' and indexes' sizes and sha256 are checked against the manifest first (the
    answer kept in `cache`), so an index is only ever read beside the shard it describes: a shard replaced by
    another valid tar would otherwise be read at the old offsets, its bytes taken for labels."""
    if verify:
        try:
            ensure_verified(split.root, [split.name], cache, workers=max(1, workers), progress=sys.stderr.isatty())
        except ShardError as e:
            raise UsageError(f"{e}; --no-verify skips the check") from None
    try:
        entries = split.entries()
        labels = torch.tensor([label(e) for e in entries], dtype=torch.long)
    except (ShardError, OSError, ValueError) as e:
        raise UsageError(f"--data {split.root}: {e} (pass the --out folder of `python -m pack`)") from None
    ids, counts = torch.unique(labels, return_counts=True)
    if len(ids) < 2:
        raise UsageError(f"split '{split.name}' of {split.root} has {len(ids)} identit{'y' if len(ids) == 1 else 'ies'}"
                         ": identity metrics need at least two (pack with a larger --eval-identities, or pick another "
                         "--split)")
    if int(counts.max()) < 2:
        raise UsageError(f"split '{split.name}' of {split.root}: no identity has two images, so nothing can be "
                         "retrieved or verified (pack with --min-images 2 or more)")
    return LabelledSplit(split, entries, labels)


# -- a benchmark's images ------------------------------------------------------------------------------

class _PairImages(torch.utils.data.Dataset):
    """A benchmark's images through the eval loader's preprocessing; (image, ok) so a bad one is named once."""

    def __init__(self, images: list, size: int):
        self.images, self.transform = images, eval_transform(AugmentConfig(size=size))
        self.blank = torch.zeros(3, size, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return self.transform(decode(self.images[i])), True
        except ValueError:
            return self.blank, False


@torch.no_grad()
def embed_pairset(nets: Nets, ps: PairSet, size: int, features: str, flip: bool, device: torch.device,
                  batch_size: int, workers: int) -> dict[str, torch.Tensor]:
    """Every image of the benchmark embedded once per network (one decode per image for all of them); an
    image that cannot be decoded, or declares too many pixels, is a UsageError naming it."""
    loader = torch.utils.data.DataLoader(_PairImages(ps.images, size), batch_size=batch_size, num_workers=workers)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in nets}
    for n, (x, ok) in enumerate(loader):
        if not bool(ok.all()):
            k = n * batch_size + int(torch.nonzero(~ok)[0])
            where = f"{ps.images[k]}" if isinstance(ps.images[k], Path) else "in the file"
            try:
                decode(ps.images[k])
            except ValueError as e:
                what = "is refused" if isinstance(e, ImageTooLarge) else "cannot be decoded"
                raise UsageError(f"--bench {ps.path}: image {k} ({where}) {what}: {e} (a damaged benchmark: fetch it "
                                 "again)") from None
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        for name, net in nets.items():
            out[name].append(embed_tensor(net, x, features, flip=flip))
    return {name: torch.cat(e) for name, e in out.items()}
