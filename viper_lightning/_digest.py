"""Content digests, named by algorithm (`<algorithm>:<hex>`).

Keyless, xxh3-128: it runs at memory speed and catches accidental damage (torn writes,
truncation, bit flips), but anyone can compute it, so it is no defence against a writer on
shared storage or a peer on the network. With a key (DESIGN §6), keyed BLAKE3: only holders of
the model's key can make a digest that matches forged bytes. Its key is derived from the
HMAC key (BLAKE3's derive-key mode), so one configured secret serves both, and neither use
weakens the other. The producer computes digests off the training thread; BLAKE3 releases the
GIL while it hashes, so the training thread keeps its core.
"""

from __future__ import annotations

import functools
import os

import blake3
import torch
import xxhash

__all__ = ["KEYED", "PLAIN", "Digester", "algorithm", "digest_buffer", "mismatch"]

PLAIN = "xxh3_128"
KEYED = "blake3_keyed"
_CONTEXT = "viper-lightning 2026-11 content digest v1"
# A consumer verifying what it is about to serve may use several cores, but not every core of a
# host it may share with training.
ALL_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


def algorithm(key: bytes | None) -> str:
    """The digest algorithm for bytes vouched for with `key` (None: keyless)."""
    return PLAIN if key is None else KEYED


class Digester:
    """Incremental digest, so bytes can be verified as they stream in.

    `threads`: BLAKE3 may hash one large update on several cores; a consumer verifying what it
    is about to serve uses a few (ALL_THREADS), the producer one, beside its training thread.
    """

    def __init__(self, key: bytes | None = None, *, threads: int = 1) -> None:
        self.algorithm = algorithm(key)
        self._hash = xxhash.xxh3_128() if key is None else blake3.blake3(key=_digest_key(key), max_threads=threads)

    def update(self, data: memoryview | bytes | torch.Tensor) -> None:
        self._hash.update(_as_bytes_view(data))

    def hexdigest(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()}"


def digest_buffer(buffer: torch.Tensor | memoryview | bytes, key: bytes | None = None, *, threads: int = 1) -> str:
    """Digest of a whole buffer: `xxh3_128:<hex>`, or `blake3_keyed:<hex>` with a key."""
    if key is None:
        return f"{PLAIN}:{xxhash.xxh3_128_hexdigest(_as_bytes_view(buffer))}"
    digester = Digester(key, threads=threads)
    digester.update(buffer)
    return digester.hexdigest()


def mismatch(announced: str | None, actual: str) -> str | None:
    """Why the bytes digested to `actual` are not the ones announced, or None when they are."""
    if announced == actual:
        return None
    announced_algorithm = str(announced).partition(":")[0]
    actual_algorithm = actual.partition(":")[0]
    if announced_algorithm != actual_algorithm:
        fix = ("set the producer's hmac_key here too" if announced_algorithm == KEYED
               else "the producer signs nothing: give both sides the same key")
        return (f"the digest was announced as {announced_algorithm!r}, but this side verifies with "
                f"{actual_algorithm!r} ({fix})")
    return f"digest mismatch (announced {announced}, computed {actual}); the bytes were damaged or replaced"


@functools.lru_cache(maxsize=16)
def _digest_key(key: bytes) -> bytes:
    return blake3.blake3(key, derive_key_context=_CONTEXT).digest()


def _as_bytes_view(data: memoryview | bytes | torch.Tensor) -> memoryview | bytes:
    if isinstance(data, torch.Tensor):
        # A uint8 CPU tensor shares memory with its numpy view: hashing it copies nothing.
        return memoryview(data.detach().contiguous().view(torch.uint8).numpy())
    return data
