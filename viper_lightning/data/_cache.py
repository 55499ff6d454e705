"""SampleCache: a bounded local cache of samples, admitting and evicting by importance rank."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict

import numpy as np

from .._errors import ConfigurationError
from ._scores import ImportanceScores

__all__ = ["SampleCache", "POLICIES"]

POLICIES = ("importance", "lru")


class SampleCache:
    """Which samples are kept in a local directory (fast storage: /dev/shm by default), within
    `capacity_bytes`. It is owned by the sampler in the training process, which plans every
    admission and eviction as it draws indices; DataLoader workers only read the files, and
    write the ones the plan admits (atomically). Samples never change, so a file a worker still
    reads after its eviction, or writes after a later plan dropped it, is never wrong.

    Policies: "importance" (as SHADE) admits a sample while there is room, then only in place of
    the cached sample of lowest importance (highest rank) when the new one ranks higher; "lru"
    admits every sample and evicts the least recently drawn one.
    """

    def __init__(self, capacity_bytes: int, sizes: np.ndarray, scores: ImportanceScores | None = None,
                 policy: str = "importance", directory: str | None = None) -> None:
        if policy not in POLICIES:
            raise ConfigurationError(f"cache policy {policy!r}: use one of {POLICIES}")
        if policy == "importance" and scores is None:
            raise ConfigurationError("the importance policy needs the ImportanceScores it ranks by")
        if capacity_bytes < 0:
            raise ConfigurationError(f"capacity_bytes={capacity_bytes}: must be at least 0")
        self.capacity_bytes, self.policy = capacity_bytes, policy
        self._sizes, self._scores = sizes, scores
        base = "/dev/shm" if directory is None and os.path.isdir("/dev/shm") else directory
        self._owned = directory is None
        self.directory = tempfile.mkdtemp(prefix="viper-samples-", dir=base) if self._owned else directory
        os.makedirs(self.directory, exist_ok=True)
        self._cached: OrderedDict[int, None] = OrderedDict()  # drawn order, for LRU
        self.used_bytes = 0

    def __contains__(self, index: int) -> bool:
        return index in self._cached

    def cached(self) -> np.ndarray:
        return np.fromiter(self._cached, dtype=np.int64, count=len(self._cached))

    def path(self, index: int) -> str:
        return os.path.join(self.directory, str(index))

    def plan(self, index: int) -> bool:
        """Sample `index` was drawn: whether the worker that loads it should keep it here (a
        miss the policy admits); a hit only refreshes its recency."""
        if index in self._cached:
            self._cached.move_to_end(index)
            return False
        size = int(self._sizes[index])
        if size > self.capacity_bytes:
            return False
        while self.used_bytes + size > self.capacity_bytes:
            victim = self._victim(index)
            if victim is None:
                return False
            self._evict(victim)
        self._cached[index] = None
        self.used_bytes += size
        return True

    def _victim(self, incoming: int) -> int | None:
        if not self._cached:
            return None
        if self.policy == "lru":
            return next(iter(self._cached))
        ranks = self._scores.ranks()
        cached = self.cached()
        least = int(cached[np.argmax(ranks[cached])])
        return least if ranks[least] > ranks[incoming] else None

    def _evict(self, index: int) -> None:
        del self._cached[index]
        self.used_bytes -= int(self._sizes[index])
        try:
            os.unlink(self.path(index))
        except FileNotFoundError:  # admitted, but no worker has written it yet
            pass

    def close(self) -> None:
        """Remove the cache directory (when this object made it)."""
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)
