"""Viper for Lightning: move freshly trained weights from a Lightning run into live inference.

The producer side (`ViperCallback`, `ModelPublisher`) snapshots weights into storage tiers and
announces each version over ZeroMQ; the consumer side (`ModelSubscriber`) fetches the newest
version, verifies it and hot-swaps it between requests.
"""

from ._errors import ConfigurationError, IntegrityError, ProtocolError, StorageError, TransferError, ViperError
from ._layout import Layout, TensorSpec
from .consumer._slots import Lease
from .consumer._stats import Refusal, SubscriberStats, UpdateRecord
from .consumer._subscriber import ModelSubscriber
from .producer._callback import ViperCallback
from .producer._publisher import DEFAULT_ENDPOINT, ModelPublisher
from .producer._snapshot import Snapshot, take_snapshot
from .storage._pfs import FileSystemTier
from .transport._protocol import Location, Notice

__all__ = [
    "ViperCallback",
    "ModelPublisher",
    "ModelSubscriber",
    "DEFAULT_ENDPOINT",
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
