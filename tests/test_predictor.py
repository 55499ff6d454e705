"""The Inference Performance Predictor: curve fitting and Algorithms 1-3 on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from viper_lightning import ConfigurationError
from viper_lightning.predictor import (
    FitError,
    InferenceLoad,
    LearningCurve,
    LearningCurveFitter,
    LossLevels,
    PlanContext,
    PublishCosts,
    StalenessModel,
    best_fixed_interval,
    best_greedy_threshold,
    fit_staleness,
    fixed_plan,
    greedy_gain,
    greedy_plan,
    greedy_threshold,
    predict_cil,
    significant_drop_plan,
)

STEPS = np.arange(1, 301, dtype=np.float64)
TRUE_CURVES = {
    "exp2": lambda x: 0.8 * np.exp(-x / 100),
    "exp3": lambda x: 0.6 * np.exp(-x / 60) + 0.1,
    "lin2": lambda x: 1.0 - 0.002 * x,
    "expd3": lambda x: 0.9 - (0.9 - 0.1) * np.exp(-x / 50),  # rising, like an accuracy
}


def noisy(curve, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    return curve(STEPS) + np.random.default_rng(seed).normal(0.0, noise, len(STEPS))


def line(slope: float = -1.0, start: float = 10.0):
    """A version-loss function: the version after step s has loss start + slope·s."""
    return lambda steps: start + slope * np.asarray(steps, dtype=np.float64)


# -- learning curves ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(TRUE_CURVES))
def test_each_family_recovers_its_own_curve(family) -> None:
    curve = LearningCurveFitter(families=[family]).fit(STEPS, noisy(TRUE_CURVES[family]))
    assert curve.family == family
    assert np.max(np.abs(curve(STEPS) - TRUE_CURVES[family](STEPS))) < 0.015
    assert abs(curve(400.0) - TRUE_CURVES[family](400.0)) < 0.05  # and extrapolates sensibly


@pytest.mark.parametrize("family", ["exp2", "exp3", "lin2"])
def test_the_lowest_mse_family_is_kept(family) -> None:
    losses = noisy(TRUE_CURVES[family])
    chosen = LearningCurveFitter().fit(STEPS, losses)
    singles = [LearningCurveFitter(families=[name]).fit(STEPS, losses).mse for name in TRUE_CURVES]
    assert chosen.mse == pytest.approx(min(singles))
    assert np.max(np.abs(chosen(STEPS) - TRUE_CURVES[family](STEPS))) < 0.015


def test_exp3_parameters_are_recovered_in_step_units() -> None:
    curve = LearningCurveFitter(families=["exp3"]).fit(STEPS, noisy(TRUE_CURVES["exp3"], noise=0.002))
    a, b, c = curve.params
    assert c == pytest.approx(0.1, abs=0.01)
    assert b / curve.scale == pytest.approx(1 / 60, rel=0.05)  # the rate is fitted on steps scaled to [0, 1]
    assert a * math.exp(b * curve.origin / curve.scale) == pytest.approx(0.6, rel=0.05)


def test_nan_and_inf_losses_are_ignored() -> None:
    losses = noisy(TRUE_CURVES["exp3"])
    clean = LearningCurveFitter().fit(STEPS, losses)
    losses[::7], losses[3::11] = np.nan, np.inf
    dirty = LearningCurveFitter().fit(STEPS, losses)
    assert dirty.points == len(STEPS) - np.count_nonzero(~np.isfinite(losses))
    assert np.max(np.abs(dirty(STEPS) - clean(STEPS))) < 0.01


def test_too_few_finite_points_raise_fit_error_with_the_reason() -> None:
    with pytest.raises(FitError, match="only 3 finite losses, need at least 8"):
        LearningCurveFitter().fit([1, 2, 3, 4, 5], [0.5, np.nan, 0.4, np.inf, 0.3])


def test_a_very_noisy_loss_still_gives_a_bounded_non_negative_curve() -> None:
    losses = np.abs(noisy(TRUE_CURVES["exp3"], noise=0.3, seed=3))
    curve = LearningCurveFitter().fit(STEPS, losses)
    far = curve(np.array([0.0, 1e4, 1e7]))
    assert np.all(np.isfinite(far)) and np.all(far >= 0) and np.all(far <= 2 * losses.max())


def test_a_constant_loss_is_fitted_as_flat() -> None:
    curve = LearningCurveFitter().fit(STEPS, np.full(len(STEPS), 0.25))
    assert np.allclose(curve(np.array([1.0, 500.0])), 0.25, atol=1e-6)


def test_fitter_rejects_bad_settings() -> None:
    with pytest.raises(ConfigurationError, match="families"):
        LearningCurveFitter(families=["exp4"])
    with pytest.raises(ConfigurationError, match="min_points"):
        LearningCurveFitter(min_points=2)


def test_learning_curve_clips_to_its_floor_and_ceiling() -> None:
    falling = LearningCurve("lin2", (-1.0, 1.0), origin=0.0, scale=1.0, mse=0.0, points=10, floor=0.0, ceiling=2.0)
    assert falling(np.array([0.0, 0.5, 5.0, -5.0])).tolist() == [1.0, 0.5, 0.0, 2.0]


# -- Algorithm 1: CIL -----------------------------------------------------------------------------------
def test_cil_by_hand_without_costs() -> None:
    # Requests at t = 0, 1, 2, 3; a step takes 1 s; versions after steps 1 and 2 serve at once.
    prediction = predict_cil(line(), [1, 2], InferenceLoad(1.0, 4), PublishCosts(1.0, 0.0, 0.0))
    assert prediction.cil == pytest.approx(10 + 9 + 8 + 8)
    assert prediction.requests == 4 and prediction.publishes == 2


def test_cil_by_hand_with_stall_and_load_time() -> None:
    # Step 1 ends at 1.0, serves from 1.25, training resumes at 1.5; step 2 ends at 2.5 and
    # serves from 2.75. So t=1 is still answered by the initial weights.
    prediction = predict_cil(line(), [1, 2], InferenceLoad(1.0, 4), PublishCosts(1.0, 0.5, 0.25))
    assert prediction.cil == pytest.approx(10 + 10 + 9 + 8)


def test_cil_of_zero_requests_is_zero() -> None:
    prediction = predict_cil(line(), [1, 2, 3], InferenceLoad(1.0, 0), PublishCosts(1.0, 0.1, 0.1))
    assert prediction.cil == 0.0 and prediction.requests == 0 and prediction.mean_loss == 0.0


def test_a_stall_longer_than_the_interval_pushes_later_versions_past_the_horizon() -> None:
    # Publishing after every step with a 3 s stall: step 2 only ends at 5.0, after the last request.
    prediction = predict_cil(line(), [1, 2, 3], InferenceLoad(1.0, 4), PublishCosts(1.0, 3.0, 0.0))
    assert prediction.cil == pytest.approx(10 + 9 + 9 + 9)
    assert prediction.publishes == 1


def test_staleness_adds_to_the_served_versions_loss() -> None:
    # The request at t=3 sees data at position 3 and is answered by version 2: one step stale.
    prediction = predict_cil(line(), [1, 2], InferenceLoad(1.0, 4), PublishCosts(1.0, 0.0, 0.0),
                             StalenessModel(offset=0.25, linear=0.5))
    assert prediction.cil == pytest.approx(10 + 9 + 8 + 8 + 4 * 0.25 + 0.5)


def test_predicted_loss_is_capped_at_max_loss() -> None:
    prediction = predict_cil(line(), [], InferenceLoad(1.0, 4), PublishCosts(1.0, 0.0, 0.0),
                             StalenessModel(linear=5.0), max_loss=12.0)
    assert prediction.cil == pytest.approx(10 + 12 + 12 + 12)


def test_cil_from_now_uses_the_versions_already_live() -> None:
    prediction = predict_cil(line(), [3], InferenceLoad(1.0, 5), PublishCosts(1.0, 0.0, 0.0), now_step=2,
                             now_s=2.0, live=((0, 0.0), (2, 1.5)))
    assert prediction.requests == 3  # t = 2, 3, 4
    assert prediction.cil == pytest.approx(8 + 7 + 7)
    assert prediction.between(3.0, 5.0) == pytest.approx(7 + 7)


def test_many_requests_are_subsampled_without_changing_the_answer() -> None:
    load, costs = InferenceLoad(1000.0, 200_000), PublishCosts(0.1, 0.01, 0.05)
    curve = lambda steps: 1.0 / (1.0 + 0.01 * np.asarray(steps))  # noqa: E731
    plan = list(range(10, 2000, 10))
    exact = predict_cil(curve, plan, load, costs, max_points=300_000)
    sampled = predict_cil(curve, plan, load, costs)
    assert sampled.requests == exact.requests == 200_000
    assert sampled.cil == pytest.approx(exact.cil, rel=1e-3)


def test_cil_inputs_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="request_rate"):
        InferenceLoad(0.0, 10)
    with pytest.raises(ConfigurationError, match="total_requests"):
        InferenceLoad(1.0, -1)
    with pytest.raises(ConfigurationError, match="step_time_s"):
        PublishCosts(0.0, 0.0, 0.0)
    with pytest.raises(ConfigurationError, match="stall_s"):
        PublishCosts(1.0, float("nan"), 0.0)


# -- Algorithm 2: fixed interval ------------------------------------------------------------------------
def context(load: InferenceLoad, costs: PublishCosts, version_loss=line(), staleness=StalenessModel(),
            now_step: int = 0, last_published: int = 0, max_interval: int | None = None) -> PlanContext:
    return PlanContext(version_loss, load, costs, staleness, now_step, now_step * costs.step_time_s,
                       last_published, max_interval=max_interval)


def test_fixed_interval_by_hand() -> None:
    # Three requests at t = 0, 1, 2. Interval 1 serves 10, 9, 8 (27); interval 2: 10, 10, 8 (28).
    choice = best_fixed_interval(context(InferenceLoad(1.0, 3), PublishCosts(1.0, 0.0, 0.0)))
    assert choice.interval == 1 and choice.prediction.cil == pytest.approx(27)


def test_fixed_interval_prefers_fewer_publishes_on_a_tie() -> None:
    # A 1 s stall: interval 1 gives 10, 9, 9 (step 2 ends at 3.0, too late); interval 2 gives
    # 10, 10, 8. Both 28: the longer interval wins.
    choice = best_fixed_interval(context(InferenceLoad(1.0, 3), PublishCosts(1.0, 1.0, 0.0)))
    assert choice.interval == 2 and choice.prediction.cil == pytest.approx(28)


def test_fixed_interval_matches_brute_force() -> None:
    load, costs = InferenceLoad(2.0, 200), PublishCosts(1.0, 0.7, 1.5)
    ctx = context(load, costs, version_loss=lambda s: 1.0 + 5.0 * np.exp(-np.asarray(s) / 20.0),
                  staleness=StalenessModel(linear=0.01))
    totals = {n: ctx.predict(fixed_plan(0, n, 0, ctx.end_step)).cil for n in range(1, ctx.end_step + 1)}
    best = min(totals.values())
    choice = best_fixed_interval(ctx)
    assert choice.prediction.cil == pytest.approx(best, rel=0.01)  # the ladder search lands on the optimum


def test_a_stall_longer_than_any_interval_leaves_a_single_publish() -> None:
    # Each publish stalls training for 100 s, longer than the whole 10 s of requests: only the
    # first publish can serve anyone, so the best plan publishes once, as late as still pays.
    ctx = context(InferenceLoad(1.0, 10), PublishCosts(1.0, 100.0, 0.0), version_loss=line(slope=-0.01))
    choice = best_fixed_interval(ctx)
    assert choice.prediction.publishes == 1
    assert choice.prediction.cil == pytest.approx(min(
        ctx.predict(fixed_plan(0, n, 0, ctx.end_step)).cil for n in range(1, 11)))


def test_zero_requests_choose_no_publishes() -> None:
    choice = best_fixed_interval(context(InferenceLoad(1.0, 0), PublishCosts(1.0, 0.0, 0.0)))
    assert choice.interval is None and choice.prediction.cil == 0.0


def test_fixed_plan_publishes_a_due_version_now() -> None:
    assert list(fixed_plan(last_published=5, interval=4, now_step=12, end_step=20)) == [12, 16, 20]
    assert list(fixed_plan(last_published=10, interval=4, now_step=12, end_step=20)) == [14, 18]


@pytest.mark.parametrize("stall, load_time", [(0.0, 0.0), (0.3, 1.7), (2.5, 0.4)])
def test_a_repeating_plan_in_closed_form_equals_the_explicit_one(stall, load_time) -> None:
    load, costs = InferenceLoad(3.0, 500), PublishCosts(1.0, stall, load_time)
    curve = lambda steps: 1.0 / (1.0 + 0.05 * np.asarray(steps, dtype=np.float64))  # noqa: E731
    explicit = predict_cil(curve, range(7, 400, 4), load, costs, StalenessModel(linear=0.01), now_step=3,
                           now_s=3.0, max_step=150)
    closed = predict_cil(curve, [7], load, costs, StalenessModel(linear=0.01), now_step=3, now_s=3.0,
                         max_step=150, repeat_every=4)
    assert closed.cil == pytest.approx(explicit.cil) and closed.publishes == explicit.publishes


def test_planning_cost_does_not_grow_with_the_horizon() -> None:
    # A million requests over ~10^6 steps: both algorithms must still plan (the callback waits).
    ctx = context(InferenceLoad(100.0, 1_000_000), PublishCosts(0.01, 0.001, 0.05),
                  version_loss=lambda s: 0.1 + np.exp(-np.asarray(s) / 1e4), staleness=StalenessModel(linear=1e-5))
    assert best_fixed_interval(ctx).interval is not None
    assert len(greedy_plan(ctx, 0.001)) > 0


# -- Algorithm 3: greedy --------------------------------------------------------------------------------
def test_greedy_threshold_by_hand() -> None:
    # Drops 0.1, 0.05, 0, 0.05: mean 0.05, standard deviation sqrt(0.00125).
    assert greedy_threshold([1.0, 0.9, 0.85, 0.85, 0.8]) == pytest.approx(0.05 + math.sqrt(0.00125))
    assert greedy_threshold([0.5, np.nan, 0.6, 0.7, np.inf]) == 0.0  # a rising warm-up: any gain counts


def test_greedy_threshold_needs_three_finite_losses() -> None:
    with pytest.raises(FitError, match="only 2 finite"):
        greedy_threshold([0.5, np.nan, 0.4])


def test_greedy_plan_by_hand() -> None:
    # Loss 10 − s until step 5, flat after. Threshold 2.5 from last = 0: publish at 3 (gain 3),
    # then at 6 the gain is only 2 and nothing more happens.
    flat_after_5 = lambda s: 10.0 - np.minimum(np.asarray(s, dtype=np.float64), 5.0)  # noqa: E731
    ctx = context(InferenceLoad(1.0, 10), PublishCosts(1.0, 0.0, 0.0), version_loss=flat_after_5, now_step=1)
    assert greedy_plan(ctx, 2.5) == [3]
    # Staleness of 1 per step of age makes the flat part worth a publish every 3 steps.
    stale = context(InferenceLoad(1.0, 10), PublishCosts(1.0, 0.0, 0.0), version_loss=flat_after_5,
                    staleness=StalenessModel(linear=1.0), now_step=1)
    assert greedy_plan(stale, 2.5) == [2, 4, 6, 9]
    assert greedy_gain(flat_after_5, StalenessModel(linear=1.0), 4, 2) == pytest.approx(2 + 2)


def test_greedy_threshold_search_picks_the_lowest_predicted_cil() -> None:
    ctx = context(InferenceLoad(2.0, 100), PublishCosts(1.0, 0.2, 0.5),
                  version_loss=lambda s: 1.0 + 5.0 * np.exp(-np.asarray(s) / 10.0), staleness=StalenessModel(linear=0.02))
    choice = best_greedy_threshold(ctx, base=0.1)
    for scale in (1 / 32, 1 / 4, 1.0, 4.0):
        assert choice.prediction.cil <= ctx.predict(greedy_plan(ctx, 0.1 * scale)).cil + 1e-9
    assert choice.plan == greedy_plan(ctx, choice.threshold)


# -- staleness -----------------------------------------------------------------------------------------
def test_staleness_fit_recovers_offset_and_slope() -> None:
    rng = np.random.default_rng(1)
    ages = rng.integers(0, 80, 200).astype(float)
    fitted = fit_staleness(ages, -0.02 + 0.003 * ages + rng.normal(0, 0.01, 200))
    assert fitted.offset == pytest.approx(-0.02, abs=0.005)
    assert fitted.linear == pytest.approx(0.003, rel=0.1)
    assert fitted.quadratic == 0.0


def test_staleness_fit_bounds_slopes_and_respects_its_prior() -> None:
    ages = np.arange(10.0)
    assert fit_staleness(ages, 0.5 - 0.01 * ages).linear == 0.0  # a version does not improve by ageing
    prior = StalenessModel(linear=0.004)
    assert fit_staleness([1.0, 2.0], [0.1, 0.2], prior) == prior  # too few observations
    only_offset = fit_staleness(np.full(6, 3.0), np.full(6, 0.5), prior)
    assert only_offset.linear == 0.004 and only_offset.offset == pytest.approx(0.5 - 0.012)
    curved = fit_staleness(ages, 0.001 * ages**2, quadratic=True)
    assert curved.quadratic == pytest.approx(0.001) and curved.linear == pytest.approx(0.0, abs=1e-9)


def test_staleness_model_rejects_negative_slopes() -> None:
    with pytest.raises(ConfigurationError, match="linear"):
        StalenessModel(linear=-0.1)


# -- the safety net and the loss-following rule ---------------------------------------------------------
def test_max_interval_caps_both_plans_even_on_a_flat_curve() -> None:
    flat = lambda s: np.full(np.shape(s), 0.5)  # noqa: E731  (publishing never pays, by the curve)
    load, costs = InferenceLoad(1.0, 20), PublishCosts(1.0, 0.1, 0.0)
    assert best_fixed_interval(context(load, costs, version_loss=flat)).interval is None
    capped = context(load, costs, version_loss=flat, max_interval=3)
    choice = best_fixed_interval(capped)
    assert choice.interval is not None and choice.interval <= 3
    assert greedy_plan(capped, threshold=1.0) == [3, 6, 9, 12, 15, 18]


def test_significant_drop_plan_by_hand() -> None:
    # The loss logged at step s is 10 − s; one loss has noise 1, z = 2. From step 0 (reference
    # 10): step 1 drops 1 (< 2/√1), step 2 drops 1.5 on average (> 2/√2): publish, reference
    # 8.5. Then every second step alike.
    ctx = context(InferenceLoad(1.0, 10), PublishCosts(1.0, 0.0, 0.0), version_loss=line(start=9.0))
    assert significant_drop_plan(ctx, LossLevels(10.0, 0.0, 0, 1.0), z=2.0) == [2, 4, 6, 8, 10]
    # A flat loss never drops; staleness of 1 per step of age makes it worth a publish every 2
    # steps, and with unknown noise only the cap publishes.
    flat = lambda s: np.full(np.shape(s), 5.0)  # noqa: E731
    stale = context(InferenceLoad(1.0, 10), PublishCosts(1.0, 0.0, 0.0), version_loss=flat,
                    staleness=StalenessModel(linear=1.0))
    assert significant_drop_plan(stale, LossLevels(5.0, 0.0, 0, 1.0), z=2.0) == [2, 4, 6, 8, 10]
    capped = context(InferenceLoad(1.0, 10), PublishCosts(1.0, 0.0, 0.0), version_loss=flat, max_interval=3)
    assert significant_drop_plan(capped, LossLevels(5.0, 0.0, 0, math.inf), z=2.0) == [3, 6, 9]


def test_polishing_fewer_families_stays_close_and_is_validated() -> None:
    losses = noisy(TRUE_CURVES["exp3"])
    every = LearningCurveFitter(polish=4).fit(STEPS, losses)
    leader = LearningCurveFitter(polish=1).fit(STEPS, losses)
    grid_only = LearningCurveFitter(polish=0).fit(STEPS, losses)
    assert every.mse <= leader.mse <= grid_only.mse  # each polish only ever improves a family's fit
    assert np.max(np.abs(grid_only(STEPS) - TRUE_CURVES["exp3"](STEPS))) < 0.1  # the coarse grid alone is near
    assert LearningCurveFitter().fit(STEPS, losses).mse == every.mse  # the default polishes every family
    with pytest.raises(ConfigurationError, match="polish=-1"):
        LearningCurveFitter(polish=-1)


# -- the writer's commit time ---------------------------------------------------------------------------
def test_publishing_faster_than_the_writer_stalls_for_the_difference() -> None:
    costs = PublishCosts(1.0, 0.5, 0.0, commit_s=3.0)
    assert costs.stalls(np.array([1, 2, 3, 5])).tolist() == [2.0, 1.0, 0.5, 0.5]
    # By hand, in a steady stream: step 2's version serves from t = 2; then publishing after
    # steps 3 and 4 makes each wait 2 s for the writer (step 3 ends at t = 3, goes live at 5;
    # step 4 ends at 4 + 2, goes live at 8). Requests at t = 2..7 are answered by 8, 8, 8, 7, 7, 7.
    load, live = InferenceLoad(1.0, 8), ((0, 0.0), (2, 2.0))
    busy = predict_cil(line(), [3, 4], load, PublishCosts(1.0, 0.0, 0.0, commit_s=3.0), now_step=2, now_s=2.0,
                       live=live)
    assert busy.cil == pytest.approx(3 * 8 + 3 * 7)
    unhurried = predict_cil(line(), [3, 4], load, PublishCosts(1.0, 0.0, 0.0), now_step=2, now_s=2.0, live=live)
    assert unhurried.cil == pytest.approx(8 + 7 + 4 * 6)


def test_the_writer_time_makes_the_fixed_interval_longer() -> None:
    load = InferenceLoad(1.0, 200)
    assert best_fixed_interval(context(load, PublishCosts(1.0, 0.01, 0.0))).interval == 1
    assert best_fixed_interval(context(load, PublishCosts(1.0, 0.01, 0.0, commit_s=4.0))).interval >= 3


@pytest.mark.parametrize("every", [1, 2, 6])
def test_a_repeating_plan_counts_the_writer_as_the_explicit_one_does(every) -> None:
    load, costs = InferenceLoad(2.0, 400), PublishCosts(1.0, 0.2, 0.5, commit_s=3.5)
    curve = lambda steps: 1.0 / (1.0 + 0.05 * np.asarray(steps, dtype=np.float64))  # noqa: E731
    explicit = predict_cil(curve, range(every, 400, every), load, costs)
    closed = predict_cil(curve, [every], load, costs, repeat_every=every)
    assert closed.cil == pytest.approx(explicit.cil, rel=1e-3) and closed.publishes == explicit.publishes
