"""Keeping a batch pipeline's freed memory for its next batch.

A CPU input pipeline makes batches of the same sizes over and over. glibc's malloc gives the
freed temporaries of one batch back to the kernel (it trims the heap, and unmaps blocks it had
mapped on their own) and faults fresh zeroed pages in for the next: which of the two happens
depends on where the process's longer-lived allocations happen to sit, so the same pipeline
costs one process a quarter more CPU than another. Fixing both thresholds keeps that memory in
the heap for reuse. (jemalloc or tcmalloc, preloaded, do the same for every allocation size.)
"""

from __future__ import annotations

import ctypes
import functools

from .._errors import ConfigurationError

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_MAX_ANYWHERE = 32 * 1024 * 1024  # the largest mmap threshold every 64-bit glibc takes


def keep_freed_memory(limit_bytes: int = 256 * 1024 * 1024) -> bool:
    """Have glibc keep up to `limit_bytes` of freed memory at the top of the heap, and allocate
    blocks up to that size (up to 32 MiB where glibc takes no more) from the heap, instead of
    returning them to the kernel after each batch. It applies to the whole process, for as long as it runs: call it in a process whose work
    is making batches (BatchLoader does when it starts serving, by default). Returns whether it
    took: False, changing nothing, where the C library is not glibc or refuses the thresholds."""
    if not 128 * 1024 <= limit_bytes < 2**31:  # glibc's own thresholds start at 128 KiB: less would keep less
        raise ConfigurationError(f"keep_freed_memory(limit_bytes={limit_bytes}): a size in bytes, from 128 KiB to "
                                 "2 GiB")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # some glibc versions refuse an mmap threshold over 32 MiB: blocks above that are then mapped
    # on their own still. The trim threshold is set only once the mmap one took, since setting
    # either stops glibc adjusting the other, and a fixed 128 KiB mmap threshold would be worse.
    if not (mallopt(M_MMAP_THRESHOLD, limit_bytes) or mallopt(M_MMAP_THRESHOLD, min(limit_bytes, MMAP_MAX_ANYWHERE))):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, limit_bytes))


@functools.cache
def _mallopt():
    try:
        libc = ctypes.CDLL(None)  # this process's own symbols, the C library's among them
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc's own: the thresholds mean what we say
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    del gnu_get_libc_version
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
