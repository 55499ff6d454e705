"""Notices: JSON round trip, MAC, and refusal of malformed input with a named reason."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from viper_lightning import ConfigurationError, Layout, Location, Notice, ProtocolError, take_snapshot
from viper_lightning._digest import digest_buffer
from viper_lightning.consumer._together import TogetherSwitch
from viper_lightning.transport._protocol import Switch

from .conftest import TinyNet

KEY = b"0123456789abcdef0123456789abcdef"


def make_notice(version: int = 3) -> Notice:
    snapshot = take_snapshot(TinyNet().state_dict())
    return Notice(model="tiny", version=version, nbytes=snapshot.layout.nbytes,
                  digest=digest_buffer(snapshot.data), layout=snapshot.layout, producer="host:1:ab",
                  step=30, epoch=0, locations=(Location("pfs", "host", "/pfs/tiny/v3"),))


def test_round_trip_unsigned_and_signed() -> None:
    notice = make_notice()
    assert Notice.decode(notice.encode()) == notice
    assert Notice.decode(notice.encode(KEY), KEY) == notice
    assert json.loads(notice.encode())["proto"] == 1


def test_missing_or_wrong_mac_is_refused_when_a_key_is_set() -> None:
    notice = make_notice()
    with pytest.raises(ProtocolError, match="carries no MAC"):
        Notice.decode(notice.encode(), KEY)
    with pytest.raises(ProtocolError, match="wrong MAC"):
        Notice.decode(notice.encode(b"another key, also 32 bytes long!"), KEY)


def test_tampered_field_breaks_the_mac() -> None:
    payload = json.loads(make_notice().encode(KEY))
    payload["version"] = 99
    with pytest.raises(ProtocolError, match="wrong MAC"):
        Notice.decode(json.dumps(payload).encode(), KEY)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda p: p.update(proto=2), "protocol 2 is not supported"),
    (lambda p: p.update(version=0), "'version' must be at least 1"),
    (lambda p: p.update(version="7"), "'version' must be a non-negative integer"),
    (lambda p: p.update(model="../etc"), "not a valid model name"),
    (lambda p: p.update(created_at=None), "'created_at' must be a finite number"),
    (lambda p: p.update(locations=[{"tier": "tape", "host": "h", "address": "a"}]), "tier 'tape' is unknown"),
    (lambda p: p.update(nbytes=p["nbytes"] + 4), "layout tensors cover"),
    (lambda p: p["layout"][0].update(shape=[-1]), "non-negative integers"),
])
def test_malformed_fields_are_named(mutate, message) -> None:
    payload = json.loads(make_notice().encode())
    mutate(payload)
    with pytest.raises(ProtocolError, match=message):
        Notice.decode(json.dumps(payload).encode())


@pytest.mark.parametrize("raw", [b"", b"\xff\xfe", b"[1, 2]", b"{not json"])
def test_unparsable_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        Notice.decode(raw)


def test_short_keys_are_a_configuration_error() -> None:
    from viper_lightning.transport._protocol import normalize_key
    with pytest.raises(ConfigurationError, match="at least 16"):
        normalize_key("short")


@pytest.mark.parametrize("shape, message", [
    ([10**3000] * 300, "at most 64 dimensions"),  # once minutes of big-integer arithmetic
    ([10**3000], "integers of at most"),
    ([-1], "integers of at most"),
])
def test_forged_shapes_are_refused_before_any_arithmetic(shape, message) -> None:
    with pytest.raises(ProtocolError, match=message):
        Layout.from_json([{"name": "w", "dtype": "F32", "shape": shape, "offset": 0}], 4)


def test_a_huge_layout_size_is_refused_and_described_briefly() -> None:
    with pytest.raises(ProtocolError, match="got an integer of 9966 bits"):
        Layout.from_json([], 10**3000)


def test_a_switch_needs_the_key_and_a_forged_one_leaves_the_replica_waiting() -> None:
    """Replicas that switch together swap on a signed switch only: a forged one is ignored,
    so a replica that sees nothing else swaps alone after its timeout, never on a forgery."""
    key, notice = b"k" * 32, Notice("m", 5, 8, None, Layout.for_state_dict({"w": torch.zeros(2)}), "producer-1")
    forged = Switch("m", 5, "producer-1").encode(b"x" * 32)
    with pytest.raises(ProtocolError, match="wrong MAC") as refused:
        Switch.decode(forged, key)
    assert refused.value.code == "forged"
    assert not Switch.announced_by(notice.encode(key))
    stop, ready = threading.Event(), []

    def waited(while_loading: list[bytes], once_ready: list[bytes]) -> str:
        replica = TogetherSwitch("replica-1", timeout=0.2)
        ready.clear()
        return replica.wait(notice, lambda timeout: iter(once_ready if ready else while_loading),
                            lambda: ready.append(1), stop, 0.05, key)

    genuine = Switch("m", 5, "producer-1").encode(key)
    assert waited([], [forged]) == "alone"
    assert ready == [1]
    assert waited([], [genuine]) == "together"
    assert waited([genuine], []) == "left-out"  # it came while the replica was loading
    assert ready == [1]  # reported all the same: the next switch waits for this replica
    assert waited([], [Switch("m", 5, "another-producer").encode(key)]) == "alone"
    assert waited([], [Switch("m", 6, "producer-1").encode(key)]) == "left-out"  # a newer version went
