"""The once-per-epoch baseline."""

from __future__ import annotations

from ._base import PublishSchedule

__all__ = ["EveryEpoch"]


class EveryEpoch(PublishSchedule):
    """Publish at the end of every training epoch (what epoch-wise checkpointing gives)."""

    decides_by_step = True

    def should_publish(self, step: int, loss: float | None = None) -> bool:
        return False

    def should_publish_at_epoch_end(self, epoch: int, step: int) -> bool:
        return True

    def __repr__(self) -> str:
        return "EveryEpoch()"
