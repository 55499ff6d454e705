"""Content digests, named by algorithm (`<algorithm>:<hex>`).

Keyless, xxh3-128: it runs at memory speed and catches accidental damage (torn writes,
truncation, bit flips), but anyone can compute it, so it is no defence against a writer on
shared storage or a peer on the network. With a key (DESIGN §6), keyed BLAKE3: only holders of
the model's key can make a digest that matches forged bytes. Its key is derived from the
HMAC key (BLAKE3's derive-key mode), so one configured secret serves both, and neither use
weakens the other. The producer computes digests off the training thread; BLAKE3 releases the
GIL while it hashes, so the training thread keeps its core.

A digest is a two-level tree: each BLOCK_BYTES block of the buffer is hashed on its own (its
leaf), and the digest is the hash of the leaves in order (keyed, a leaf and the root use keys
derived apart). It costs what one pass over the bytes costs, and it lets a consumer that holds
one version take only the blocks that changed in the next (`delta`): the leaves (the version's
block map, `Digester.blocks`) are checked against the signed digest, and each block fetched
against its leaf, so a delta is verified exactly as a whole version is.
"""

from __future__ import annotations

import functools
import os

import blake3
import torch
import xxhash

__all__ = ["KEYED", "PLAIN", "BLOCK_BYTES", "Digester", "algorithm", "block_count", "digest_buffer",
           "changed_spans", "digest_of_blocks", "digest_reusing", "leaf_bytes", "leaf_of", "mismatch"]

PLAIN = "xxh3_128_blocks"
KEYED = "blake3_keyed_blocks"
_LEGACY = {"xxh3_128", "blake3_keyed"}  # whole-buffer digests of versions before the block tree
# Small enough that a change to a few tensors moves little more than them, large enough that the
# block map of a large model stays small (32 bytes a block keyed: 1 MB of map for 32 GB).
BLOCK_BYTES = 1024 * 1024
_LEAF_CONTEXT = "viper-lightning 2026-11 content digest block v2"
_ROOT_CONTEXT = "viper-lightning 2026-11 content digest root v2"
# A consumer verifying what it is about to serve may use several cores, but not every core of a
# host it may share with training.
ALL_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))


def algorithm(key: bytes | None) -> str:
    """The digest algorithm for bytes vouched for with `key` (None: keyless)."""
    return PLAIN if key is None else KEYED


class Digester:
    """Incremental digest, so bytes can be verified as they stream in (in order, from byte 0).

    `threads`: BLAKE3 may hash one large update on several cores; a consumer verifying what it
    is about to serve uses a few (ALL_THREADS), the producer one, beside its training thread.
    """

    def __init__(self, key: bytes | None = None, *, threads: int = 1) -> None:
        self.algorithm = algorithm(key)
        self._key, self._threads = key, threads
        self._leaves = bytearray()
        self._leaf = _leaf_hash(key, threads)
        self._filled = 0  # bytes in the current block

    def update(self, data: memoryview | bytes | torch.Tensor) -> None:
        view = memoryview(_as_bytes_view(data)).cast("B")
        while len(view):
            take = min(len(view), BLOCK_BYTES - self._filled)
            self._leaf.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK_BYTES:
                self._leaves += self._leaf.digest()
                self._leaf, self._filled = _leaf_hash(self._key, self._threads), 0

    def blocks(self) -> bytes:
        """The block map: each block's leaf digest in order, the last (partial) block's included."""
        return bytes(self._leaves) + (self._leaf.digest() if self._filled else b"")

    def hexdigest(self) -> str:
        return digest_of_blocks(self.blocks(), self._key)


def digest_buffer(buffer: torch.Tensor | memoryview | bytes, key: bytes | None = None, *, threads: int = 1) -> str:
    """Digest of a whole buffer: `xxh3_128_blocks:<hex>`, or `blake3_keyed_blocks:<hex>` with a key."""
    digester = Digester(key, threads=threads)
    digester.update(buffer)
    return digester.hexdigest()


