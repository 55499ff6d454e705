"""Zero-copy consumers: weights served straight from the producer's segments, kept mappings, and
writes that never reach the producer."""

from __future__ import annotations

import contextlib
import os

import numpy
import pytest
import torch

from viper_lightning import ModelPublisher, ModelSubscriber

from .conftest import LOOPBACK_ANY_PORT, WAIT_S, TinyNet, assert_same_weights, perturbed


def test_zero_copy_consumer_serves_from_the_segment_and_locks_it(model_name, pfs_root) -> None:
    producer = TinyNet()
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT, pfs_root) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, pfs_root, load_latest=False) as subscriber:
        first = publisher.publish(perturbed(producer, 1))
        assert subscriber.wait_for_version(first, WAIT_S)
        expected_first = {k: v.clone() for k, v in producer.state_dict().items()}
        with subscriber.lease() as in_flight:
            assert in_flight.version == first
            for seed in range(2, 6):  # the producer keeps going while a request holds v1
                version = publisher.publish(perturbed(producer, seed))
                publisher.flush(WAIT_S)
                if version == first + 1:
                    assert subscriber.wait_for_version(version, WAIT_S)
            # v1's segment is locked: the producer rewrote other segments, never this one.
            assert_same_weights(expected_first, in_flight.model)
        assert subscriber.wait_for_version(version, WAIT_S)
        with subscriber.serving() as served:
            assert_same_weights(producer, served)
            assert subscriber.stats.last.route == "dram-shm"


def test_a_write_to_zero_copy_weights_never_reaches_the_producer(model_name) -> None:
    producer = perturbed(TinyNet(), 9)
    with ModelPublisher(model_name, LOOPBACK_ANY_PORT) as publisher, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint) as careless, \
         ModelSubscriber(TinyNet(), model_name, publisher.endpoint, zero_copy=False) as careful:
        version = publisher.publish(producer)
        assert careless.wait_for_version(version, WAIT_S)
        with careless.serving() as served, torch.no_grad():
            served.hidden.weight.add_(1.0)  # copy-on-write: only this process sees it
        assert careful.wait_for_version(version, WAIT_S)
        with careful.serving() as served:
            assert_same_weights(producer, served)


def _segment_holding(segment, version: int, fill: int) -> None:
    """Rewrite a producer segment in place as `version`, every byte `fill` (as the store does)."""
    assert segment.try_lock()
    segment.begin_write()
    segment.buffer.fill_(fill)
    segment.publish(version, segment.capacity, f"viper.{segment.name.split('.')[1]}.v{version}")


def test_zero_copy_mappings_are_reused_for_later_versions_of_a_segment(model_name) -> None:
    """Kept mappings keep their page tables (no faults on the next version) and still show the
    producer's rewrite."""
    from viper_lightning.storage._shm import ZeroCopyMappings, Segment

    segment = Segment(f"viper.{model_name}.free.1", 1 << 20)
    mappings = ZeroCopyMappings()
    try:
        _segment_holding(segment, 1, 1)
        first = mappings.lock(segment.name, 1, 1 << 20)
        assert int(first.buffer[::4096].sum()) == 256  # every page touched, as a request would
        mapping = first.mapping
        first.release()
        mappings.retired(first)  # no tensor views it now
        _segment_holding(segment, 3, 7)
        second = mappings.lock(segment.name, 3, 1 << 20)
        assert second.mapping is mapping
        assert torch.equal(second.buffer[::4096], torch.full((256,), 7, dtype=torch.uint8))
        second.release()
    finally:
        mappings.close()
        segment.unlink()


@pytest.mark.parametrize("offset", [5000, -1], ids=["inside", "partial-last-page"])
def test_a_mapping_the_model_wrote_to_is_not_reused(model_name, offset) -> None:
    """A written page became a private copy holding the old bytes: reusing the mapping would
    serve them in the next version, so it is mapped afresh. The last page is partial (a 64-byte
    header + 1 MiB) and must be checked too."""
    from viper_lightning.storage._shm import ZeroCopyMappings, Segment

    segment = Segment(f"viper.{model_name}.free.1", 1 << 20)
    mappings = ZeroCopyMappings()
    try:
        _segment_holding(segment, 1, 1)
        first = mappings.lock(segment.name, 1, 1 << 20)
        first.buffer[offset] = 99  # e.g. a BatchNorm running mean updated in train mode
        mapping = first.mapping
        first.release()
        mappings.retired(first)
        _segment_holding(segment, 2, 7)
        second = mappings.lock(segment.name, 2, 1 << 20)
        assert second.mapping is not mapping
        assert int(second.buffer[offset]) == 7
        second.release()
    finally:
        mappings.close()
        segment.unlink()


