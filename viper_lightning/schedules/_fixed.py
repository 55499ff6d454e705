"""Fixed: the Viper paper's Algorithm 2, the best fixed publish interval after a warm-up."""

from __future__ import annotations

from typing import Any

from ..predictor._cil import CILPrediction
from ..predictor._curves import LossPredictor
from ..predictor._plans import PlanContext, best_fixed_interval, fixed_prediction
from ._predictive import _PredictiveSchedule

__all__ = ["Fixed"]


class Fixed(_PredictiveSchedule):
    """Publish every `interval` steps, the interval that minimises the predicted cumulative
    inference loss (CIL) of the consumer.

    During the warm-up it publishes every `fallback_interval` steps while recording the loss
    (and the measured stall of each publish). Then it fits the learning curve and tries every
    interval with the CIL model: frequent publishes keep answers fresh but stall training;
    rare ones leave the consumer on old weights. With `refit_every`/`refit_error` it refits and
    re-chooses as losses arrive (the paper chooses once).

    The costs are measured while training: the stall of each publish arrives through
    `published` (ViperCallback reports it), the time per step from the clock. The publisher's
    background writer time per version (`observe_commit_time`, from its `last_commit`) tells
    the plans when publishing faster than the writer makes training wait for a snapshot buffer
    (until it is reported, no such wait is assumed). Two inputs come from outside the training
    loop and fall back to the configured estimates until they do:
    the consumer's publish-to-serving latency (`observe_load_time`, e.g. from the subscriber's
    `stats.updates[-1].latency_s`) and the loss of published versions on fresh labelled data
    (`observe_served_loss`, for the versions `probe_versions` asks about), which teaches the
    schedule how fast a served version goes stale when the data drifts.

    Args:
        request_rate: the consumer's requests per second.
        total_requests: requests it will answer (with `request_rate`, the planning horizon).
        warmup_steps: steps of loss observed before the first fit.
        fallback_interval: the default schedule, `EveryNSteps(fallback_interval)`, used during
            the warm-up, when no curve can be fitted (too few or non-finite losses: the reason
            is logged) and after the last expected request.
        refit_every: refit the curve every this many steps (0: fit once, as the paper does).
        refit_error: also refit when the recent mean loss is off the curve by more than this
            fraction (0: never).
        fit_window: refits use only the last this many losses (0: all kept in `history`).
        step_time_s: seconds per training step; None measures it.
        stall_s: estimated training stall per publish until one is measured.
        load_time_s: estimated publish-to-serving latency until `observe_load_time` reports one.
        staleness_per_step: estimated loss increase per step of a served version's age, for
            drifting data, until `observe_served_loss` measurements replace it (0: no drift).
        probe_every: how often `probe_versions` asks for served-loss measurements (0: never).
        predictor: the learning-curve predictor (default: `LearningCurveFitter(polish=1)`, cheap
            enough to refit on the training thread).
        history: losses kept for refitting.
        warmup_on_improvement: during the warm-up, also publish whenever the mean training loss
            since the last publish is below the one before it by more than two standard errors
            of the step-to-step noise (Algorithm 3's rule on the observed losses, before there
            is a curve): a loss that falls fast early is served early. False: only the fallback.
        max_interval: a safety net: never more than this many steps between publishes once the
            curve is fitted, whatever it predicts (0: none); plans are made within that cap.
        detect_changes: watch the losses against the fitted curve and, once they have left it
            for good (a concept shift, the end of a plateau), fit again on the losses since the
            change, even when the schedule otherwise fits once; meanwhile publish on the
            fallback or as soon as the losses drop significantly. False: the paper's fit-once.
        publish_budget: without `max_interval`, the gap between publishes is capped where one
            publish per gap costs this share of the training time (the measured cost of a
            publish over the measured step time), and by the span of the losses the curve was
            fitted on. A dimensionless budget rather than a step count: it publishes every few
            steps when steps are long next to a publish and rarely when they are short, which
            bounds how stale the served version gets when nothing else says so (0: no budget cap).
        max_publish_share: never publish more often than one publish per gap costing this share
            of the training time (measured, as for `publish_budget`), whatever the rule says:
            on steps much shorter than a publish, a loss that keeps dropping would otherwise
            publish every step and lose more training than the fresher answers win. It wins
            over `max_interval` and over a plan's interval, which it can only lengthen (0: no cap).
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
        self._interval: int | None = None

    @property
    def interval(self) -> int | None:
        """The chosen interval; None before the first fit, or when no further publish pays."""
        return self._interval if self._fit.fits else None

    def _plan(self, context: PlanContext, keep_choice: bool) -> CILPrediction:
        if keep_choice:
            return context.predict([]) if self._interval is None else fixed_prediction(context, self._interval)
        choice = best_fixed_interval(context)
        self._interval = choice.interval
        return choice.prediction

    def _decide(self, step: int) -> bool:
        return self._interval is not None and step >= self._losses.last_published + self._interval

    def _plan_summary(self) -> str:
        every = "never again" if self._interval is None else f"every {self._interval} steps"
        return f"publishing {every}, predicted CIL {self.predicted_cil:.4g}"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "interval": self._interval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        interval = state.get("interval")
        self._interval = None if interval is None else int(interval)
