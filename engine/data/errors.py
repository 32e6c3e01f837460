"""Errors the loaders raise mid-epoch, typed so that a trainer can catch them and say what to do, and the one
line that names an undecodable sample (training and evaluation say it the same way)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from base.errors import UsageError


class DecodeError(UsageError):
    """A sample could not be read or decoded mid-epoch. `shards` lists the shard files it can be in (one, where
    the reader knows it), and `split` their split, so the caller can search them for the bad key (e.g. with
    `python -m pack verify`)."""

    def __init__(self, shards: list[str], message: str, split: str = "train"):
        super().__init__(f"{message} (in {', '.join(shards)})")
        self.shards, self.message, self.split = list(shards), message, split

    def __reduce__(self):
        return DecodeError, (self.shards, self.message, self.split)


def undecodable(data: Path | str, split: str, shards: Sequence[str] | None = None, detail: str = "") -> str:
    """One line for a sample of `split` that a loader could not decode: which shard and key (found by decoding
    `shards`, or the whole split, with PIL) and what to do. `detail`, the loader's own words, stands in when
    PIL decodes every sample. A rerun would fail the same way, so callers exit 2, not with a requeue."""
    from pack.verify import find_undecodable  # the search, with its PIL and progress bars, only when it is needed

    problems = find_undecodable(Path(data), split, shards, limit=1)
    where = (str(problems[0]) if problems else
             f"one of {len(shards)} shard(s) ({detail})" if shards else detail or "PIL decodes every sample")
    return (f"a sample of split '{split}' does not decode: {where} (python -m pack verify --data {data} --decode "
            "lists every bad sample; pack again, or remove the shard from the manifest)")
