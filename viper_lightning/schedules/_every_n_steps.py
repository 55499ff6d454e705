"""The fixed-interval baseline."""

from __future__ import annotations

from .._errors import ConfigurationError
from ._base import PublishSchedule

__all__ = ["EveryNSteps"]


class EveryNSteps(PublishSchedule):
    """Publish after every `n` optimizer steps (the usual hand-tuned baseline)."""

    decides_by_step = True

    def __init__(self, n: int = 100) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigurationError(f"EveryNSteps(n={n!r}): n must be a positive integer number of steps")
        self.n = n

    def should_publish(self, step: int, loss: float | None = None) -> bool:
        return step > 0 and step % self.n == 0

    def __repr__(self) -> str:
        return f"EveryNSteps(n={self.n})"
