"""Viper for Lightning: move freshly trained weights from a Lightning run into live inference.

The producer side (`ViperCallback`, `ModelPublisher`) snapshots weights into storage tiers and
announces each version over ZeroMQ; the consumer side (`ModelSubscriber`) fetches the newest
version over the cheapest route, verifies it and hot-swaps it between requests.
"""

from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError, IntegrityError, ProtocolError, StorageError, TransferError, ViperError
from ._layout import Layout, TensorSpec
from .consumer._planner import Route, RouteKind, TransferPlanner
from .consumer._double_buffer import Lease
from .consumer._stats import Refusal, SubscriberStats, UpdateRecord
from .consumer._ensemble import EnsembleLease, EnsembleSubscriber
from .consumer._sharded import ShardedSubscriber
from .consumer._subscriber import ModelSubscriber
from .producer._publisher import CommitRecord, ModelPublisher
from .producer._settings import PublisherSettings
from .producer._sharded import ShardedPublisher
from .producer._snapshot import Snapshot, take_snapshot
from .storage._pfs import FileSystemTier
from .transport._protocol import DEFAULT_ENDPOINT, Location, Notice
from .transport._reports import ConsumerReport

if TYPE_CHECKING:
    from .producer._callback import ViperCallback

__all__ = [
    "ViperCallback",
    "ModelPublisher",
    "ModelSubscriber",
    "ShardedPublisher",
    "ShardedSubscriber",
    "EnsembleSubscriber",
    "EnsembleLease",
    "TransferPlanner",
    "Route",
    "RouteKind",
    "PublisherSettings",
    "DEFAULT_ENDPOINT",
    "CommitRecord",
    "ConsumerReport",
    "Snapshot",
    "take_snapshot",
    "Layout",
    "TensorSpec",
    "Notice",
    "Location",
    "FileSystemTier",
    "Lease",
    "UpdateRecord",
    "Refusal",
    "SubscriberStats",
    "ViperError",
    "ConfigurationError",
    "ProtocolError",
    "IntegrityError",
    "TransferError",
    "StorageError",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lightning is imported only by code that trains: serving workers that just subscribe
    # never pay for it.
    if name == "ViperCallback":
        from .producer._callback import ViperCallback

        return ViperCallback
    raise AttributeError(f"module 'viper_lightning' has no attribute {name!r}")
