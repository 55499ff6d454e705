"""CachedSamples: a Dataset over a SampleStore that reads through a SampleCache's directory."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from ._store import SampleStore

__all__ = ["CachedSamples"]


class CachedSamples(Dataset):
    """Sample `i` as `{"x", "y", "index", "hit", "weight"}`: from the cache directory when it is
    there (a hit), else from the store (a miss), kept in the cache when the sampler's plan says
    so. It takes what ImportanceSampler yields (or a bare index: nothing kept, weight 1), and
    works in DataLoader workers: they share the directory, and write a file whole (a temporary
    renamed into place) or not at all."""

    def __init__(self, store: SampleStore, cache_directory: str | None = None) -> None:
        self.store, self.cache_directory = store, cache_directory

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: int | tuple[int, bool, float]) -> dict[str, torch.Tensor | int | bool | float]:
        index, admit, weight = (key, False, 1.0) if isinstance(key, int) else (int(key[0]), bool(key[1]),
                                                                               float(key[2]))
        data, hit = self._cached(index), True
        if data is None:
            data, hit = self.store.read(index), False
            if admit and self.cache_directory is not None:
                self._keep(index, data)
        tensors = SampleStore.decode(data, index)
        return {"x": tensors["x"], "y": tensors["y"], "index": index, "hit": hit, "weight": weight}

    def _cached(self, index: int) -> bytes | None:
        if self.cache_directory is None:
            return None
        try:
            with open(os.path.join(self.cache_directory, str(index)), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def _keep(self, index: int, data: bytes) -> None:
        path = os.path.join(self.cache_directory, str(index))
        temporary = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        except OSError:  # a full cache disk costs hits, never the sample
            try:
                os.unlink(temporary)
            except OSError:
                pass
