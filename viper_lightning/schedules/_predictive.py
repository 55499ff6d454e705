"""What `Fixed` and `Greedy` share: warm-up, measured costs, curve (re)fitting, CIL accounting.

Both watch the training loss through a warm-up (publishing every `fallback_interval` steps
meanwhile, which also measures the stall), then fit the learning curve and plan. The paper
fits once; with `refit_every` or `refit_error` they refit as real losses arrive, on the last
`fit_window` losses, which is what keeps the prediction honest when the data drifts.

Beyond the paper, and all off by default: `warmup_on_improvement` also publishes during the
warm-up when the training loss has dropped significantly (`ImprovementWatch`), `max_interval`
caps the gap between publishes whatever the curve predicts, and `observe_commit_time` lets
plans count the wait for the publisher's writer. Everything here runs on the training thread,
so the per-step path is O(1) in plain floats and the numpy work is left to the (re)fits.
"""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .._errors import ConfigurationError
from ..predictor._cil import CILPrediction, InferenceLoad, PublishCosts
from ..predictor._curves import FitError, LearningCurveFitter, LossCurve, LossPredictor, finite_points
from ..predictor._plans import PlanContext
from ..predictor._staleness import StalenessModel, fit_staleness
from ._base import PublishSchedule
from ._improvement import ImprovementWatch

log = logging.getLogger("viper_lightning.predictor")

_RECENT = 64  # cost estimates are medians over this many measurements
_KEEP_PUBLISHED = 256  # versions remembered: which one serves, and older ones to probe staleness with
_PROBE_AGES = (5, 10, 20, 40, 80)
_KEEP_SERVED = 512  # served-loss observations kept for the staleness fit
_MIN_REFIT_GAP = 10  # steps between error-triggered refits, so a poor fit is not refitted every step
_ERROR_WINDOW = 20  # recent losses compared with the curve to decide an error-triggered refit
_ERROR_CHECK_EVERY = 10  # steps between those comparisons (each costs a curve evaluation)
_STALENESS_WINDOWS = 3  # refits learn staleness from served losses of the last 3 fit windows
_NEAR = 5  # versions older than the fit window are scored by their observed loss ± this many steps
_UNKNOWN_STEP_TIME_S = 1.0  # only until the first two steps have been timed
_FIT_ERRORS = (FitError, ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError)


