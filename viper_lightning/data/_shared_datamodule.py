"""SharedBatchesDataModule: a member of an ensemble trains on the shared pipeline's batches."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader
from typing_extensions import override

from .._errors import ConfigurationError
from ._shared_batches import SharedBatches

__all__ = ["SharedBatchesDataModule"]


class SharedBatchesDataModule(L.LightningDataModule):
    """The batches a BatchLoader serves, for member `member` of the ensemble (see SharedBatches):
    one epoch of the Trainer is one epoch the loader serves.

    Args:
        directory: the loader's directory (BatchLoader.directory).
        member: this member's number (0 to K-1).
        hold: batches kept before releasing one (2: Lightning fetches one ahead of its step).
        timeout: seconds without a word from the loader before the member asks whether it is
            there (see SharedBatches).
    """

    def __init__(self, directory: str, member: int, hold: int = 2, timeout: float = 120.0) -> None:
        super().__init__()
        if hold < 2:
            raise ConfigurationError(f"SharedBatchesDataModule(hold={hold}): Lightning fetches the next batch before "
                                     "the step on this one runs, so a member must hold at least 2")
        self.directory, self.member, self.hold, self.timeout = directory, member, hold, timeout
        self.batches: SharedBatches | None = None

    @override
    def setup(self, stage: str) -> None:
        if self.batches is None:
            self.batches = SharedBatches(self.directory, self.member, self.hold, self.timeout)

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, num_workers=0)

    @override
    def teardown(self, stage: str) -> None:
        if self.batches is not None:
            self.batches.close()
            self.batches = None
