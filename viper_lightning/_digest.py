"""Content digests. xxh3-128 runs at memory speed and catches accidental damage (torn writes,
truncation, bit flips); forgery is the MAC's job (see _protocol)."""

from __future__ import annotations

import torch
import xxhash

__all__ = ["ALGORITHM", "Digester", "digest_buffer"]

ALGORITHM = "xxh3_128"


class Digester:
    """Incremental digest, so bytes can be verified as they stream in."""

    def __init__(self) -> None:
        self._hash = xxhash.xxh3_128()

    def update(self, data: memoryview | bytes | torch.Tensor) -> None:
        self._hash.update(_as_bytes_view(data))

    def hexdigest(self) -> str:
        return f"{ALGORITHM}:{self._hash.hexdigest()}"


def digest_buffer(buffer: torch.Tensor | memoryview | bytes) -> str:
    """Digest of a whole buffer, as `xxh3_128:<hex>`."""
    return f"{ALGORITHM}:{xxhash.xxh3_128_hexdigest(_as_bytes_view(buffer))}"


def _as_bytes_view(data: memoryview | bytes | torch.Tensor) -> memoryview | bytes:
    if isinstance(data, torch.Tensor):
        # A uint8 CPU tensor shares memory with its numpy view: hashing it copies nothing.
        return memoryview(data.detach().contiguous().view(torch.uint8).numpy())
    return data
