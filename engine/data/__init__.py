"""Packed shards -> device batches: the DALI two-view pipeline, the torch baseline, the eval loader."""

from engine.data.augment import AugmentConfig, Normalize
from engine.data.errors import DecodeError
from engine.data.loader import EvalLoader, LoaderConfig, TrainLoader, dali_available
from engine.data.shards import ShardError, Split

__all__ = ["AugmentConfig", "DecodeError", "EvalLoader", "LoaderConfig", "Normalize", "ShardError", "Split",
           "TrainLoader", "dali_available"]
