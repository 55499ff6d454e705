"""Whether the observed training loss has dropped significantly since the last publish.

Before a learning curve exists (the warm-up) the predictor schedules can still follow the
spirit of the paper's Algorithm 3 on the losses themselves: publish when the mean loss seen
since the last publish is below the mean seen before it by more than `z` standard errors of
the step-to-step noise. The noise is estimated from the spread of the step-to-step loss
differences (a trend only shifts their mean), so a falling loss publishes often and a noisy
flat one does not. Everything is kept as running sums: O(1) per step on the training thread.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..predictor._plans import LossLevels

_MIN_DIFFERENCES = 3  # no decision before the noise has been seen this many times


@dataclass
class ImprovementWatch:
    """Running statistics of the training loss for the significant-improvement rule."""

    z: float = 2.0
    differences: int = 0
    difference_sum: float = 0.0
    difference_squares: float = 0.0
    previous: float = math.nan
    reference: float = math.nan  # mean loss of the weights that are serving (initial: the first loss)
    since_sum: float = 0.0
    since_count: int = 0

    def observe(self, loss: float) -> None:
        """A finite training loss, in step order."""
        if math.isnan(self.reference):
            self.reference = self.previous = loss
            return
        difference = loss - self.previous
        self.differences += 1
        self.difference_sum += difference
        self.difference_squares += difference * difference
        self.previous = loss
        self.since_sum += loss
        self.since_count += 1

    @property
    def noise(self) -> float:
        """Standard deviation of one loss around its trend (inf until enough steps are seen)."""
        if self.differences < _MIN_DIFFERENCES:
            return math.inf
        mean = self.difference_sum / self.differences
        variance = max(self.difference_squares / self.differences - mean * mean, 0.0)
        return math.sqrt(variance / 2.0)  # a difference of two independent losses has twice the variance

    def significant(self, staleness: float = 0.0) -> bool:
        """Whether the losses since the last publish are significantly below the reference (plus
        `staleness`: how much worse the serving weights are predicted to have become)."""
        if self.since_count == 0:
            return False
        drop = self.reference + staleness - self.since_sum / self.since_count
        return drop > self.z * self.noise / math.sqrt(self.since_count)

    def levels(self) -> LossLevels:
        return LossLevels(self.reference, self.since_sum, self.since_count, self.noise)

    def rebase(self, reference: float = math.nan) -> None:
        """The loss process changed: the serving weights' loss is now `reference` (their loss
        on the new data; NaN: the next loss), and losses are compared from the next one on
        (the noise seen so far stays)."""
        self.reference, self.since_sum, self.since_count = reference, 0.0, 0

    def published(self) -> None:
        """The current weights are serving now: their loss level becomes the reference."""
        if self.since_count:
            self.reference = self.since_sum / self.since_count
        self.since_sum, self.since_count = 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_state(cls, state: dict[str, Any], z: float) -> ImprovementWatch:
        values = {k: (math.nan if v is None else v) for k, v in state.items() if k in cls.__dataclass_fields__}
        return cls(**{**values, "z": z})
