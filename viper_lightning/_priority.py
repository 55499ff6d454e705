"""Background threads give way to training on the CPU.

A publisher's background work (digesting and writing a version to the file system, faulting a
new snapshot slot in, copying the GPU tier down to host memory) is a burst of CPU right after a
publish. When training runs on every core, a burst at the same priority takes a core away from
one of torch's intra-op threads, and the others wait for it at the next barrier: the step loses
about the burst's CPU time once per intra-op thread. At a lower priority (a higher nice value)
the kernel runs the burst in the moments training leaves a core idle instead.

The price is that the burst may wait long when training leaves no core idle: small models whose
steps are a few milliseconds keep torch's threads spinning between operations, and then a
flush at nice 19 gets about 1.5% of a core, holds its snapshot slot for that long, and later
publishes are skipped (reported) for want of a free slot. Measured on CPU training of a 256 MB
model, it removed the 0.3 s the step after a publish lost in some runs and cost more in others.
So it is an opt-in, for the flusher only: a thread that a publish may wait for (the slot
warmer, the GPU tier's copy down) must never be starved."""

from __future__ import annotations

import logging
import os
import sys
import threading

__all__ = ["BACKGROUND_NICENESS", "MAX_NICE", "lower_this_thread"]

log = logging.getLogger("viper_lightning.publisher")

BACKGROUND_NICENESS = 0  # the default: background threads at training's priority (see the module doc)
MAX_NICE = 19


def lower_this_thread(niceness: int) -> None:
    """Add `niceness` to the calling thread's nice value, up to MAX_NICE.

    Only on Linux, where a nice value belongs to a thread (setpriority on a thread id); on other
    systems it would lower the whole process, training included, so nothing is done there. A
    failure leaves the thread as it was: priority is an optimisation, never a reason to fail."""
    if niceness <= 0 or not sys.platform.startswith("linux"):
        return
    thread_id = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread_id)
        os.setpriority(os.PRIO_PROCESS, thread_id, min(MAX_NICE, current + niceness))
    except OSError as exc:
        log.debug("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)
