"""Has the loss process changed since the curve was fitted?

A fitted learning curve describes one regime of the loss. A concept shift (the loss jumps), the
end of a plateau (it starts falling again) or the start of one all change how the loss *moves*
from one stretch of steps to the next. So the test compares the change the losses show between
two consecutive windows of `WINDOW` steps with the change the curve predicts between the same
windows, as the difference of the windows' median residuals from the curve (medians, so that a
single spiking batch is not a new regime). That difference has a standard error of about
noise * sqrt(pi / WINDOW) (the noise is the measured step-to-step loss noise); more than `Z` of
those is a change. It
began where the residuals from the curve split best into a before and an after (the split of
the two windows' steps with the largest standardised difference of means).

Comparing changes rather than levels matters. A curve fitted on a short stretch and
extrapolated drifts off the losses slowly; an offset cancels in the difference, so only a
change faster than the curve allows raises an alarm. WINDOW is the fewest losses a refit needs
(so the curve can be fitted again at once, on the new regime alone), and Z = 5 keeps false
alarms rare with a test on every step. Both are in units of the measured noise, so they carry
over from one workload to another. O(WINDOW) floats per step on the training thread: the
curve's predictions are computed a block of steps at a time.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ChangeDetector", "WINDOW"]

WINDOW = 10  # steps per window: the fewest losses a refit needs
Z = 5.0  # standard errors of the difference of two window means
_BLOCK = 256  # curve predictions computed at once


@dataclass
class ChangeDetector:
    """Window-to-window changes of the losses against those of one fitted curve."""

    curve: Callable[[np.ndarray], np.ndarray] | None = None
    _recent: deque = field(default_factory=lambda: deque(maxlen=2 * WINDOW))  # (step, loss)
    _first: int = 0  # the step of _expected[0]
    _expected: list[float] = field(default_factory=list)

    def follow(self, curve: Callable[[np.ndarray], np.ndarray]) -> None:
        """Compare the losses with `curve` from now on (the recent ones too: a schedule that
        refits often must still see a window's worth of losses against its latest curve)."""
        self.curve = curve
        self._first, self._expected = 0, []

    def stop(self) -> None:
        """No curve to compare with (until the next `follow`)."""
        self.curve = None
        self._recent.clear()

    def observe(self, step: int, loss: float, noise: float) -> int | None:
        """Add one finite loss; returns the last step before the change, or None."""
        if self.curve is None:
            return None
        self._recent.append((step, loss))
        if len(self._recent) < 2 * WINDOW or not (math.isfinite(noise) and noise > 0):
            return None
        residuals = [loss - self._predicted(at) for at, loss in self._recent]
        gap = statistics.median(residuals[WINDOW:]) - statistics.median(residuals[:WINDOW])
        if abs(gap) > Z * noise * math.sqrt(math.pi / WINDOW):
            return self._split(residuals) - 1
        return None

    def _split(self, residuals: list[float]) -> int:
        """The first step after the change: where the residuals split best in two."""
        count, total = len(residuals), math.fsum(residuals)
        best, best_score, before = WINDOW, -1.0, 0.0
        for split in range(1, count):
            before += residuals[split - 1]
            gap = abs((total - before) / (count - split) - before / split)
            score = gap * math.sqrt(split * (count - split) / count)
            if score > best_score:
                best, best_score = split, score
        return self._recent[best][0]

    def _predicted(self, step: int) -> float:
        index = step - self._first
        if not self._expected or not 0 <= index < len(self._expected):
            self._first = step - 2 * WINDOW  # the window's older steps are asked for too
            steps = np.arange(self._first, self._first + _BLOCK, dtype=np.float64)
            self._expected = np.asarray(self.curve(steps), dtype=np.float64).tolist()
            index = step - self._first
        return self._expected[index]
