"""ImportanceSampler: draws samples by importance and prefers cached ones of similar rank."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

from .._errors import ConfigurationError
from ._cache import Plan, SampleCache
from ._scores import ImportanceScores

__all__ = ["ImportanceSampler", "MAX_WEIGHT"]

MAX_WEIGHT = 10.0  # a rarely drawn sample's weight is capped here: one draw may not dominate a step


class ImportanceSampler(DistributedSampler):
    """Yields `(index, plan, weight)` per draw, for CachedSamples: which sample to load, what to
    do with the cache (the cache's Plan, made here so that one owner decides), and the
    importance weight that keeps the expected gradient that of uniform sampling (1 / (N q), q
    the sample's probability of being drawn, capped at MAX_WEIGHT): training_step multiplies each
    sample's loss by it.

    `cache_affinity` is the knob between exact uniform sampling (0: a random permutation, each
    sample once per epoch, as a plain shuffled DataLoader) and importance sampling (1: every draw
    by importance, so the important samples the cache keeps are drawn most). In between, that
    fraction of the draws is by importance and the rest walks the uniform permutation (under DDP,
    one permutation shared by the ranks, each walking its own share).
    `substitute_window` goes further towards the cache, as SHADE does: a miss drawn by importance
    is replaced by the cached sample of nearest rank when one lies within that fraction of the
    data set's ranks. Off by default: it trains on fewer distinct samples, and on the skewed
    benchmark workload (benchmarks.sample_cache) it cost accuracy that the weighting cannot give
    back. With DDP, each rank draws its own
    (`seed` + rank) from scores every rank shares; it is a DistributedSampler, so Lightning
    keeps it rather than wrap it in one.

    Args:
        scores: the samples' importance (ImportanceScores).
        cache: the cache the draws plan for (None: nothing is cached).
        cache_affinity: 0-1, see above.
        substitute_window: 0-1, see above (0: never substitute).
        num_samples: draws per epoch (default: the data set's size over `num_replicas`).
        num_replicas, rank: DDP's world size and this rank.
        seed: the draws' seed; each epoch draws anew (`set_epoch`, as DistributedSampler).
    """

    def __init__(self, scores: ImportanceScores, cache: SampleCache | None = None, cache_affinity: float = 0.9,
                 substitute_window: float = 0.0, num_samples: int | None = None, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        if not 0 <= cache_affinity <= 1:
            raise ConfigurationError(f"cache_affinity={cache_affinity}: use a number from 0 (exact uniform) to 1 "
                                     "(importance sampling)")
        if not 0 <= substitute_window <= 1:
            raise ConfigurationError(f"substitute_window={substitute_window}: use a fraction of the ranks, 0 to 1")
        self.substitute_window = substitute_window
        Sampler.__init__(self)  # not DistributedSampler's: it would want the data set and a process group
        self.scores, self.cache, self.cache_affinity = scores, cache, cache_affinity
        self.num_samples = num_samples if num_samples is not None else len(scores) // max(1, num_replicas)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.total_size, self.shuffle, self.drop_last = self.num_samples * num_replicas, True, False

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, str, float]]:
        self.scores.refresh()
        if self.cache is not None:
            self.cache.sweep()  # the previous epoch's loads are done: its leftovers can go
        size = len(self.scores)
        uniform = np.random.default_rng((self.seed, self.epoch)).permutation(size)[self.rank::self.num_replicas]
        generator = np.random.default_rng((self.seed, self.rank, self.epoch))
        by_importance = generator.random(self.num_samples) < self.cache_affinity
        probabilities = self.scores.probabilities() if by_importance.any() else None
        drawn = generator.choice(size, size=self.num_samples, p=probabilities) if probabilities is not None else None
        # how much more often than uniform sampling each sample is drawn, inverted: a loss
        # weighted by it keeps the expected gradient that of uniform sampling
        drawn_as = (1 - self.cache_affinity) / size + self.cache_affinity * probabilities \
            if probabilities is not None else np.full(size, 1 / size)
        weights = np.minimum((1 / size) / drawn_as, MAX_WEIGHT)
        ranks = self.scores.ranks()
        window = int(self.substitute_window * size)
        cursor = 0
        for position in range(self.num_samples):
            if by_importance[position]:
                index = self._similar_cached(int(drawn[position]), ranks, window)
            else:
                index = int(uniform[cursor % len(uniform)])
                cursor += 1
            plan = self.cache.plan(index) if self.cache is not None else Plan.FETCH
            yield index, plan.value, float(weights[index])

    def _similar_cached(self, index: int, ranks: np.ndarray, window: int) -> int:
        """`index`, or on a miss the cached sample whose rank is nearest its own within `window`.
        A sample never scored is drawn itself: nothing says another is like it."""
        if window == 0 or self.cache is None or index in self.cache or not len(self.cache) \
                or not self.scores.scored(index):
            return index
        cached = self.cache.cached()
        distance = np.abs(ranks[cached] - ranks[index])
        nearest = int(np.argmin(distance))
        return int(cached[nearest]) if distance[nearest] <= window else index
