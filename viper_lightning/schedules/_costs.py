"""What a publish costs, as the predictive schedules learn it while training runs.

The plans need the time per training step, the training stall per publish, the consumer's
publish-to-serving latency and the publisher's writer time per version. Each starts as the
configured estimate (none for the writer) and is replaced by the median of the recent
measurements once there are any. The meter also keeps the schedule's clock, which may be
swapped for a simulated one.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..predictor._cil import PublishCosts

_RECENT = 64  # cost estimates are medians over this many measurements
_UNKNOWN_STEP_TIME_S = 1.0  # only until the first two steps have been timed
_MEASURED = ("stalls", "loads", "commits", "step_times")  # what survives a checkpoint, with the elapsed time


def _recent() -> deque[float]:
    return deque(maxlen=_RECENT)


@dataclass
class CostMeter:
    """The costs the next plan uses: measured medians, else the configured estimates.

    `step_time_s` None means the time per step is measured (publish stalls excluded).
    """

    step_time_s: float | None = None
    stall_s: float = 0.01
    load_time_s: float = 0.05
    stalls: deque[float] = field(default_factory=_recent)
    loads: deque[float] = field(default_factory=_recent)
    commits: deque[float] = field(default_factory=_recent)
    step_times: deque[float] = field(default_factory=_recent)
    clock: Callable[[], float] = time.perf_counter
    started_at: float | None = None
    elapsed_before: float = 0.0  # time since training started, carried over from an older clock or run
    last_tick: tuple[int, float] | None = None
    stall_since_tick: float = 0.0

    # -- the clock -------------------------------------------------------------------------------
    def set_clock(self, clock: Callable[[], float]) -> None:
        """Use `clock` from now on; the time since training started carries on from where the
        old clock left it."""
        if self.started_at is not None:
            self.elapsed_before = self.elapsed()
        self.clock, self.started_at = clock, None

    def elapsed(self) -> float:
        """Seconds since training started (the first call starts the count)."""
        if self.started_at is None:
            self.started_at = self.clock() - self.elapsed_before
        return self.clock() - self.started_at

    def tick(self, step: int) -> float:
        """Record the time per step (stalls excluded) and return the time since training started."""
        now_s = self.elapsed()
        if self.last_tick is not None and step > self.last_tick[0]:
            spent = now_s - self.last_tick[1] - self.stall_since_tick
            self.step_times.append(max(spent, 0.0) / (step - self.last_tick[0]))
        self.last_tick = (step, now_s)
        self.stall_since_tick = 0.0
        return now_s

    # -- measurements ----------------------------------------------------------------------------
    def published(self, stall_s: float) -> float:
        """A publish that stalled training `stall_s` seconds has just returned: record the stall
        and return when its version is expected to serve (the consumer's latency counts from
        the publish call)."""
        stall_s = float(stall_s) if math.isfinite(stall_s) and stall_s >= 0 else 0.0
        self.stalls.append(stall_s)
        self.stall_since_tick += stall_s
        return self.elapsed() - stall_s + self.load_time()

    def observe_load_time(self, seconds: float) -> None:
        _record(self.loads, seconds)

    def observe_commit_time(self, seconds: float) -> None:
        _record(self.commits, seconds)

    # -- estimates -------------------------------------------------------------------------------
    def step_time(self) -> float:
        if self.step_time_s is not None:
            return self.step_time_s
        measured = _median(self.step_times, 0.0)
        return measured if measured > 0 else _UNKNOWN_STEP_TIME_S

    def load_time(self) -> float:
        return _median(self.loads, self.load_time_s)

    def costs(self) -> PublishCosts:
        return PublishCosts(self.step_time(), _median(self.stalls, self.stall_s), self.load_time(),
                            _median(self.commits, 0.0))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        elapsed_s = self.elapsed() if self.started_at is not None else self.elapsed_before
        return {**{name: list(getattr(self, name)) for name in _MEASURED}, "elapsed_s": elapsed_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the measurements and the elapsed time (the clock and the estimates stay)."""
        for name in _MEASURED:
            samples = getattr(self, name)
            samples.clear()
            samples.extend(float(v) for v in state.get(name, []))
        self.started_at, self.elapsed_before = None, float(state.get("elapsed_s", 0.0))
        self.last_tick, self.stall_since_tick = None, 0.0


def _record(samples: deque[float], seconds: float) -> None:
    if math.isfinite(seconds) and seconds >= 0:
        samples.append(float(seconds))


def _median(values: deque[float], default: float) -> float:
    return statistics.median(values) if values else default
