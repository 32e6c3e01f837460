"""Packed shards -> device batches: the DALI two-view pipeline, the torch baseline, the eval loader."""

from engine.data.augment import AugmentConfig
from engine.data.loader import EvalLoader, LoaderConfig, TrainLoader, dali_available
from engine.data.shards import ShardError, Split

__all__ = ["AugmentConfig", "EvalLoader", "LoaderConfig", "ShardError", "Split", "TrainLoader", "dali_available"]
