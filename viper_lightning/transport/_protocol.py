"""Wire protocol v1: the Notice, its JSON encoding and its optional HMAC-SHA256.

Everything here parses untrusted bytes, so each field is checked for type and range and a
refusal names the field. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass, field, replace

from .._errors import ConfigurationError, ProtocolError
from .._layout import Layout
from .._shards import PartInfo
from ._messages import canonical_json, check_model_name, count, load_object, object_of

__all__ = ["PROTO", "TIERS", "DEFAULT_ENDPOINT", "MAX_VERSION", "Location", "Notice", "Switch", "check_model_name",
           "check_endpoint", "check_proto", "normalize_key", "sign", "verify_mac"]

PROTO = 1
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"  # where notices are published unless configured otherwise
MAX_VERSION = 10**18 - 1  # version numbers fit 18 digits (LATEST) and every integer type on the way
TIERS = ("gpu", "dram", "pfs")
MAX_NOTICE_BYTES = 64 * 1024 * 1024
MIN_KEY_BYTES = 16
_ENDPOINT = re.compile(r"^(tcp://([^\s:\[\]]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5}|\*)|ipc://\S+|inproc://\S+)$")


def check_endpoint(endpoint: object) -> str:
    """A ZeroMQ endpoint such as tcp://127.0.0.1:5555 (checked early, not at first use)."""
    if not isinstance(endpoint, str) or not _ENDPOINT.match(endpoint):
        raise ConfigurationError(
            f"endpoint {endpoint!r} is not a ZeroMQ endpoint; use 'tcp://HOST:PORT' "
            "(for example 'tcp://127.0.0.1:5555', or 'tcp://127.0.0.1:*' for any free port) or 'ipc://PATH'")
    return endpoint


MAX_CONSUMER_NAME_CHARS = 255


def consumer_name(message: dict[str, object], field: str, what: str, *, required: bool) -> str:
    """The name a consumer gives itself (host, process, instance) in relay requests and ready
    reports: used to count who is back or ready, never trusted for anything else."""
    value = message.get(field, None if required else "")
    if not isinstance(value, str) or len(value) > MAX_CONSUMER_NAME_CHARS or (required and not value):
        raise ProtocolError(f"{what} field {field!r} must be a name of {1 if required else 0}-"
                            f"{MAX_CONSUMER_NAME_CHARS} characters, got {value!r:.80}")
    return value


def normalize_key(key: str | bytes | None) -> bytes | None:
    """A shared MAC key as bytes; short keys are refused because they are guessable."""
    if key is None:
        return None
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"hmac_key has {len(raw)} bytes; use at least {MIN_KEY_BYTES} "
            "(for example the output of `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return raw


def sign(payload: dict[str, object], key: bytes) -> str:
    """HMAC-SHA256 over the canonical JSON of everything but the MAC itself."""
    return hmac.new(key, canonical_json(payload), hashlib.sha256).hexdigest()


def signed_request(model: str, key: bytes | None, request: dict[str, object]) -> bytes:
    """A request to a producer's fetch endpoint as sent: proto, model, the request's fields,
    and the MAC over them when a key is configured."""
    payload: dict[str, object] = {"proto": PROTO, "model": model, **request}
    if key is not None:
        payload["mac"] = sign(payload, key)
    return canonical_json(payload)


def verify_mac(payload: dict[str, object], key: bytes | None, what: str) -> None:
    """With a key configured, a missing or wrong MAC is a forgery and is refused (code "forged")."""
    if key is None:
        return
    mac = payload.get("mac")
    if not isinstance(mac, str):
        raise ProtocolError(f"{what} carries no MAC but a shared key is configured; refusing it", code="forged")
    unsigned = {k: v for k, v in payload.items() if k != "mac"}
    if not hmac.compare_digest(mac, sign(unsigned, key)):
        raise ProtocolError(f"{what} has a wrong MAC: it was forged, altered, or signed with another key",
                            code="forged")


def check_proto(message: dict[str, object], what: str) -> None:
    """Every message names the protocol version it speaks; only this one is understood."""
    if message.get("proto") != PROTO:
        raise ProtocolError(f"{what}: protocol {message.get('proto')!r} is not supported (this side speaks {PROTO})")


@dataclass(frozen=True)
class Location:
    """One tier holding a version: which tier, on which host, how to reach it (a path or URI,
    `shm://SEGMENT`, or a fetch endpoint), and the transfers in flight there when announced."""

    tier: str
    host: str
    address: str
    load: int = 0

    def to_json(self) -> dict[str, object]:
        return {"tier": self.tier, "host": self.host, "address": self.address, "load": self.load}

    @classmethod
    def from_json(cls, entry: object) -> Location:
        entry = object_of(entry, "each entry of 'locations'")
        tier, host, address = (entry.get(k) for k in ("tier", "host", "address"))
        if tier not in TIERS:
            raise ProtocolError(f"location tier {tier!r} is unknown (known: {', '.join(TIERS)})")
        if not isinstance(host, str) or not isinstance(address, str) or not address:
            raise ProtocolError(f"{tier} location needs string 'host' and non-empty 'address'")
        load = count(entry, "load", f"{tier} location") if "load" in entry else 0
        return cls(tier, host, address, load)


