"""The producer's input side: samples from remote storage through an importance-aware cache
(SHADE), for any Lightning training run."""

from ._cache import POLICIES, SampleCache
from ._callback import SampleLossCallback
from ._datamodule import ImportanceDataModule
from ._dataset import CachedSamples
from ._sampler import ImportanceSampler
from ._scores import ImportanceScores
from ._store import SampleStore

__all__ = ["SampleStore", "ImportanceScores", "SampleCache", "POLICIES", "ImportanceSampler", "CachedSamples",
           "SampleLossCallback", "ImportanceDataModule"]