class _PredictiveSchedule(PublishSchedule):
    """Base of the predictor-driven schedules (see `Fixed` and `Greedy` for the arguments)."""

    needs_loss = True

    def __init__(self, *, request_rate: float, total_requests: int, warmup_steps: int, fallback_interval: int,
                 refit_every: int, refit_error: float, fit_window: int, step_time_s: float | None,
                 stall_s: float, load_time_s: float, staleness_per_step: float, probe_every: int,
                 predictor: LossPredictor | None, history: int, warmup_on_improvement: bool = False,
                 max_interval: int = 0) -> None:
        self.load = InferenceLoad(float(request_rate), _count("total_requests", total_requests, 0))
        self.warmup_steps = _count("warmup_steps", warmup_steps, 0)
        self.fallback_interval = _count("fallback_interval", fallback_interval, 1)
        self.refit_every = _count("refit_every", refit_every, 0)
        self.refit_error = _seconds_or_ratio("refit_error", refit_error)
        self.fit_window = _count("fit_window", fit_window, 0)
        if step_time_s is not None and not (math.isfinite(step_time_s) and step_time_s > 0):
            raise ConfigurationError(f"step_time_s={step_time_s!r}: use a positive number of seconds, or "
                                     "None to measure it")
        self.step_time_s = step_time_s
        self.stall_s = _seconds_or_ratio("stall_s", stall_s)
        self.load_time_s = _seconds_or_ratio("load_time_s", load_time_s)
        self.staleness_per_step = _seconds_or_ratio("staleness_per_step", staleness_per_step)
        self.probe_every = _count("probe_every", probe_every, 0)
        self.history = _count("history", history, 16)
        self.warmup_on_improvement = bool(warmup_on_improvement)
        self.max_interval = _count("max_interval", max_interval, 0)
        self.predictor = predictor if predictor is not None else LearningCurveFitter()
        if not isinstance(self.predictor, LossPredictor):
            raise ConfigurationError(f"predictor must be a viper_lightning.predictor.LossPredictor, "
                                     f"got {type(self.predictor).__name__}")
        self._clock: Callable[[], float] = time.perf_counter
        self._reset()

    @property
    def refitting(self) -> bool:
        """Whether the curve is refitted as losses arrive (False: fitted once, as in the paper)."""
        return self.refit_every > 0 or self.refit_error > 0

    # -- inputs --------------------------------------------------------------------------------
    def set_clock(self, clock: Callable[[], float]) -> None:
        """Use `clock` (monotonic seconds) instead of `time.perf_counter`: for simulations and
        tests. The time since training started carries on from where the old clock left it."""
        if self._started_at is not None:
            self._elapsed_before = self._elapsed()
        self._clock, self._started_at = clock, None

    def observe_commit_time(self, seconds: float) -> None:
        """A measured background-writer time per version (the publisher's `last_commit`): plans
        then count the wait for a snapshot buffer when they publish faster than it writes."""
        if math.isfinite(seconds) and seconds >= 0:
            self._commits.append(float(seconds))

    def observe_load_time(self, seconds: float) -> None:
        """A measured publish-to-serving latency from the consumer (e.g. `UpdateRecord.latency_s`)."""
        if math.isfinite(seconds) and seconds >= 0:
            self._loads.append(float(seconds))

    def observe_served_loss(self, version_step: int, loss: float) -> None:
        """The loss of the version published after `version_step`, measured on labelled data of
        the current step: teaches the schedule how fast a served version goes stale.

        Best measured on the batch this step trained on (what the training loss was computed
        on): the schedule then compares the two losses of the same batch, which cancels most of
        the batch-to-batch noise. Ground truth that reaches a consumer later works too, noisier.
        """
        if math.isfinite(loss) and 0 <= version_step <= self._last_step:
            paired = self._last_loss if self._last_loss_step == self._last_step else math.nan
            self._served.append((self._last_step, int(version_step), float(loss), paired))

    def probe_versions(self, step: int) -> list[int]:
        """The published version whose loss on this step's batch the schedule would like, via
        `observe_served_loss` (every `probe_every` steps, during the warm-up and, when refitting,
        after it). Its age cycles through about 5, 10, 20, 40 and 80 steps, so staleness is
        measured at the ages a plan can produce, not only at the short ones that frequent
        publishing leaves the served version at."""
        due = self.probe_every > 0 and step > 0 and step % self.probe_every == 0
        if not due or not (self.refitting or self._fits == 0):
            return []
        target = step - _PROBE_AGES[(step // self.probe_every) % len(_PROBE_AGES)]
        candidates = [s for s, _ in self._published if s <= target] or [self._last_published]
        return [max(candidates)]

    # -- the schedule interface ------------------------------------------------------------------
    def should_publish(self, step: int, loss: float | None = None) -> bool:
        now_s = self._tick(step)
        self._observe(step, loss)
        if step <= self.warmup_steps:
            return step % self.fallback_interval == 0 or (self.warmup_on_improvement and self._watch.significant())
        if now_s >= self.load.horizon_s:
            return self._fallback(step, "past the last expected request")
        if self._fit_due(step):
            self._fit(step, now_s)
        if self._curve is None:
            return self._fallback(step, self._fit_failure or "no loss curve yet")
        overdue = bool(self.max_interval) and step - self._last_published >= self.max_interval
        return self._decide(step) or overdue

    def published(self, step: int, loss: float | None, stall_s: float) -> None:
        stall_s = float(stall_s) if math.isfinite(stall_s) and stall_s >= 0 else 0.0
        self._stalls.append(stall_s)
        self._stall_since_tick += stall_s
        started_s = self._elapsed() - stall_s  # the consumer's latency counts from the publish call
        self._published.append((int(step), started_s + self._load_time()))
        self._last_published = int(step)
        self._publishes += 1
        self._watch.published()

    @property
    def predicted_cil(self) -> float | None:
        """The predicted CIL of the whole run: each request as predicted by the last plan made
        before it arrived (so a refitting schedule's number is a chain of forecasts), plus the
        current plan's forecast for the requests still to come. None before the first fit."""
        if self._prediction is None:
            return None
        return self._cil_done + self._prediction.cil

    @property
    def curve(self) -> LossCurve | None:
        return self._curve

    @property
    def staleness(self) -> StalenessModel:
        return self._staleness

    def costs(self) -> PublishCosts:
        """The costs the next plan will use: measured medians, else the configured estimates."""
        return PublishCosts(self._step_time(), _median(self._stalls, self.stall_s), self._load_time(),
                            _median(self._commits, 0.0))

    # -- subclass hooks ----------------------------------------------------------------------------
    @abstractmethod
    def _plan(self, context: PlanContext, keep_choice: bool) -> CILPrediction:
        """Choose what to do from now on (or, with `keep_choice`, apply the choice already made:
        after a restore, or to plan further ahead); return the predicted CIL of that choice."""

    @abstractmethod
    def _decide(self, step: int) -> bool:
        """Whether the plan publishes after `step` (once a curve is fitted)."""

    def _after_first_fit(self, warmup_losses: list[float]) -> None:
        """Hook run once, with the first curve; raising `FitError` keeps the schedule on its fallback."""

    # -- time and costs ----------------------------------------------------------------------------
    def _elapsed(self) -> float:
        if self._started_at is None:
            self._started_at = self._clock() - self._elapsed_before
        return self._clock() - self._started_at

    def _tick(self, step: int) -> float:
        """Record the time per step (stalls excluded) and return the time since training started."""
        now_s = self._elapsed()
        if self._last_tick is not None and step > self._last_tick[0]:
            spent = now_s - self._last_tick[1] - self._stall_since_tick
            self._step_times.append(max(spent, 0.0) / (step - self._last_tick[0]))
        self._last_tick = (step, now_s)
        self._stall_since_tick = 0.0
        return now_s

    def _step_time(self) -> float:
        if self.step_time_s is not None:
            return self.step_time_s
        measured = _median(self._step_times, 0.0)
        return measured if measured > 0 else _UNKNOWN_STEP_TIME_S

    def _load_time(self) -> float:
        return _median(self._loads, self.load_time_s)

    # -- losses ------------------------------------------------------------------------------------
    def _observe(self, step: int, loss: float | None) -> None:
        self._last_step = step
        if loss is None:
            return
        if not math.isfinite(loss):
            self._nonfinite += 1
            if self._nonfinite in (1, 10, 100, 1000):
                log.warning("%r: ignoring non-finite training loss %r at step %d (%d so far)", self, loss,
                            step, self._nonfinite)
            return
        self._observed.append((int(step), float(loss)))
        self._watch.observe(float(loss))
        self._last_loss, self._last_loss_step = float(loss), int(step)
        self._worst_loss = max(self._worst_loss, float(loss))
        self._best_loss = min(self._best_loss, float(loss))
        if step <= self.warmup_steps:
            self._warmup.append((int(step), float(loss)))

    def _fit_data(self, until: int, first: bool) -> tuple[np.ndarray, np.ndarray]:
        """The losses to fit: for a first (or only) fit everything up to `until`, the warm-up
        included even if the bounded history has dropped it; later, the last `fit_window`."""
        points = [point for point in self._observed if point[0] <= until]
        if first:
            oldest = points[0][0] if points else until + 1
            points = [point for point in self._warmup if point[0] < oldest] + points
        elif self.fit_window:
            points = points[-self.fit_window:]
        steps, losses = zip(*points) if points else ((), ())
        return finite_points(steps, losses)

    # -- fitting -----------------------------------------------------------------------------------
    def _fit_due(self, step: int) -> bool:
        if self._pending_restore:
            return True
        if self._curve is None:
            return step >= self._next_fit_attempt and (self._fits == 0 or self.refitting)
        if not self.refitting:
            return False
        since = step - self._fit_step
        if self.refit_every and since >= self.refit_every:
            return True
        checked = since >= _MIN_REFIT_GAP and since % _ERROR_CHECK_EVERY == 0  # checking costs a curve evaluation
        return bool(self.refit_error) and checked and self._prediction_error() > self.refit_error

    def _prediction_error(self) -> float:
        """Relative gap between the recent mean loss and what the curve predicted for it; 0 when
        the gap is within the noise (under 3 standard errors), so a noisy loss alone does not
        keep triggering refits."""
        newest = itertools.islice(reversed(self._observed), _ERROR_WINDOW)
        recent = [(s, v) for s, v in newest if s > self._fit_step]
        if len(recent) < 5:
            return 0.0
        steps, losses = zip(*recent)
        predicted = self._curve(np.asarray(steps, dtype=np.float64)).tolist()  # one curve call; the rest is floats
        residuals = [loss - guess for loss, guess in zip(losses, predicted)]
        count = len(residuals)
        mean = math.fsum(residuals) / count
        spread = math.sqrt(max(math.fsum(r * r for r in residuals) / count - mean * mean, 0.0))
        if abs(mean) <= 3.0 * spread / math.sqrt(count):
            return 0.0
        return abs(mean) / max(abs(math.fsum(predicted) / count), 1e-12)

    def _fit(self, step: int, now_s: float) -> None:
        # A restored schedule refits exactly the data of its last fit, so it predicts as before.
        restoring = self._pending_restore
        until = self._fit_step if restoring else step
        steps, losses = self._fit_data(until, first=self._fits == 0 or (restoring and not self.refitting))
        try:
            curve = _checked(self.predictor.fit(steps, losses), steps, step)
            if not restoring and self._fits == 0:
                self._after_first_fit([loss for _, loss in self._warmup])
        except _FIT_ERRORS as exc:
            self._fit_failed(step, exc)
            return
        self._fits += 0 if restoring else 1
        self._curve, self._fit_step, self._fit_start = curve, until, int(steps.min())
        self._history_arrays = None  # rebuilt on demand from the losses seen up to this fit
        self._fit_failure, self._pending_restore = None, False
        self._staleness = self._fit_staleness(until)
        self._replan(step, now_s, restoring)
        if log.isEnabledFor(logging.INFO):
            log.info("%r at step %d: %s; %s", self, step, curve.describe(), self._plan_summary())

    def _fit_failed(self, step: int, exc: BaseException) -> None:
        """Keep the last good curve if there is one (a refit can fail on a bad window); without
        one, fall back to the default schedule and retry `fallback_interval` steps later."""
        self._pending_restore = False
        if self._curve is not None:
            log.warning("%r at step %d: refit failed (%s); keeping the previous curve", self, step, exc)
            self._fit_step = step
            return
        self._fit_failure = f"cannot fit the loss curve ({exc})"
        self._next_fit_attempt = step + self.fallback_interval

    def _fit_staleness(self, until: int) -> StalenessModel:
        prior = StalenessModel(linear=self.staleness_per_step)
        oldest = until - _STALENESS_WINDOWS * self.fit_window if self.refitting and self.fit_window else -1
        served = [o for o in self._served if oldest < o[0] <= until]  # staleness changes as training goes on
        if not served:
            return prior
        steps, versions, losses, paired = (np.array(column, dtype=np.float64) for column in zip(*served))
        # The weights that logged the loss at step k are those after step k − 1.
        current = steps - 1.0
        expected_gap = self._version_loss(versions) - self._version_loss(current)
        residuals = np.where(np.isfinite(paired), losses - paired - expected_gap,
                             losses - self._version_loss(versions))
        return fit_staleness(current - versions, residuals, prior)

    def _version_loss(self, steps: np.ndarray) -> np.ndarray:
        """Predicted loss of the versions published after `steps`. The loss logged at step s+1 is
        that of the weights after step s; versions older than the fit window are scored by the
        losses observed around them, since the curve was not fitted there."""
        steps = np.asarray(steps, dtype=np.float64)
        values = np.array(self._curve(steps + 1.0), dtype=np.float64)
        early = steps + 1.0 < self._fit_start
        if np.any(early) and self._observed:
            if self._history_arrays is None:
                self._history_arrays = finite_points(*zip(*self._observed))
            values[early] = _mean_near(*self._history_arrays, steps[early] + 1.0, _NEAR, values[early])
        return values

    # -- planning and accounting -------------------------------------------------------------------
    def _replan(self, step: int, now_s: float, keep_choice: bool = False) -> None:
        context = PlanContext(self._version_loss, self.load, self.costs(), self._staleness, step, now_s,
                              self._last_published, ((0, 0.0), *self._published), max_loss=self._max_loss(),
                              max_interval=self.max_interval or None)
        prediction = self._plan(context, keep_choice)
        if self._prediction is not None:
            self._cil_done += self._prediction.between(self._prediction.since_s, now_s)
        elif not keep_choice:  # restored: cil_done already counts everything before now
            self._cil_done = self._hindcast(context)
        self._prediction = prediction

    def _hindcast(self, context: PlanContext) -> float:
        """Requests before the first plan, scored with the first curve and the versions that were
        actually live (the warm-up has no forecast of its own)."""
        past = PlanContext(context.version_loss, context.load, context.costs, context.staleness, 0, 0.0, 0,
                           context.live, max_loss=context.max_loss, max_interval=context.max_interval)
        return past.predict([]).between(0.0, context.now_s)

    def _plan_summary(self) -> str:
        return f"predicted CIL {self.predicted_cil:.4g}"

    def _repr_extra(self) -> str:
        """What a subclass adds to the repr's arguments."""
        return ""

    def _max_loss(self) -> float:
        """A served version is predicted to answer no worse than the worst training loss seen
        (typically the untrained model's) plus as much again: staleness is extrapolated from
        short ages and must not run away, but a stale model may well be worse than a new one."""
        if self._worst_loss == -math.inf:
            return math.inf
        return self._worst_loss + max(self._worst_loss - self._best_loss, abs(self._worst_loss))

    def _fallback(self, step: int, reason: str) -> bool:
        if reason != self._fallback_reason:
            log.warning("%r at step %d: %s; publishing every %d steps (the fallback) until that changes",
                        self, step, reason, self.fallback_interval)
            self._fallback_reason = reason
        return step % self.fallback_interval == 0

    # -- state -------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._observed: deque[tuple[int, float]] = deque(maxlen=self.history)
        self._warmup: list[tuple[int, float]] = []
        self._served: deque[tuple[int, int, float, float]] = deque(maxlen=_KEEP_SERVED)
        self._last_loss, self._last_loss_step = math.nan, -1
        self._stalls: deque[float] = deque(maxlen=_RECENT)
        self._loads: deque[float] = deque(maxlen=_RECENT)
        self._commits: deque[float] = deque(maxlen=_RECENT)
        self._step_times: deque[float] = deque(maxlen=_RECENT)
        self._published: deque[tuple[int, float]] = deque(maxlen=_KEEP_PUBLISHED)
        self._last_published, self._publishes, self._last_step, self._nonfinite = 0, 0, 0, 0
        self._worst_loss, self._best_loss = -math.inf, math.inf
        self._started_at: float | None = None
        self._elapsed_before = 0.0
        self._last_tick: tuple[int, float] | None = None
        self._stall_since_tick = 0.0
        self._curve: LossCurve | None = None
        self._fits, self._fit_step, self._fit_start, self._next_fit_attempt = 0, 0, 0, 0
        self._history_arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._staleness = StalenessModel(linear=self.staleness_per_step)
        self._fit_failure: str | None = None
        self._fallback_reason: str | None = None
        self._prediction: CILPrediction | None = None
        self._cil_done = 0.0
        self._pending_restore = False
        self._watch = ImprovementWatch()

    def state_dict(self) -> dict[str, Any]:
        elapsed_s = self._elapsed() if self._started_at is not None else self._elapsed_before
        cil_done = self._cil_done
        if self._prediction is not None:
            cil_done += self._prediction.between(self._prediction.since_s, elapsed_s)
        return {
            "observed": [list(p) for p in self._observed], "warmup": [list(p) for p in self._warmup],
            "served": [[k, v, loss, None if math.isnan(paired) else paired] for k, v, loss, paired in self._served],
            "stalls": list(self._stalls),
            "loads": list(self._loads), "commits": list(self._commits), "step_times": list(self._step_times),
            "published": [list(p) for p in self._published], "last_published": self._last_published,
            "publishes": self._publishes, "last_step": self._last_step, "nonfinite": self._nonfinite,
            "elapsed_s": elapsed_s, "fits": self._fits, "fit_step": self._fit_step, "cil_done": cil_done,
            "worst_loss": self._worst_loss if math.isfinite(self._worst_loss) else None,
            "best_loss": self._best_loss if math.isfinite(self._best_loss) else None,
            "warmup_watch": self._watch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset()
        self._observed.extend((int(s), float(v)) for s, v in state.get("observed", []))
        self._warmup = [(int(s), float(v)) for s, v in state.get("warmup", [])]
        self._served.extend((int(k), int(v), float(loss), math.nan if paired is None else float(paired))
                            for k, v, loss, paired in state.get("served", []))
        self._stalls.extend(float(v) for v in state.get("stalls", []))
        self._loads.extend(float(v) for v in state.get("loads", []))
        self._commits.extend(float(v) for v in state.get("commits", []))
        self._step_times.extend(float(v) for v in state.get("step_times", []))
        self._published.extend((int(s), float(t)) for s, t in state.get("published", []))
        self._last_published = int(state.get("last_published", 0))
        self._publishes = int(state.get("publishes", 0))
        self._last_step = int(state.get("last_step", 0))
        self._nonfinite = int(state.get("nonfinite", 0))
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self._cil_done = float(state.get("cil_done", 0.0))
        self._watch = ImprovementWatch.from_state(state.get("warmup_watch", {}), self._watch.z)
        worst, best = state.get("worst_loss"), state.get("best_loss")
        self._worst_loss = -math.inf if worst is None else float(worst)
        self._best_loss = math.inf if best is None else float(best)
        # Curves are not saved (a user's predictor may not know how to serialise its own): the
        # next step refits, and a fit-once schedule refits exactly its original data.
        self._fits, self._fit_step = int(state.get("fits", 0)), int(state.get("fit_step", 0))
        self._pending_restore = self._fits > 0

    def __repr__(self) -> str:
        refit = f", refit_every={self.refit_every}, refit_error={self.refit_error}" if self.refitting else ""
        return f"{type(self).__name__}(warmup_steps={self.warmup_steps}{refit}{self._repr_extra()})"


def _checked(curve: LossCurve, steps: np.ndarray, step: int) -> LossCurve:
    if not np.all(np.isfinite(curve(np.array([steps.min(), step, step + 1.0])))):
        raise FitError("the fitted curve predicts non-finite losses")
    return curve


def _count(name: str, value: int, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigurationError(f"{name}={value!r}: use an integer >= {minimum}")
    return value


def _seconds_or_ratio(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0):
        raise ConfigurationError(f"{name}={value!r}: use a finite number >= 0")
    return float(value)


def _median(values: deque[float], default: float) -> float:
    return statistics.median(values) if values else default


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
