"""The producer's input side: samples from remote storage through an importance-aware cache
(SHADE), and one input pipeline shared by the members of an ensemble, for any Lightning run."""

from ._allocator import keep_freed_memory
from ._cache import POLICIES, SampleCache
from ._callback import SampleLossCallback
from ._datamodule import ImportanceDataModule
from ._dataset import CachedSamples
from ._loader import BatchLoader
from ._sampler import ImportanceSampler
from ._scores import ImportanceScores
from ._shared_batches import SharedBatches
from ._shared_datamodule import SharedBatchesDataModule
from ._store import SampleStore

__all__ = ["SampleStore", "ImportanceScores", "SampleCache", "POLICIES", "ImportanceSampler", "CachedSamples",
           "SampleLossCallback", "ImportanceDataModule", "BatchLoader", "SharedBatches", "SharedBatchesDataModule",
           "keep_freed_memory"]
