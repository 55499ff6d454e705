"""CachedSamples: a Dataset over a SampleStore that reads through a SampleCache's directory."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from ._cache import Plan
from ._store import SampleStore

__all__ = ["CachedSamples"]


class CachedSamples(Dataset):
    """Sample `i` as `{"x", "y", "index", "hit", "weight"}`: from the cache directory when it is
    there (a hit), else from the store (a miss), kept in the cache when the sampler's plan says
    so. It takes what ImportanceSampler yields (or a bare index: no cache, weight 1), and
    works in DataLoader workers: they share the directory, and write a file whole (a temporary
    renamed into place) or not at all."""

    def __init__(self, store: SampleStore, cache_directory: str | None = None) -> None:
        self.store, self.cache_directory = store, cache_directory

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: int | tuple[int, str, float]) -> dict[str, torch.Tensor | int | bool | float]:
        index, plan, weight = (key, Plan.FETCH.value, 1.0) if isinstance(key, int) else \
            (int(key[0]), str(key[1]), float(key[2]))
        data = self._cached(index) if plan == Plan.READ.value else None
        hit = data is not None
        if data is None:
            data = self.store.read(index)
            if plan != Plan.FETCH.value and self.cache_directory is not None:
                self._keep(index, data)  # planned as kept (or cached, but its file did not come)
        tensors = SampleStore.decode(data, index)
        return {"x": tensors["x"], "y": tensors["y"], "index": index, "hit": hit, "weight": weight}

    def _cached(self, index: int) -> bytes | None:
        if self.cache_directory is None:
            return None
        try:
            fd = os.open(os.path.join(self.cache_directory, str(index)), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(int(self.store.sizes[index]) + 1)
        return data if len(data) == self.store.sizes[index] else None

    def _keep(self, index: int, data: bytes) -> None:
        path = os.path.join(self.cache_directory, str(index))
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        except OSError:  # a full cache disk costs hits, never the sample
            try:
                os.unlink(temporary)
            except OSError:
                pass