def test_mappings_of_unlinked_segments_are_let_go(model_name) -> None:
    from viper_lightning.storage._shm import ZeroCopyMappings, Segment

    gone, kept = (Segment(f"viper.{model_name}.free.{n}", 4096) for n in (1, 2))
    mappings = ZeroCopyMappings()
    try:
        _segment_holding(gone, 1, 1)
        mappings.lock(gone.name, 1, 4096).release()
        gone.unlink()  # evicted by the producer: a kept mapping would hold its memory
        _segment_holding(kept, 2, 2)
        mappings.lock(kept.name, 2, 4096).release()
        assert len(mappings._kept) == 1
    finally:
        mappings.close()
        kept.unlink()


def shm_references(model: str) -> list[str]:
    """This process's descriptors and mappings of the model's segments."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if f"viper.{model}." in os.readlink(f"/proc/self/fd/{fd}"):
                found.append(f"fd {fd}")
    with open("/proc/self/maps") as maps:
        found += [line.split()[-1] for line in maps if f"viper.{model}." in line]
    return found


def test_closing_lets_go_of_every_segment_and_keeps_the_served_weights(model_name) -> None:
    """Issue 11, defect 16: close() left descriptors and mappings of deleted segments alive until
    garbage collection. A closed subscriber's model keeps the weights it served, in its own memory."""
    producer = TinyNet()
    publisher = ModelPublisher(model_name, LOOPBACK_ANY_PORT)
    subscriber = ModelSubscriber(TinyNet(), model_name, publisher.endpoint, load_latest=False).start()
    for seed in range(3):
        version = publisher.publish(perturbed(producer, seed))
        assert subscriber.wait_for_version(version, WAIT_S)
    with subscriber.serving() as served:
        model = served
    subscriber.close()
    publisher.close()
    assert shm_references(model_name) == []
    assert_same_weights(producer, model)


def test_the_reuse_check_waits_for_idle_time_and_drops_a_written_mapping(model_name) -> None:
    """Retiring a mapping only notes it (the page scan would fall inside other workers' updates);
    `check_retired`, run when the subscriber is idle, finds the written page and lets it go."""
    from viper_lightning.storage._shm import ZeroCopyMappings, Segment

    segment = Segment(f"viper.{model_name}.free.1", 1 << 20)
    mappings = ZeroCopyMappings()
    try:
        _segment_holding(segment, 1, 1)
        first = mappings.lock(segment.name, 1, 1 << 20)
        first.buffer[5000] = 99
        first.release()
        mappings.retired(first)
        assert [kept.unchecked for kept in mappings._kept.values()] == [True]
        mappings.check_retired()
        assert not mappings._kept  # written: never reused
        _segment_holding(segment, 2, 7)
        second = mappings.lock(segment.name, 2, 1 << 20)
        assert second.mapping is not first.mapping and int(second.buffer[5000]) == 7
        second.release()
    finally:
        mappings.close()
        segment.unlink()


@pytest.mark.parametrize("advice", ["populate-write", "fallback"])
def test_a_populated_segment_has_every_page_mapped_before_the_first_copy(model_name, advice) -> None:
    """A new slot's pages are faulted in off the training thread (MADV_POPULATE_WRITE, or a
    write per page where the kernel lacks it), so the first copy into it pays no fault."""
    import ctypes
    import mmap

    from viper_lightning.storage import _shm
    from viper_lightning.storage._shm import Segment

    segment = Segment(f"viper.{model_name}.free.1", 1 << 20)
    try:
        _shm.populate(segment._map, _shm._MADV_POPULATE_WRITE if advice == "populate-write" else -1)
        anchor = ctypes.c_char.from_buffer(segment._map)
        address = ctypes.addressof(anchor)
        del anchor
        pages = -(-len(segment._map) // mmap.PAGESIZE)
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(address // mmap.PAGESIZE * 8)
            entries = numpy.frombuffer(pagemap.read(pages * 8), dtype=numpy.uint64)
        present = (entries >> numpy.uint64(63)) & numpy.uint64(1)
        if not present[0]:
            pytest.skip("/proc/self/pagemap hides page presence here")
        assert int(present.sum()) == pages
        assert bytes(segment._map[:8]) == b"VIPERSHM"  # the header survives
    finally:
        segment.unlink()
