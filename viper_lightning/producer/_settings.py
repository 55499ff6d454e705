"""PublisherSettings: a publisher's settings, checked once, in one place.

ModelPublisher takes them as keyword arguments and ViperCallback as its flat constructor
(LightningCLI reads that signature); both build this object, so every check and default lives
here and nowhere else."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from .._errors import ConfigurationError
from .._priority import BACKGROUND_NICENESS, MAX_NICE
from ..storage._pfs import FileSystemTier
from ..transport._collective import parse_address
from ..transport._protocol import DEFAULT_ENDPOINT, MAX_VERSION, check_endpoint, check_model_name, normalize_key
from ._device import parse_device
from ._switcher import DEFAULT_TOGETHER_DEADLINE_S

__all__ = ["PublisherSettings", "DEFAULT_ENDPOINT", "DEFAULT_FETCH_ENDPOINT", "DEFAULT_FLUSH_DELAY_S"]

DEFAULT_FETCH_ENDPOINT = "tcp://127.0.0.1:*"
DEFAULT_FLUSH_DELAY_S = 0.05
ON_TIER_ERROR = ("degrade", "raise")


@dataclass(frozen=True)
class PublisherSettings:
    """See ModelPublisher for what each setting means."""

    model_name: str
    endpoint: str = DEFAULT_ENDPOINT
    pfs_root: str | FileSystemTier | None = None
    hmac_key: bytes | None = field(default=None, repr=False)  # never in a log or a traceback
    dram_versions: int = 1
    dram_bytes: int | None = None
    gpu_device: str | None = None  # normalised: "cuda", "cuda:N" or "cpu" (the tier in host memory)
    fetch_endpoint: str | None = DEFAULT_FETCH_ENDPOINT
    collective_endpoint: str | None = None
    keep_versions: int | None = None
    heartbeat_interval: float = 1.0
    flush_delay: float = DEFAULT_FLUSH_DELAY_S
    resume_after: int = 0
    host_id: str | None = None
    on_tier_error: str = "degrade"
    allow_keyless: bool = False
    keep_every_version: bool = False
    background_niceness: int = BACKGROUND_NICENESS
    skip_unchanged_frozen: bool = False
    together: bool = False
    together_quorum: int | None = None
    together_deadline: float = DEFAULT_TOGETHER_DEADLINE_S

    def __post_init__(self) -> None:
        check_model_name(self.model_name)
        check_endpoint(self.endpoint)
        if self.fetch_endpoint is not None:
            check_endpoint(self.fetch_endpoint)
        if self.collective_endpoint is not None:
            parse_address(self.collective_endpoint, any_port=True)
        if self.gpu_device is not None:
            object.__setattr__(self, "gpu_device", str(parse_device(self.gpu_device)))
        object.__setattr__(self, "hmac_key", normalize_key(self.hmac_key))
        if self.pfs_root is None and self.dram_versions == 0:
            raise ConfigurationError(
                "with dram_versions=0 and pfs_root=None no tier would hold the published bytes; "
                "keep the DRAM tier (dram_versions>=1) or pass pfs_root='/scratch/viper'")
        if not _is_int(self.dram_versions) or self.dram_versions < 0:
            raise ConfigurationError(f"dram_versions={self.dram_versions!r}: use 0 (no DRAM tier) or more")
        if self.dram_bytes is not None and not (_is_int(self.dram_bytes) and self.dram_bytes > 0):
            raise ConfigurationError(f"dram_bytes={self.dram_bytes!r}: use a positive number of bytes, or None "
                                     "for no byte budget")
        if self.keep_versions is not None and not (_is_int(self.keep_versions) and self.keep_versions >= 1):
            raise ConfigurationError(f"keep_versions={self.keep_versions!r}: keep at least 1 version, or None for all")
        if not (_is_number(self.heartbeat_interval) and self.heartbeat_interval > 0):
            raise ConfigurationError(f"heartbeat_interval={self.heartbeat_interval!r}: use a positive number of "
                                     "seconds")
        if not (_is_number(self.flush_delay) and 0 <= self.flush_delay < 60):
            raise ConfigurationError(f"flush_delay={self.flush_delay!r}: use seconds in [0, 60), e.g. 0.05")
        if self.together_quorum is not None and not (_is_int(self.together_quorum) and self.together_quorum >= 1):
            raise ConfigurationError(f"together_quorum={self.together_quorum!r}: use a number of replicas (1 or "
                                     "more), or None to wait for every replica of the previous switch")
        if not (_is_number(self.together_deadline) and 0 < self.together_deadline <= 3600):
            raise ConfigurationError(f"together_deadline={self.together_deadline!r}: use seconds in (0, 3600], "
                                     "e.g. 10")
        for name in ("allow_keyless", "keep_every_version", "skip_unchanged_frozen", "together"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{name}={getattr(self, name)!r}: use True or False (a string such as "
                                         "'false' would be taken as true)")
        if self.on_tier_error not in ON_TIER_ERROR:
            raise ConfigurationError(f"on_tier_error={self.on_tier_error!r}: use 'degrade' (report and keep "
                                     "training) or 'raise' (stop at the first failed write)")
        if not (_is_int(self.background_niceness) and 0 <= self.background_niceness <= MAX_NICE):
            raise ConfigurationError(f"background_niceness={self.background_niceness!r}: use 0 (background threads "
                                     f"at training's priority) to {MAX_NICE} (the lowest)")
        if not _is_int(self.resume_after) or not 0 <= self.resume_after < MAX_VERSION:
            raise ConfigurationError(f"resume_after={self.resume_after!r}: versions run from 0 to {MAX_VERSION}")


def _is_int(value: object) -> bool:
    """Integers of any kind (numpy's too), but not booleans nor floats like 2.5."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
