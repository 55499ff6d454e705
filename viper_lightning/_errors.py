"""One small exception tree, so callers can catch everything Viper raises with one name."""

from __future__ import annotations

__all__ = [
    "ViperError",
    "ConfigurationError",
    "ProtocolError",
    "IntegrityError",
    "TransferError",
    "StorageError",
]


class ViperError(Exception):
    """Base class of every error raised by Viper."""


class ConfigurationError(ViperError, ValueError):
    """A constructor argument or setting is invalid; the message names the value and the fix."""


class ProtocolError(ViperError):
    """A notice or manifest is malformed, of an unknown protocol version, or forged (bad MAC)."""


class IntegrityError(ViperError):
    """Bytes or layout do not match what was announced: digest, size, names, dtypes or shapes."""


class TransferError(ViperError):
    """Moving bytes between peers failed: peer gone, timeout, refused."""


class StorageError(ViperError):
    """A storage tier failed: missing or truncated version, disk full, unreadable file."""
