"""Errors the loaders raise mid-epoch, typed so that a trainer can catch them and say what to do."""

from __future__ import annotations

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
