"""Greedy: the Viper paper's Algorithm 3, publish when the predicted improvement is significant."""

from __future__ import annotations

from typing import Any

from .._errors import ConfigurationError
from ..predictor._cil import CILPrediction
from ..predictor._curves import LossPredictor
from ..predictor._plans import (
    PLAN_WINDOW,
    PlanContext,
    best_greedy_threshold,
    greedy_plan,
    greedy_prediction,
    greedy_threshold,
    significant_drop_plan,
)
from ._predictive import _PredictiveSchedule

__all__ = ["Greedy"]


class Greedy(_PredictiveSchedule):
    """Publish when the predicted loss has dropped below the last published version's by more
    than a threshold: the mean plus the standard deviation of the step-to-step loss drops seen
    during the warm-up (a drop bigger than the usual step-to-step change).

    Publishes follow the curve: often while the loss falls fast, rarely once it flattens. Under
    drift the last published version's loss also grows with its age (the staleness model,
    learnt from `observe_served_loss` or set by `staleness_per_step`), so a flat curve still
    gets a publish once the served version has gone stale enough. The rule is run forward on
    the curve at each (re)fit, which gives the publish steps and their predicted CIL (Algorithm
    1 on that plan).

    The warm-up threshold measures the loss's noise, not what a publish costs or what a stale
    answer costs. With `tune_threshold` the threshold is instead the multiple of it (1/32 to 4)
    whose plan has the lowest predicted CIL, re-chosen at every refit.

    With `follow_losses` the rule is applied to the observed training losses instead of the
    curve's prediction: publish when the mean loss since the last publish has fallen below that
    of the serving weights (plus their predicted staleness) by more than two standard errors of
    the step-to-step noise. A curve fitted on a short window can miss a drop that is happening
    (or promise one that is not); the losses cannot, and the test costs O(1) per step. The curve
    still forecasts the CIL (the same rule run forward on it) and the staleness still counts;
    a drifting flat loss never drops significantly, which the cap on the gap between publishes
    (`publish_budget`, or `max_interval`) answers. It is the default.

    Args:
        threshold: a fixed threshold instead of the warm-up's mean + std (None: from the warm-up).
        tune_threshold: choose the threshold by predicted CIL, as above (False: the paper's rule).
        follow_losses: decide on the observed losses, as above (`threshold` and
            `tune_threshold` then do not apply).
        Every other argument is as for `Fixed`.
    """

    def __init__(
        self,
        request_rate: float = 10.0,
        total_requests: int = 100_000,
        warmup_steps: int = 30,
        fallback_interval: int = 10,
        refit_every: int = 200,
        refit_error: float = 0.25,
        fit_window: int = 100,
        step_time_s: float | None = None,
        stall_s: float = 0.01,
        load_time_s: float = 0.05,
        staleness_per_step: float = 0.0,
        probe_every: int = 0,
        threshold: float | None = None,
        tune_threshold: bool = False,
        follow_losses: bool = True,
        predictor: LossPredictor | None = None,
        history: int = 10_000,
        warmup_on_improvement: bool = True,
        max_interval: int = 0,
        detect_changes: bool = True,
        publish_budget: float = 0.01,
        max_publish_share: float = 0.1,
    ) -> None:
        super().__init__(request_rate=request_rate, total_requests=total_requests, warmup_steps=warmup_steps,
                         fallback_interval=fallback_interval, refit_every=refit_every, refit_error=refit_error,
                         fit_window=fit_window, step_time_s=step_time_s, stall_s=stall_s, load_time_s=load_time_s,
                         staleness_per_step=staleness_per_step, probe_every=probe_every, predictor=predictor,
                         history=history, warmup_on_improvement=warmup_on_improvement, max_interval=max_interval,
                         detect_changes=detect_changes, publish_budget=publish_budget,
                         max_publish_share=max_publish_share)
        if threshold is not None and not threshold >= 0:
            raise ConfigurationError(f"threshold={threshold!r}: use a loss difference >= 0, or None to take "
                                     "it from the warm-up")
        if follow_losses and (threshold is not None or tune_threshold):
            raise ConfigurationError("threshold and tune_threshold apply to the curve's rule: with "
                                     "follow_losses=True (the default) publishes follow the observed losses; "
                                     "set follow_losses=False to use them")
        self.configured_threshold = threshold
        self.tune_threshold = bool(tune_threshold)
        self.follow_losses = bool(follow_losses)
        self._base_threshold: float | None = threshold
        self._threshold: float | None = threshold
        self._planned: list[int] = []
        self._plan_until = 0

    @property
    def threshold(self) -> float | None:
        """The loss drop that triggers a publish (None until the warm-up has ended)."""
        return self._threshold

    def _after_first_fit(self, warmup_losses: list[float]) -> None:
        if self.configured_threshold is None:
            self._base_threshold = self._threshold = greedy_threshold(warmup_losses)

    def _plan(self, context: PlanContext, keep_choice: bool) -> CILPrediction:
        if self.follow_losses:  # the plan is only the forecast: decisions follow the losses
            watch = self._losses.watch
            self._plan_until = context.end_step
            return greedy_prediction(context, significant_drop_plan(context, watch.levels(), watch.z))
        retune = self.tune_threshold and not keep_choice
        self._plan_until = context.now_step + PLAN_WINDOW
        if retune and self._base_threshold > 0:
            choice = best_greedy_threshold(context, self._base_threshold)
            self._threshold, self._planned = choice.threshold, choice.plan
            return choice.prediction
        self._planned = greedy_plan(context, self._threshold)
        return greedy_prediction(context, self._planned)

    def _decide(self, step: int) -> bool:
        if self.follow_losses:
            age = step - self._losses.last_published  # plain floats: this runs every step
            staleness = self._fit.staleness
            return self._losses.watch.significant(staleness.linear * age + staleness.quadratic * age * age)
        # The plan is the rule run forward on the same curve, so following it is the rule itself,
        # at O(1) per step. A planned step that was not offered (skipped steps) is published late.
        if step > self._plan_until:
            self._replan(step, self._meter.elapsed(), keep_choice=True)  # run the rule further ahead
        due = bool(self._planned) and self._planned[0] <= step
        while self._planned and self._planned[0] <= step:
            self._planned.pop(0)
        return due

    def _plan_summary(self) -> str:
        if self.follow_losses:
            noise = self._losses.watch.noise
            return f"following the losses (noise {noise:.4g}), predicted CIL {self.predicted_cil:.4g}"
        return f"threshold {self._threshold:.4g}, predicted CIL {self.predicted_cil:.4g}"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "threshold": self._threshold, "base_threshold": self._base_threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        threshold, base = state.get("threshold"), state.get("base_threshold")
        self._threshold = self.configured_threshold if threshold is None else float(threshold)
        self._base_threshold = self._threshold if base is None else float(base)

    def _repr_extra(self) -> str:
        tune = ", tune_threshold=True" if self.tune_threshold else ""
        follow = ", follow_losses=True" if self.follow_losses else ""
        return tune + follow
