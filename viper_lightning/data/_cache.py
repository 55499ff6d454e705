"""SampleCache: a bounded local cache of samples, admitting and evicting by importance rank."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from enum import Enum

import numpy as np

from .._errors import ConfigurationError
from ._scores import ImportanceScores

__all__ = ["SampleCache", "POLICIES", "Plan"]

POLICIES = ("importance", "lru")


class Plan(str, Enum):
    """What the worker that loads a drawn sample does with the cache."""

    READ = "read"  # planned as cached: read it from the cache (a miss only if its file is not there yet)
    KEEP = "keep"  # a miss the cache admits: fetch it and write it into the cache
    FETCH = "fetch"  # a miss the cache does not admit: fetch it only


class SampleCache:
    """Which samples are kept in a private local directory (fast storage: /dev/shm by default),
    within `capacity_bytes`. It is owned by the sampler in the training process, which plans every
    admission and eviction as it draws indices; DataLoader workers read only the files the plan
    says are cached, and write only those it admits (atomically). Samples never change, so a file
    a worker still reads after its eviction is never wrong; a file written after its eviction is
    removed by `sweep`, which the sampler runs as each epoch starts.

    Policies: "importance" (as SHADE) admits a sample while there is room, then only in place of
    cached samples of lower importance (higher rank) than it; "lru" admits every sample and evicts
    the least recently drawn ones.

    Args:
        capacity_bytes: the most the cached samples may take.
        sizes: each sample's size in bytes.
        scores: the importance the "importance" policy ranks by.
        policy: "importance" or "lru".
        directory: where a private directory (mode 0700, removed by `close`) for the files is
            made (default /dev/shm): files another run or user left there are never read.
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
        base = directory if directory is not None else ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        if base is not None:
            os.makedirs(base, exist_ok=True)
        self.directory = tempfile.mkdtemp(prefix="viper-samples-", dir=base)  # 0700, ours, empty
        self._cached: OrderedDict[int, None] = OrderedDict()  # drawn order, for LRU
        self.used_bytes = 0

    def __contains__(self, index: int) -> bool:
        return index in self._cached

    def __len__(self) -> int:
        return len(self._cached)

    def cached(self) -> np.ndarray:
        return np.fromiter(self._cached, dtype=np.int64, count=len(self._cached))

    def path(self, index: int) -> str:
        return os.path.join(self.directory, str(index))

    def plan(self, index: int) -> Plan:
        """Sample `index` was drawn: what the worker that loads it does with the cache."""
        if index in self._cached:
            self._cached.move_to_end(index)
            return Plan.READ
        size = int(self._sizes[index])
        victims = self._victims(index, self.used_bytes + size - self.capacity_bytes)
        if victims is None:
            return Plan.FETCH
        for victim in victims:
            self._evict(victim)
        self._cached[index] = None
        self.used_bytes += size
        return Plan.KEEP

    def _victims(self, incoming: int, to_free: int) -> list[int] | None:
        """The cached samples to evict so that `to_free` bytes come free for `incoming`, all of
        them less important than it under the importance policy; None if that cannot be done."""
        if to_free <= 0:
            return []
        if self.policy == "lru":
            order = list(self._cached)
        else:
            ranks = self._scores.ranks()
            cached = self.cached()
            order = [int(i) for i in cached[np.argsort(-ranks[cached], kind="stable")] if ranks[i] > ranks[incoming]]
        victims, freed = [], 0
        for victim in order:
            if freed >= to_free:
                break
            victims.append(victim)
            freed += int(self._sizes[victim])
        return victims if freed >= to_free else None

    def _evict(self, index: int) -> None:
        del self._cached[index]
        self.used_bytes -= int(self._sizes[index])
        try:
            os.unlink(self.path(index))
        except FileNotFoundError:  # admitted, but no worker has written it yet: `sweep` removes it later
            pass

    def sweep(self) -> None:
        """Between epochs, when no worker writes: remove files the plan evicted before a worker
        wrote them, and forget samples planned as cached whose file never came (a failed write)."""
        present = set()
        for name in os.listdir(self.directory):
            if name.isdigit() and int(name) in self._cached:
                present.add(int(name))
            else:
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass
        for index in [i for i in self._cached if i not in present]:
            del self._cached[index]
            self.used_bytes -= int(self._sizes[index])

    def close(self) -> None:
        """Remove the cache's directory."""
        shutil.rmtree(self.directory, ignore_errors=True)