@dataclass(frozen=True)
class Notice:
    """Announces that a version of a model exists and where its bytes can be fetched."""

    model: str
    version: int
    nbytes: int
    digest: str | None  # None until computed: a memory-only notice never waits for it
    layout: Layout
    producer: str
    step: int | None = None
    epoch: int | None = None
    created_at: float = field(default_factory=time.time)
    locations: tuple[Location, ...] = ()
    part: PartInfo | None = None  # one rank's part of a sharded model (see viper_lightning._shards)

    def to_json(self, *, with_locations: bool = True) -> dict[str, object]:
        payload: dict[str, object] = {
            "proto": PROTO, "model": self.model, "version": self.version, "step": self.step,
            "epoch": self.epoch, "created_at": self.created_at, "nbytes": self.nbytes,
            "digest": self.digest, "layout": self.layout.to_json(), "producer": self.producer,
        }
        if self.part is not None:  # absent for a whole model, so its notices read as before
            payload["part"] = self.part.to_json()
        if with_locations:
            payload["locations"] = [loc.to_json() for loc in self.locations]
        return payload

    def encode(self, key: bytes | None = None, *, with_locations: bool = True) -> bytes:
        """The canonical JSON bytes, signed when a key is given."""
        if self.digest is None and (not with_locations or any(loc.tier == "pfs" for loc in self.locations)):
            raise ProtocolError(f"version {self.version}: a manifest or a file-system location needs the digest")
        payload = self.to_json(with_locations=with_locations)
        if key is not None:
            payload["mac"] = sign(payload, key)
        return canonical_json(payload)

    @classmethod
    def decode(cls, data: bytes, key: bytes | None = None, *, what: str = "notice") -> Notice:
        """Parse, authenticate and validate a notice (or a manifest, which lacks locations)."""
        payload = load_object(data, what, limit=MAX_NOTICE_BYTES)
        check_proto(payload, what)
        verify_mac(payload, key, what)
        model = _model_field(payload, what)
        layout = Layout.from_json(payload.get("layout"), payload.get("nbytes"))
        return cls(
            model=model,
            version=count(payload, "version", what, minimum=1, maximum=MAX_VERSION),
            nbytes=count(payload, "nbytes", what),
            digest=_digest_field(payload, what),
            layout=layout,
            producer=_string(payload, "producer", what),
            step=_optional_count(payload, "step", what),
            epoch=_optional_count(payload, "epoch", what),
            created_at=_timestamp(payload, what),
            locations=_locations(payload, what),
            part=PartInfo.from_json(payload["part"], layout, model) if payload.get("part") is not None else None,
        )

    def with_locations(self, locations: tuple[Location, ...]) -> Notice:
        return replace(self, locations=locations)


SWITCH_PREFIX = b'{"kind":"switch"'  # canonical JSON sorts keys: "kind" comes first, no notice has it


@dataclass(frozen=True)
class Switch:
    """Tells replicas that switch together to swap to `version` now (DESIGN §9): sent on the
    notice socket, under the model's topic, once the replicas the producer waits for are ready
    with it loaded. Signed like a notice when a key is set."""

    model: str
    version: int
    producer: str

    def encode(self, key: bytes | None) -> bytes:
        payload: dict[str, object] = {"kind": "switch", "proto": PROTO, "model": self.model,
                                      "version": self.version, "producer": self.producer}
        if key is not None:
            payload["mac"] = sign(payload, key)
        return canonical_json(payload)

    @staticmethod
    def announced_by(data: bytes) -> bool:
        """Whether a message on the notice socket is a switch (not a notice): checked on the
        bytes, so a big notice is never parsed twice."""
        return data.startswith(SWITCH_PREFIX)

    @classmethod
    def decode(cls, data: bytes, key: bytes | None) -> Switch:
        payload = load_object(data, "switch", limit=64 * 1024)
        check_proto(payload, "switch")
        verify_mac(payload, key, "switch")
        if payload.get("kind") != "switch":
            raise ProtocolError(f"switch: 'kind' must be 'switch', got {payload.get('kind')!r:.40}")
        return cls(_model_field(payload, "switch"), count(payload, "version", "switch", minimum=1, maximum=MAX_VERSION),
                   _string(payload, "producer", "switch"))


def _model_field(payload: dict[str, object], what: str) -> str:
    try:
        return check_model_name(payload.get("model"))
    except ConfigurationError:
        raise ProtocolError(f"{what}: 'model' {payload.get('model')!r} is not a valid model name") from None


def _string(payload: dict[str, object], key: str, what: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _digest_field(payload: dict[str, object], what: str) -> str | None:
    """Optional on memory-only notices; required wherever bytes cross storage (see DESIGN §6)."""
    locations = payload.get("locations")
    stored = not isinstance(locations, list) or any(isinstance(e, dict) and e.get("tier") == "pfs"
                                                    for e in locations)
    if payload.get("digest") is None and not stored:
        return None
    return _string(payload, "digest", what)


def _optional_count(payload: dict[str, object], key: str, what: str) -> int | None:
    return None if payload.get(key) is None else count(payload, key, what)


def _timestamp(payload: dict[str, object], what: str) -> float:
    value = payload.get("created_at")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"{what}: 'created_at' must be a finite number, got {value!r}")
    return float(value)


def _locations(payload: dict[str, object], what: str) -> tuple[Location, ...]:
    entries = payload.get("locations", [])
    if not isinstance(entries, list):
        raise ProtocolError(f"{what}: 'locations' must be a list")
    return tuple(Location.from_json(entry) for entry in entries)
