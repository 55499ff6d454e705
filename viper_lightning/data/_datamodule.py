"""ImportanceDataModule: a LightningDataModule over a remote SampleStore with an importance cache."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader
from typing_extensions import override

from .._errors import ConfigurationError
from ._cache import POLICIES, SampleCache
from ._dataset import CachedSamples
from ._sampler import ImportanceSampler
from ._scores import ImportanceScores
from ._store import SampleStore

__all__ = ["ImportanceDataModule"]


class ImportanceDataModule(L.LightningDataModule):
    """Trains on samples kept in remote storage through a local cache that keeps the important
    ones (SHADE): pair it with SampleLossCallback, which feeds it the per-sample losses.

    Batches are dicts: `x` and `y` stacked, `index` (each sample's number), `hit` (whether it
    came from the cache) and `weight` (multiply each sample's loss by it: it keeps the expected
    gradient that of uniform sampling, see ImportanceSampler). Each DDP rank keeps its own cache and draws its own samples from
    importance scores every rank shares.

    Args:
        root: the SampleStore's URL (any fsspec URL: a directory, s3://..., http://...).
        batch_size, num_workers: the DataLoader's.
        cache_fraction: the cache's size as a fraction of the data set's bytes (0: no cache).
        policy: "importance" (admit and evict by rank) or "lru".
        cache_affinity: 0 (exact uniform sampling) to 1 (importance sampling); see ImportanceSampler.
            Only the "importance" policy uses it: with "lru" the draws are uniform, as with a plain
            shuffled DataLoader.
        substitute_window: replace a miss by the cached sample of nearest rank within this
            fraction of the ranks (SHADE's substitution; 0, the default: never). More hits, fewer
            distinct samples trained on.
        importance_power: sampling probability grows as ((N - rank) / N) ** importance_power.
        cache_dir: where each rank's private cache directory is made (default /dev/shm; it is
            removed when training ends).
        storage_options: the fsspec file system's options (an S3 endpoint and keys, say).
        seed: the draws' seed.
    """

    def __init__(self, root: str, batch_size: int = 32, num_workers: int = 2, cache_fraction: float = 0.2,
                 policy: str = "importance", cache_affinity: float = 0.9, substitute_window: float = 0.0,
                 importance_power: float = 1.0, cache_dir: str | None = None,
                 storage_options: dict | None = None, seed: int = 0) -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ConfigurationError(f"policy {policy!r}: use one of {POLICIES}")
        if not 0 <= cache_fraction <= 1:
            raise ConfigurationError(f"cache_fraction={cache_fraction}: use a fraction from 0 to 1")
        self.root, self.batch_size, self.num_workers = root, batch_size, num_workers
        self.cache_fraction, self.policy, self.cache_affinity = cache_fraction, policy, cache_affinity
        self.substitute_window = substitute_window
        self.importance_power, self.cache_dir, self.seed = importance_power, cache_dir, seed
        self.storage_options = storage_options
        self.store: SampleStore | None = None
        self.scores: ImportanceScores | None = None
        self.cache: SampleCache | None = None

    @override
    def setup(self, stage: str) -> None:
        if self.store is None:  # kept across fits: the scores carry over
            self.store = SampleStore(self.root, self.storage_options)
            self.scores = ImportanceScores(len(self.store), self.importance_power, seed=self.seed)
        if self.cache is None and self.cache_fraction > 0 and stage == "fit":
            self.cache = SampleCache(int(self.cache_fraction * int(self.store.sizes.sum())), self.store.sizes,
                                     self.scores, self.policy, self.cache_dir)

    @override
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        importance = self.policy == "importance"
        sampler = ImportanceSampler(self.scores, self.cache, self.cache_affinity if importance else 0.0,
                                    self.substitute_window if importance else 0.0, num_replicas=world, rank=rank,
                                    seed=self.seed)
        dataset = CachedSamples(self.store, self.cache.directory if self.cache is not None else None)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    @override
    def teardown(self, stage: str) -> None:
        if self.cache is not None:
            self.cache.close()  # its directory goes; the scores stay
            self.cache = None

    @override
    def state_dict(self) -> dict:
        return {"scores": self.scores.state_dict()} if self.scores is not None else {}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        if self.scores is not None and "scores" in state_dict:
            self.scores.load_state_dict(state_dict["scores"])
