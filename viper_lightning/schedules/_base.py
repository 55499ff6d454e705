"""The publish-schedule interface the callback consults after every training step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

__all__ = ["PublishSchedule"]


class PublishSchedule(ABC):
    """Decides when a new version is worth publishing.

    The callback calls `should_publish` after each optimizer step and
    `should_publish_at_epoch_end` at each epoch end, and reports every publish back through
    `published` (with the measured training stall), so adaptive schedules can learn the
    trade-off between stall and staleness. Schedules that set `needs_loss = True` receive the
    training loss (reading it forces a device sync, so the others do not pay for it).
    """

    needs_loss: bool = False
    # Whether decisions depend on the step and epoch alone (no loss, no measured costs): every
    # rank of a sharded run then decides alike, and the callback skips agreeing on each step.
    decides_by_step: bool = False

    @abstractmethod
    def should_publish(self, step: int, loss: float | None = None) -> bool:
        """Whether to publish now, after optimizer step `step` (1-based) with this loss."""

    def should_publish_at_epoch_end(self, epoch: int, step: int) -> bool:
        """Whether to publish as epoch `epoch` (0-based) ends."""
        return False

    def published(self, step: int, loss: float | None, stall_s: float) -> None:
        """Feedback after each publish: the step, its loss, and how long training waited."""

    def observe_commit_time(self, seconds: float) -> None:
        """Feedback from the background writer: how long one version took to reach the file
        system (the callback reports each completed commit once)."""

    def observe_load_time(self, seconds: float) -> None:
        """Feedback from a consumer: how long after a publish it served that version (the
        callback passes on each report consumers send back)."""

    @property
    def probes(self) -> bool:
        """Whether this schedule asks for served-loss probes (`probe_versions`): the callback
        then keeps host copies of a few published versions to score them."""
        return False

    def probe_versions(self, step: int) -> list[int]:
        """Steps of published versions whose loss on this step's training batch the schedule
        wants, through `observe_served_loss` (none by default)."""
        return []

    def observe_served_loss(self, version_step: int, loss: float) -> None:
        """The loss of the version published after `version_step` on labelled data of now."""

    def state_dict(self) -> dict[str, Any]:
        """What must survive a checkpoint so a resumed run keeps its schedule."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
