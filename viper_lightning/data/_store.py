"""SampleStore: a data set kept as one small file per sample under any fsspec URL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import fsspec
import numpy as np
import safetensors.torch
import torch

from .._errors import ConfigurationError, IntegrityError, StorageError

__all__ = ["SampleStore"]

INDEX = "samples.json"  # the count and each sample's size: one read, where listing a bucket or a web server would be many
MAX_SAMPLES = 10**9


class SampleStore:
    """Samples `0..N-1` stored as `<root>/<index:08d>.safetensors`, each holding the tensors
    `x` and `y` (safetensors: never a pickle), with an index `samples.json` of their sizes.
    Reading one is one request to the storage, which is what a cache in front of it saves. The
    index is read once: the store is immutable."""

    def __init__(self, root: str, storage_options: dict | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})  # for the file system (an S3 endpoint, keys...)
        self._fs, self._path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        self._pid = os.getpid()
        try:
            index = json.loads(self._fs.cat_file(f"{self._path}/{INDEX}"))
        except FileNotFoundError:
            raise ConfigurationError(f"{root!r} has no {INDEX}: write the samples with SampleStore.write") from None
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {INDEX} under {root!r}: {exc}") from None
        sizes = index.get("sizes") if isinstance(index, dict) else None
        if not isinstance(sizes, list) or not 0 < len(sizes) <= MAX_SAMPLES or not all(
                isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes):
            raise IntegrityError(f"{root}/{INDEX} must hold 'sizes', a list of each sample's byte count")
        self.sizes = np.array(sizes, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sizes)

    def read(self, index: int) -> bytes:
        """Sample `index`'s bytes, as stored."""
        if os.getpid() != self._pid:  # a forked DataLoader worker: async file systems are not fork-safe
            self._fs, self._path = fsspec.core.url_to_fs(self.root, skip_instance_cache=True, **self.storage_options)
            self._pid = os.getpid()
        expected = int(self.sizes[index])
        try:
            data = self._fs.cat_file(f"{self._path}/{index:08d}.safetensors", start=0, end=expected + 1)
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read sample {index} under {self.root!r}: {exc}") from None
        if len(data) != expected:
            size = f"longer than {expected} bytes" if len(data) > expected else f"{len(data)} bytes"
            raise IntegrityError(f"sample {index} under {self.root!r} is {size}, but {INDEX} says {expected}: the "
                                 "store changed after its index was written; write it again with SampleStore.write")
        return data

    @staticmethod
    def decode(data: bytes, index: int) -> dict[str, torch.Tensor]:
        try:
            tensors = safetensors.torch.load(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt sample
            raise IntegrityError(f"sample {index} is not a safetensors file: {exc}") from None
        if set(tensors) != {"x", "y"}:
            raise IntegrityError(f"sample {index} holds {sorted(tensors)}, expected the tensors 'x' and 'y'")
        return tensors

    @staticmethod
    def write(root: str, samples: Iterable[tuple[torch.Tensor, torch.Tensor]],
              storage_options: dict | None = None) -> int:
        """Write samples (x, y) as a store under `root`; returns how many."""
        fs, path = fsspec.core.url_to_fs(root.rstrip("/"), **(storage_options or {}))
        fs.makedirs(path, exist_ok=True)
        sizes = []
        for index, (x, y) in enumerate(samples):
            data = safetensors.torch.save({"x": x.contiguous(), "y": torch.as_tensor(y).contiguous()})
            fs.pipe_file(f"{path}/{index:08d}.safetensors", data)
            sizes.append(len(data))
        fs.pipe_file(f"{path}/{INDEX}", json.dumps({"sizes": sizes}).encode())  # last: a store is whole or absent
        return len(sizes)