def digest_of_blocks(blocks: bytes, key: bytes | None = None) -> str:
    """The digest of a buffer, from its block map (to check a map against a signed digest)."""
    if key is None:
        return f"{PLAIN}:{xxhash.xxh3_128_hexdigest(blocks)}"
    return f"{KEYED}:{blake3.blake3(blocks, key=_derived(key, _ROOT_CONTEXT)).hexdigest()}"


def digest_reusing(buffer: torch.Tensor | memoryview | bytes, key: bytes | None, before: bytes | None,
                   written: tuple[tuple[int, int], ...]) -> tuple[str, bytes]:
    """The digest and block map of `buffer`, hashing only the blocks that the (start, end) spans
    `written` touch: the others' leaves are taken from `before`, the block map of what the
    buffer held before those writes (none, or a map of another size: every block is hashed)."""
    view = memoryview(_as_bytes_view(buffer)).cast("B")
    count, size = block_count(len(view)), leaf_bytes(key)
    if before is None or len(before) != count * size:
        digester = Digester(key)
        digester.update(view)
        return digester.hexdigest(), digester.blocks()
    dirty = {index for start, end in written if end > start
             for index in range(start // BLOCK_BYTES, (end - 1) // BLOCK_BYTES + 1)}
    leaves = bytearray(before)
    for index in sorted(dirty):
        leaves[index * size:(index + 1) * size] = leaf_of(view[index * BLOCK_BYTES:(index + 1) * BLOCK_BYTES], key)
    return digest_of_blocks(bytes(leaves), key), bytes(leaves)


def leaf_of(block: memoryview | bytes | torch.Tensor, key: bytes | None = None, *, threads: int = 1) -> bytes:
    """One block's leaf digest, to check a block fetched on its own against the block map."""
    leaf = _leaf_hash(key, threads)
    leaf.update(_as_bytes_view(block))
    return leaf.digest()


def leaf_bytes(key: bytes | None) -> int:
    """The size of one leaf digest in a block map."""
    return 16 if key is None else 32


def block_count(nbytes: int) -> int:
    return -(-nbytes // BLOCK_BYTES)


def changed_spans(before: bytes, after: bytes, nbytes: int) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the runs of blocks whose leaves differ between two block maps
    of `nbytes` bytes (maps of the same size, so with the same key setting)."""
    size = len(after) // max(1, block_count(nbytes))
    spans: list[tuple[int, int]] = []
    for index in range(block_count(nbytes)):
        if before[index * size:(index + 1) * size] == after[index * size:(index + 1) * size]:
            continue
        start, end = index * BLOCK_BYTES, min((index + 1) * BLOCK_BYTES, nbytes)
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def mismatch(announced: str | None, actual: str) -> str | None:
    """Why the bytes digested to `actual` are not the ones announced, or None when they are."""
    if announced == actual:
        return None
    announced_algorithm = str(announced).partition(":")[0]
    actual_algorithm = actual.partition(":")[0]
    if announced_algorithm != actual_algorithm:
        fix = ("written by a viper_lightning older than the block digest: publish the version again"
               if announced_algorithm in _LEGACY
               else "set the producer's hmac_key here too" if announced_algorithm == KEYED
               else "the producer signs nothing: give both sides the same key")
        return (f"the digest was announced as {announced_algorithm!r}, but this side verifies with "
                f"{actual_algorithm!r} ({fix})")
    return f"digest mismatch (announced {announced}, computed {actual}); the bytes were damaged or replaced"


def _leaf_hash(key: bytes | None, threads: int) -> xxhash.xxh3_128 | blake3.blake3:
    if key is None:
        return xxhash.xxh3_128()
    return blake3.blake3(key=_derived(key, _LEAF_CONTEXT), max_threads=threads)


@functools.lru_cache(maxsize=32)
def _derived(key: bytes, context: str) -> bytes:
    return blake3.blake3(key, derive_key_context=context).digest()


def _as_bytes_view(data: memoryview | bytes | torch.Tensor) -> memoryview | bytes:
    if isinstance(data, torch.Tensor):
        # A uint8 CPU tensor shares memory with its numpy view: hashing it copies nothing.
        return memoryview(data.detach().contiguous().view(torch.uint8).numpy())
    return data
