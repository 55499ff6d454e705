"""One small exception tree, so callers can catch everything Viper raises with one name.

Exceptions carry data beside their message, as httpx's do: `code`, a machine-readable reason
for a refusal, and on TransferError `tiers`, the tiers that still hold a version a peer no
longer has. The codes a peer's refusal can carry (the `code` field of a server's error answer):

  "malformed"     a message (notice, request, answer) failed parsing or a field check
  "forged"        a MAC was missing or wrong while a shared key is configured
  "gone"          the version is no longer held there; `tiers` names where it still lives
  "busy"          the server has too many transfers outstanding; retry later
  "no-ipc"        the producer lends no device memory (no CUDA GPU tier or no hmac_key)
  "mismatch"      the producer serves another size than the notice announced
  "server-error"  the producer failed while serving the request
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ViperError",
    "ConfigurationError",
    "ProtocolError",
    "IntegrityError",
    "TransferError",
    "StorageError",
]


class ViperError(Exception):
    """Base class of every error raised by Viper.

    `code` is a machine-readable reason (see the module doc), None where there is none."""

    code: str | None = None

    def __init__(self, *args: object, code: str | None = None) -> None:
        super().__init__(*args)
        if code is not None:
            self.code = code


class ConfigurationError(ViperError, ValueError):
    """A constructor argument or setting is invalid; the message names the value and the fix."""


class ProtocolError(ViperError):
    """A notice or manifest is malformed, of an unknown protocol version, or forged (bad MAC).

    `code` is "malformed" unless said otherwise ("forged" for a missing or wrong MAC)."""

    code: str | None = "malformed"


class IntegrityError(ViperError):
    """Bytes or layout do not match what was announced: digest, size, names, dtypes or shapes."""


class TransferError(ViperError):
    """Moving bytes between peers failed: peer gone, timeout, refused.

    A refusal carries the peer's `code`; a "gone" answer also names, in `tiers`, the tiers that
    still hold the version (empty when none does, or when the failure was no refusal)."""

    def __init__(self, *args: object, code: str | None = None, tiers: Iterable[str] = ()) -> None:
        super().__init__(*args, code=code)
        self.tiers: tuple[str, ...] = tuple(tiers)


class StorageError(ViperError):
    """A storage tier failed: missing or truncated version, disk full, unreadable file."""
