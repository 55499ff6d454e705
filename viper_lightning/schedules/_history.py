"""What the predictive schedules have seen: training losses, served losses, published versions.

The training losses (a bounded window, plus the warm-up's kept whole for a first fit) are what
the curve is fitted to; the served losses, measured on versions the schedule asked to probe,
are what the staleness model is fitted to; the published versions say which one serves and
which older ones can be probed. Everything is appended on the training thread in plain floats.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..predictor._curves import finite_points
from ._improvement import ImprovementWatch

_KEEP_PUBLISHED = 256  # versions remembered: which one serves, and older ones to probe staleness with
_KEEP_SERVED = 512  # served-loss observations kept for the staleness fit
_PROBE_AGES = (5, 10, 20, 40, 80)

Served = tuple[int, int, float, float]
"""A served-loss observation: (step measured at, version step, its loss, the training loss of that step or NaN)."""


@dataclass
class LossHistory:
    """The losses and versions a predictive schedule keeps (`size`: training losses kept)."""

    size: int = 10_000
    observed: deque[tuple[int, float]] = field(init=False)
    warmup: list[tuple[int, float]] = field(default_factory=list)
    served: deque[Served] = field(default_factory=lambda: deque(maxlen=_KEEP_SERVED))
    published: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=_KEEP_PUBLISHED))
    last_published: int = 0
    publishes: int = 0
    last_step: int = 0
    last_loss: float = math.nan
    last_loss_step: int = -1
    nonfinite: int = 0
    worst: float = -math.inf
    best: float = math.inf
    watch: ImprovementWatch = field(default_factory=ImprovementWatch)  # the significant-drop rule's sums
    _arrays: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.observed = deque(maxlen=self.size)

    # -- recording -------------------------------------------------------------------------------
    def observe(self, step: int, loss: float | None, warmup: bool) -> bool:
        """The training loss of `step` (None: not computed); False if it was not finite."""
        self.last_step = step
        if loss is None:
            return True
        if not math.isfinite(loss):
            self.nonfinite += 1
            return False
        self.observed.append((int(step), float(loss)))
        self.watch.observe(float(loss))
        self.last_loss, self.last_loss_step = float(loss), int(step)
        self.worst = max(self.worst, float(loss))
        self.best = min(self.best, float(loss))
        if warmup:
            self.warmup.append((int(step), float(loss)))
        return True

    def observe_served(self, version_step: int, loss: float) -> None:
        """The loss of the version published after `version_step` on the current step's data,
        paired with this step's training loss when there is one."""
        if math.isfinite(loss) and 0 <= version_step <= self.last_step:
            paired = self.last_loss if self.last_loss_step == self.last_step else math.nan
            self.served.append((self.last_step, int(version_step), float(loss), paired))

    def record_publish(self, step: int, live_s: float) -> None:
        """The version published after `step`, expected to serve from `live_s`."""
        self.published.append((int(step), live_s))
        self.last_published = int(step)
        self.publishes += 1
        self.watch.published()

    # -- reading ---------------------------------------------------------------------------------
    def live(self) -> tuple[tuple[int, float], ...]:
        """Every version known to serve, as (step, from when): the initial weights, then those published."""
        return ((0, 0.0), *self.published)

    def probe_version(self, step: int, every: int) -> int:
        """The newest published version at least a probe age old; the age cycles through about
        5 to 80 steps with the probe count."""
        target = step - _PROBE_AGES[(step // every) % len(_PROBE_AGES)]
        return max([s for s, _ in self.published if s <= target] or [self.last_published])

    def fit_points(self, until: int, first: bool, window: int, since: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """The losses to fit: for a first (or only) fit everything up to `until`, the warm-up
        included even if the bounded history has dropped it; later, the last `window` (0: all).
        Never a loss of step `since` or before (the loss process changed after it)."""
        points = [point for point in self.observed if since < point[0] <= until]
        if first:
            oldest = points[0][0] if points else until + 1
            points = [point for point in self.warmup if since < point[0] < oldest] + points
        elif window:
            points = points[-window:]
        steps, losses = zip(*points) if points else ((), ())
        return finite_points(steps, losses)

    def newest(self, count: int, after: int) -> list[tuple[int, float]]:
        """Up to the `count` newest losses, of steps after `after`, newest first."""
        return [(s, v) for s, v in itertools.islice(reversed(self.observed), count) if s > after]

    def served_between(self, oldest: int, until: int) -> list[Served]:
        """Served-loss observations measured after step `oldest`, up to `until`."""
        return [o for o in self.served if oldest < o[0] <= until]

    def loss_near(self, at: np.ndarray, radius: float, default: np.ndarray) -> np.ndarray:
        """Mean observed loss within ±radius steps of each of `at` (default where none was
        seen), on the losses as they were at the last `forget_arrays`."""
        if self._arrays is None:
            self._arrays = finite_points(*zip(*self.observed))
        return _mean_near(*self._arrays, at, radius, default)

    def forget_arrays(self) -> None:
        """A new curve: `loss_near` reads the losses seen by now, from its next call."""
        self._arrays = None

    def max_loss(self) -> float:
        """A served version is predicted to answer no worse than the worst training loss seen
        (typically the untrained model's) plus as much again: staleness is extrapolated from
        short ages and must not run away, but a stale model may well be worse than a new one."""
        if self.worst == -math.inf:
            return math.inf
        return self.worst + max(self.worst - self.best, abs(self.worst))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "observed": [list(p) for p in self.observed], "warmup": [list(p) for p in self.warmup],
            "served": [[k, v, loss, None if math.isnan(paired) else paired] for k, v, loss, paired in self.served],
            "published": [list(p) for p in self.published], "last_published": self.last_published,
            "publishes": self.publishes, "last_step": self.last_step, "nonfinite": self.nonfinite,
            "worst_loss": self.worst if math.isfinite(self.worst) else None,
            "best_loss": self.best if math.isfinite(self.best) else None,
            "warmup_watch": self.watch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace everything with what `state_dict` returned (the size and the watch's z stay)."""
        self.observed = deque(((int(s), float(v)) for s, v in state.get("observed", [])), maxlen=self.size)
        self.warmup = [(int(s), float(v)) for s, v in state.get("warmup", [])]
        self.served = deque(((int(k), int(v), float(loss), math.nan if paired is None else float(paired))
                             for k, v, loss, paired in state.get("served", [])), maxlen=_KEEP_SERVED)
        self.published = deque(((int(s), float(t)) for s, t in state.get("published", [])), maxlen=_KEEP_PUBLISHED)
        self.last_published = int(state.get("last_published", 0))
        self.publishes = int(state.get("publishes", 0))
        self.last_step = int(state.get("last_step", 0))
        self.nonfinite = int(state.get("nonfinite", 0))
        worst, best = state.get("worst_loss"), state.get("best_loss")
        self.worst = -math.inf if worst is None else float(worst)
        self.best = math.inf if best is None else float(best)
        self.watch = ImprovementWatch.from_state(state.get("warmup_watch", {}), self.watch.z)
        self.last_loss, self.last_loss_step = math.nan, -1  # as before a restore: not saved
        self._arrays = None


def _mean_near(steps: np.ndarray, losses: np.ndarray, at: np.ndarray, radius: float,
               default: np.ndarray) -> np.ndarray:
    """Mean observed loss within ±radius steps of each of `at` (default where none was seen)."""
    order = np.argsort(steps, kind="stable")
    steps, losses = steps[order], losses[order]
    sums = np.concatenate([[0.0], np.cumsum(losses)])
    low = np.searchsorted(steps, at - radius, side="left")
    high = np.searchsorted(steps, at + radius, side="right")
    counts = high - low
    means = (sums[high] - sums[low]) / np.maximum(counts, 1)
    return np.where(counts > 0, means, default)
