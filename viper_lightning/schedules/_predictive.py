"""What `Fixed` and `Greedy` share: warm-up, measured costs, curve (re)fitting, CIL accounting.

Both watch the training loss through a warm-up (publishing every `fallback_interval` steps
meanwhile, and whenever the loss has dropped significantly: `ImprovementWatch`), then fit the
learning curve and plan. The paper fits once; by default they refit as real losses arrive, on
the last `fit_window` losses (`refit_every`, `refit_error`), which is what keeps the prediction
honest when the data drifts.

Beyond the paper, on by default:
- a change in the loss process (a concept shift, the end of a plateau, a curve that
  extrapolates badly) is detected (`ChangeDetector`, in units of the measured loss noise) and
  the curve is fitted again on the losses since the change, also by a schedule that otherwise
  fits once; the serving weights are then priced by the first losses after the change;
- what publishing may cost is bounded by shares of the training time, from the measured cost
  of a publish over the measured step time: the gap between publishes is capped where a
  publish per gap costs `publish_budget` (and by the span of the losses the curve was fitted
  on: a curve knows nothing further out), or at `max_interval` if set; and no two publishes
  come closer than where they would cost `max_publish_share`.
`observe_commit_time` lets plans count the wait for the publisher's writer. Everything here
runs on the training thread, so the per-step path is O(1) in plain floats and the numpy work
is left to the (re)fits.

The schedule keeps its settings and three parts, each with its own state round trip: the
costs it measures (`CostMeter`), the losses and versions it has seen (`LossHistory`), and
where its curve and plan stand (`FitState`). A checkpoint is the union of their state dicts.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._errors import ConfigurationError
from ..predictor._cil import CILPrediction, InferenceLoad, PublishCosts
from ..predictor._curves import FitError, LearningCurveFitter, LossCurve, LossPredictor
from ..predictor._plans import PlanContext
from ..predictor._staleness import StalenessModel, fit_staleness
from ._base import PublishSchedule
from ._change import WINDOW, ChangeDetector
from ._costs import CostMeter
from ._history import LossHistory

log = logging.getLogger("viper_lightning.predictor")

_MIN_REFIT_GAP = 10  # steps between error-triggered refits, so a poor fit is not refitted every step
_ERROR_WINDOW = 20  # recent losses compared with the curve to decide an error-triggered refit
_ERROR_CHECK_EVERY = 10  # steps between those comparisons (each costs a curve evaluation)
_STALENESS_WINDOWS = 3  # refits learn staleness from served losses of the last 3 fit windows
_NEAR = 5  # versions older than the fit window are scored by their observed loss ± this many steps
_FIRST_AFTER_CHANGE = 5  # losses right after a change that price the serving weights on the new data
_FIT_ERRORS = (FitError, ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError)


@dataclass
class FitState:
    """Where the learning curve stands: the last fit (its curve, the staleness learnt with it,
    the steps it covered), why there is none yet, the plan's prediction and the CIL accounted
    for the requests before that prediction."""

    prior: StalenessModel  # the configured staleness, until served losses teach another
    curve: LossCurve | None = None
    staleness: StalenessModel = field(init=False)
    fits: int = 0
    step: int = 0  # the last step of the last fit's data
    start: int = 0  # its first
    next_attempt: int = 0  # without a curve, the step at which fitting is retried
    failure: str | None = None  # why there is no curve
    fallback_reason: str | None = None  # the reason last logged for publishing on the fallback
    restoring: bool = False  # restored from a checkpoint: the next fit repeats the saved one
    regime_start: int = -1  # no fit uses losses of this step or before (a change was detected after it)
    changed: bool = False  # a change was detected and the curve is not fitted again yet
    prediction: CILPrediction | None = None
    cil_done: float = 0.0  # predicted CIL of the requests before `prediction.since_s`

    def __post_init__(self) -> None:
        self.staleness = self.prior

    @property
    def predicted_cil(self) -> float | None:
        return None if self.prediction is None else self.cil_done + self.prediction.cil

    def state_dict(self, elapsed_s: float) -> dict[str, Any]:
        """The fit count and step, and the CIL of the requests before `elapsed_s` (the plan that
        predicts the rest is made again after a restore)."""
        cil_done = self.cil_done
        if self.prediction is not None:
            cil_done += self.prediction.between(self.prediction.since_s, elapsed_s)
        return {"fits": self.fits, "fit_step": self.step, "cil_done": cil_done, "regime_start": self.regime_start,
                "changed": self.changed, "next_attempt": self.next_attempt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Curves are not saved (a user's predictor may not know how to serialise its own): the
        # next step refits, and a fit-once schedule refits exactly its original data.
        self.curve, self.staleness, self.prediction = None, self.prior, None
        self.start, self.next_attempt, self.failure, self.fallback_reason = 0, 0, None, None
        self.fits, self.step = int(state.get("fits", 0)), int(state.get("fit_step", 0))
        self.regime_start, self.changed = int(state.get("regime_start", -1)), bool(state.get("changed", False))
        self.cil_done = float(state.get("cil_done", 0.0))
        self.restoring = self.fits > 0 and not self.changed  # in a new warm-up: nothing to repeat
        if self.changed:
            self.next_attempt = int(state.get("next_attempt", 0))
            self.failure = "the losses changed: a new warm-up"


class _PredictiveSchedule(PublishSchedule):
    """Base of the predictor-driven schedules (see `Fixed` and `Greedy` for the arguments)."""

    needs_loss = True

    def __init__(self, *, request_rate: float, total_requests: int, warmup_steps: int, fallback_interval: int,
                 refit_every: int, refit_error: float, fit_window: int, step_time_s: float | None,
                 stall_s: float, load_time_s: float, staleness_per_step: float, probe_every: int,
                 predictor: LossPredictor | None, history: int, warmup_on_improvement: bool = False,
                 max_interval: int = 0, detect_changes: bool = True, publish_budget: float = 0.0,
                 max_publish_share: float = 0.0) -> None:
        self.load = InferenceLoad(float(request_rate), _count("total_requests", total_requests, 0))
        self.warmup_steps = _count("warmup_steps", warmup_steps, 0)
        self.fallback_interval = _count("fallback_interval", fallback_interval, 1)
        self.refit_every = _count("refit_every", refit_every, 0)
        self.refit_error = _seconds_or_ratio("refit_error", refit_error)
        self.fit_window = _count("fit_window", fit_window, 0)
        if step_time_s is not None and not (math.isfinite(step_time_s) and step_time_s > 0):
            raise ConfigurationError(f"step_time_s={step_time_s!r}: use a positive number of seconds, or "
                                     "None to measure it")
        self._meter = CostMeter(step_time_s, _seconds_or_ratio("stall_s", stall_s),
                                _seconds_or_ratio("load_time_s", load_time_s))
        self._fit = FitState(StalenessModel(linear=_seconds_or_ratio("staleness_per_step", staleness_per_step)))
        self.probe_every = _count("probe_every", probe_every, 0)
        self._losses = LossHistory(_count("history", history, 16))
        self.warmup_on_improvement = bool(warmup_on_improvement)
        self.max_interval = _count("max_interval", max_interval, 0)
        self.publish_budget = _share("publish_budget", publish_budget)
        self.max_publish_share = _share("max_publish_share", max_publish_share)
        if self.publish_budget and self.max_publish_share and self.max_publish_share <= self.publish_budget:
            raise ConfigurationError(f"max_publish_share={max_publish_share!r} must exceed publish_budget="
                                     f"{publish_budget!r}: the one caps what publishing costs, the other what it "
                                     "is allowed to cost at least")
        self._affordable_gap = 0  # steps between publishes that publish_budget pays for (0: none measured)
        self._shortest_gap = 1  # steps between publishes that max_publish_share allows
        if not isinstance(detect_changes, bool):
            raise ConfigurationError(f"detect_changes={detect_changes!r}: use True or False")
        self.detect_changes = detect_changes
        self._changes = ChangeDetector()
        # fits run on the training thread: by default only the family leading on the coarse grid
        # is polished by curve_fit, which keeps a (re)fit to a few milliseconds
        self.predictor = predictor if predictor is not None else LearningCurveFitter(polish=1)
        if not isinstance(self.predictor, LossPredictor):
            raise ConfigurationError(f"predictor must be a viper_lightning.predictor.LossPredictor, "
                                     f"got {type(self.predictor).__name__}")

    @property
    def refitting(self) -> bool:
        """Whether the curve is refitted as losses arrive (False: fitted once, as in the paper)."""
        return self.refit_every > 0 or self.refit_error > 0

    # -- inputs --------------------------------------------------------------------------------
    def set_clock(self, clock: Callable[[], float]) -> None:
        """Use `clock` (monotonic seconds) instead of `time.perf_counter`: for simulations and
        tests. The time since training started carries on from where the old clock left it."""
        self._meter.set_clock(clock)

    def observe_commit_time(self, seconds: float) -> None:
        """A measured background-writer time per version (the publisher's `last_commit`): plans
        then count the wait for a snapshot buffer when they publish faster than it writes."""
        self._meter.observe_commit_time(seconds)

    def observe_load_time(self, seconds: float) -> None:
        """A measured publish-to-serving latency from the consumer (e.g. `UpdateRecord.latency_s`)."""
        self._meter.observe_load_time(seconds)

    def observe_served_loss(self, version_step: int, loss: float) -> None:
        """The loss of the version published after `version_step`, measured on labelled data of
        the current step: teaches the schedule how fast a served version goes stale.

        Best measured on the batch this step trained on (what the training loss was computed
        on): the schedule then compares the two losses of the same batch, which cancels most of
        the batch-to-batch noise. Ground truth that reaches a consumer later works too, noisier.
        """
        self._losses.observe_served(version_step, loss)

    @property
    def probes(self) -> bool:
        return self.probe_every > 0 and (self.refitting or self._fit.fits == 0)

    def probe_versions(self, step: int) -> list[int]:
        """The published version whose loss on this step's batch the schedule would like, via
        `observe_served_loss` (every `probe_every` steps, during the warm-up and, when refitting,
        after it). Its age cycles through about 5, 10, 20, 40 and 80 steps, so staleness is
        measured at the ages a plan can produce, not only at the short ones that frequent
        publishing leaves the served version at."""
        due = self.probe_every > 0 and step > 0 and step % self.probe_every == 0
        if not due or not (self.refitting or self._fit.fits == 0):
            return []
        return [self._losses.probe_version(step, self.probe_every)]

    # -- the schedule interface ------------------------------------------------------------------
    def should_publish(self, step: int, loss: float | None = None) -> bool:
        now_s = self._meter.tick(step)
        self._observe(step, loss)
        if now_s >= self.load.horizon_s:
            return self._no_more_requests(step)
        wanted = self._wants(step, loss, now_s)
        return wanted and step - self._losses.last_published >= self._shortest_gap

    def _wants(self, step: int, loss: float | None, now_s: float) -> bool:
        """The rule's decision, before the ceiling on what publishing may cost."""
        if step <= self.warmup_steps:
            return step % self.fallback_interval == 0 or (self.warmup_on_improvement
                                                           and self._losses.watch.significant())
        self._watch_for_change(step, loss)
        if self._fit_due(step):
            self._fit_curve(step, now_s)
        if self._fit.curve is None:
            # after a change, also publish as soon as the losses have dropped significantly
            changed = self._fit.changed and self._losses.watch.significant()
            return self._fallback(step, self._fit.failure or "no loss curve yet") or changed
        overdue = step - self._losses.last_published >= self._longest_gap()
        return self._decide(step) or overdue

    def published(self, step: int, loss: float | None, stall_s: float) -> None:
        self._losses.record_publish(step, self._meter.published(stall_s))
        self._update_gaps()

    def _update_gaps(self) -> None:
        """The gaps that `publish_budget` pays for and `max_publish_share` allows, from the
        measured cost of a publish over the measured step time (none until a publish is seen)."""
        if not self._meter.stalls:
            return
        costs = self._meter.costs()
        steps_lost = costs.stall_s / costs.step_time_s  # training one publish costs, in steps
        if self.publish_budget:
            self._affordable_gap = max(1, math.ceil(steps_lost / self.publish_budget - 1e-9))
        if self.max_publish_share:
            self._shortest_gap = max(1, math.ceil(steps_lost / self.max_publish_share - 1e-9))

    def requests_ended(self) -> None:
        """No more requests will come (the consumers are gone, or the caller knows better than
        `total_requests`): from now on nothing is published, as past the last expected request.
        The callback still publishes the final weights when training ends."""
        self.load = InferenceLoad(self.load.request_rate, 0)

    @property
    def predicted_cil(self) -> float | None:
        """The predicted CIL of the whole run: each request as predicted by the last plan made
        before it arrived (so a refitting schedule's number is a chain of forecasts), plus the
        current plan's forecast for the requests still to come. None before the first fit."""
        return self._fit.predicted_cil

    @property
    def curve(self) -> LossCurve | None:
        return self._fit.curve

    @property
    def staleness(self) -> StalenessModel:
        return self._fit.staleness

    def costs(self) -> PublishCosts:
        """The costs the next plan will use: measured medians, else the configured estimates."""
        return self._meter.costs()

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

    def _plan_summary(self) -> str:
        return f"predicted CIL {self.predicted_cil:.4g}"

    def _repr_extra(self) -> str:
        """What a subclass adds to the repr's arguments."""
        return ""

    # -- losses ------------------------------------------------------------------------------------
    def _observe(self, step: int, loss: float | None) -> None:
        if not self._losses.observe(step, loss, warmup=step <= self.warmup_steps):
            count = self._losses.nonfinite
            if count in (1, 10, 100, 1000):
                log.warning("%r: ignoring non-finite training loss %r at step %d (%d so far)", self, loss, step,
                            count)

    # -- fitting -----------------------------------------------------------------------------------
    def _fit_due(self, step: int) -> bool:
        fit = self._fit
        if fit.restoring:
            return True
        if fit.curve is None:
            return step >= fit.next_attempt and (fit.fits == 0 or self.refitting or fit.changed)
        if not self.refitting:
            return False
        since = step - fit.step
        if self.refit_every and since >= self.refit_every:
            return True
        checked = since >= _MIN_REFIT_GAP and since % _ERROR_CHECK_EVERY == 0  # checking costs a curve evaluation
        return bool(self.refit_error) and checked and self._prediction_error() > self.refit_error

    def _prediction_error(self) -> float:
        """Relative gap between the recent mean loss and what the curve predicted for it; 0 when
        the gap is within the noise (under 3 standard errors), so a noisy loss alone does not
        keep triggering refits."""
        recent = self._losses.newest(_ERROR_WINDOW, after=self._fit.step)
        if len(recent) < 5:
            return 0.0
        steps, losses = zip(*recent)
        predicted = self._fit.curve(np.asarray(steps, dtype=np.float64)).tolist()  # one curve call; the rest is floats
        residuals = [loss - guess for loss, guess in zip(losses, predicted)]
        count = len(residuals)
        mean = math.fsum(residuals) / count
        spread = math.sqrt(max(math.fsum(r * r for r in residuals) / count - mean * mean, 0.0))
        if abs(mean) <= 3.0 * spread / math.sqrt(count):
            return 0.0
        return abs(mean) / max(abs(math.fsum(predicted) / count), 1e-12)

    def _fit_curve(self, step: int, now_s: float) -> None:
        # A restored schedule refits exactly the data of its last fit, so it predicts as before.
        fit = self._fit
        restoring = fit.restoring
        until = fit.step if restoring else step
        steps, losses = self._losses.fit_points(until, first=fit.fits == 0 or (restoring and not self.refitting),
                                                window=self.fit_window, since=fit.regime_start)
        try:
            curve = _checked(self.predictor.fit(steps, losses), steps, step)
            if not restoring and fit.fits == 0:
                self._after_first_fit([loss for _, loss in self._losses.warmup])
        except _FIT_ERRORS as exc:
            self._fit_failed(step, exc)
            return
        fit.fits += 0 if restoring else 1
        fit.curve, fit.step, fit.start = curve, until, int(steps.min())
        self._losses.forget_arrays()  # versions before the fit are scored on the losses seen up to it
        fit.failure, fit.restoring, fit.changed = None, False, False
        if self.detect_changes:
            self._changes.follow(curve)
        fit.staleness = self._fit_staleness(until)
        self._replan(step, now_s, restoring)
        if log.isEnabledFor(logging.INFO):
            log.info("%r at step %d: %s; %s", self, step, curve.describe(), self._plan_summary())

    def _longest_gap(self) -> int:
        """The most steps between publishes: `max_interval` if set; else the span of the losses
        the curve was fitted on, or fewer where publishing once per gap still costs under
        `publish_budget` of the training time (measured). A curve says nothing about the loss
        further out than the data it saw reaches, so a flat fit must not become "never publish
        again": the served version goes stale all the same, and without served-loss probes the
        schedule cannot see how fast. Publishing as often as the budget allows bounds that
        staleness at a cost the user chose, whatever the step counts of the workload."""
        if self.max_interval:
            return self.max_interval
        span = max(self.fallback_interval, self._fit.step - self._fit.start + 1)
        return min(span, self._affordable_gap) if self._affordable_gap else span

    def _watch_for_change(self, step: int, loss: float | None) -> None:
        """Drop the curve once the losses have left it for good (see `ChangeDetector`): the next
        fit uses only the losses since the change, whether or not the schedule refits otherwise."""
        fit = self._fit
        if not self.detect_changes or fit.curve is None or loss is None or not math.isfinite(loss):
            return
        since = self._changes.observe(step, loss, self._losses.watch.noise)
        if since is None:
            return
        log.info("%r at step %d: the losses left the fitted curve after step %d; fitting again on the losses "
                 "since then", self, step, since)
        fit.curve, fit.changed, fit.regime_start = None, True, since
        fit.failure = f"the losses changed after step {since}: a new warm-up"
        # a new regime gets a new warm-up: as many losses as the first fit had, before a fit
        fit.next_attempt = max(step + 1, since + 1 + max(WINDOW, self.warmup_steps))
        self._changes.stop()
        # The serving weights are at least as bad on the new data as the first losses after the
        # change (weights that had barely trained on it): the losses are compared with those, so
        # a drop since the change publishes, not only a drop below the old regime's level.
        first = [value for _, value in self._losses.newest(step - since, after=since)][-_FIRST_AFTER_CHANGE:]
        self._losses.watch.rebase(math.fsum(first) / len(first) if first else math.nan)

    def _fit_failed(self, step: int, exc: BaseException) -> None:
        """Keep the last good curve if there is one (a refit can fail on a bad window); without
        one, fall back to the default schedule and retry `fallback_interval` steps later."""
        self._fit.restoring = False
        if self._fit.curve is not None:
            log.warning("%r at step %d: refit failed (%s); keeping the previous curve", self, step, exc)
            self._fit.step = step
            return
        self._fit.failure = f"cannot fit the loss curve ({exc})"
        self._fit.next_attempt = step + self.fallback_interval

    def _fit_staleness(self, until: int) -> StalenessModel:
        prior = self._fit.prior
        oldest = until - _STALENESS_WINDOWS * self.fit_window if self.refitting and self.fit_window else -1
        served = self._losses.served_between(oldest, until)  # staleness changes as training goes on
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
        values = np.array(self._fit.curve(steps + 1.0), dtype=np.float64)
        early = steps + 1.0 < self._fit.start
        if np.any(early) and self._losses.observed:
            values[early] = self._losses.loss_near(steps[early] + 1.0, _NEAR, values[early])
        return values

    # -- planning and accounting -------------------------------------------------------------------
    def _replan(self, step: int, now_s: float, keep_choice: bool = False) -> None:
        fit = self._fit
        context = PlanContext(self._version_loss, self.load, self.costs(), fit.staleness, step, now_s,
                              self._losses.last_published, self._losses.live(), max_loss=self._losses.max_loss(),
                              max_interval=self._longest_gap())
        prediction = self._plan(context, keep_choice)
        if fit.prediction is not None:
            fit.cil_done += fit.prediction.between(fit.prediction.since_s, now_s)
        elif not keep_choice:  # restored: cil_done already counts everything before now
            fit.cil_done = _hindcast(context)
        fit.prediction = prediction

    def _no_more_requests(self, step: int) -> bool:
        """Past the last expected request a new version serves nobody: it would cost a stall
        and a write for nothing."""
        reason = "past the last expected request"
        if reason != self._fit.fallback_reason:
            log.warning("%r at step %d: %s (%d requests at %g/s); no more publishes until training ends", self,
                        step, reason, self.load.total_requests, self.load.request_rate)
            self._fit.fallback_reason = reason
        return False

    def _fallback(self, step: int, reason: str) -> bool:
        if reason != self._fit.fallback_reason:
            log.warning("%r at step %d: %s; publishing every %d steps (the fallback) until that changes",
                        self, step, reason, self.fallback_interval)
            self._fit.fallback_reason = reason
        return step % self.fallback_interval == 0

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        costs = self._meter.state_dict()
        return {**costs, **self._losses.state_dict(), **self._fit.state_dict(costs["elapsed_s"]),
                "requests_ended": self.load.total_requests == 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("requests_ended", False):
            self.requests_ended()
        self._meter.load_state_dict(state)
        self._losses.load_state_dict(state)
        self._fit.load_state_dict(state)
        self._update_gaps()

    def __repr__(self) -> str:
        refit = f", refit_every={self.refit_every}, refit_error={self.refit_error}" if self.refitting else ""
        return f"{type(self).__name__}(warmup_steps={self.warmup_steps}{refit}{self._repr_extra()})"


def _hindcast(context: PlanContext) -> float:
    """Requests before the first plan, scored with the first curve and the versions that were
    actually live (the warm-up has no forecast of its own)."""
    past = replace(context, now_step=0, now_s=0.0, last_published=0)
    return past.predict([]).between(0.0, context.now_s)


def _checked(curve: LossCurve, steps: np.ndarray, step: int) -> LossCurve:
    if not np.all(np.isfinite(curve(np.array([steps.min(), step, step + 1.0])))):
        raise FitError("the fitted curve predicts non-finite losses")
    return curve


def _count(name: str, value: int, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigurationError(f"{name}={value!r}: use an integer >= {minimum}")
    return value


def _share(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
        raise ConfigurationError(f"{name}={value!r}: use a share of the training time in [0, 1), e.g. 0.01, "
                                 "or 0 for none")
    return float(value)


def _seconds_or_ratio(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0):
        raise ConfigurationError(f"{name}={value!r}: use a finite number >= 0")
    return float(value)
