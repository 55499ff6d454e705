"""Fixed and Greedy: the predictor schedules, driven on a fake clock and inside a real Trainer."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable

import lightning as L
import numpy as np
import pytest
import yaml
from jsonargparse import ArgumentParser

from viper_lightning import ConfigurationError, ViperCallback
from viper_lightning.predictor import (
    FitError,
    InferenceLoad,
    LearningCurveFitter,
    LossCurve,
    LossPredictor,
    PublishCosts,
    predict_cil,
)
from viper_lightning.schedules import Fixed, Greedy, PublishSchedule
from viper_lightning.schedules._improvement import ImprovementWatch

from .conftest import LOOPBACK_ANY_PORT
from .lightning_models import Regressor

STEP_S = 1.0
LOG = "viper_lightning.predictor"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def decaying(steps: int, noise: float = 0.0, seed: int = 0, rate: float = 40.0) -> np.ndarray:
    x = np.arange(1, steps + 1)
    return 0.9 * np.exp(-x / rate) + 0.1 + np.random.default_rng(seed).normal(0, noise, steps)


def drive(schedule: PublishSchedule, losses, first: int = 1, clock: FakeClock | None = None, stall: float = 0.01,
          served: Callable[[int, int], float] | None = None) -> list[int]:
    """Run `schedule` as ViperCallback does, one step per second; return the steps it published at."""
    clock = clock or FakeClock()
    schedule.set_clock(clock)
    published = []
    for step, loss in enumerate(losses, first):
        clock.now += STEP_S
        if schedule.should_publish(step, float(loss)):
            clock.now += stall
            schedule.published(step, float(loss), stall)
            published.append(step)
        for version in schedule.probe_versions(step) if served else ():
            schedule.observe_served_loss(version, served(version, step))
    return published


# The paper's fit-once behaviour, which most tests here pin down (the defaults refit, follow the
# losses and cap the gap by a publish budget: tested where named).
PAPER = dict(refit_every=0, refit_error=0.0, fit_window=0, warmup_on_improvement=False, publish_budget=0.0)


def greedy(**overrides) -> Greedy:
    """A Greedy with the paper's rule unless `follow_losses` is given."""
    return Greedy(**{"follow_losses": False, **common(**overrides)})


def common(**overrides) -> dict:
    settings = dict(request_rate=1.0, total_requests=1000, warmup_steps=30, fallback_interval=10, step_time_s=STEP_S,
                    load_time_s=0.5, **PAPER)
    settings.update(overrides)
    return settings


# -- Fixed (Algorithm 2) -----------------------------------------------------------------------------------
def test_fixed_warms_up_then_publishes_at_the_interval_it_chose() -> None:
    schedule = Fixed(**common())
    published = drive(schedule, decaying(300, noise=0.005))
    assert published[:3] == [10, 20, 30]  # the warm-up's default schedule
    gaps = set(np.diff(published[3:]).tolist())
    assert schedule.interval is not None and gaps == {schedule.interval}
    assert schedule.predicted_cil is not None and schedule.predicted_cil > 0


def test_fixed_predicted_cil_matches_algorithm_1_on_what_actually_happened() -> None:
    # A noise-free curve and no drift: the schedule's own forecast should equal the CIL of the
    # publishes it then made, scored with the true curve.
    losses = decaying(300)
    schedule = Fixed(**common(total_requests=300))
    published = drive(schedule, losses, stall=0.2)
    true_version_loss = lambda steps: np.interp(np.asarray(steps) + 1, np.arange(1, 301), losses)  # noqa: E731
    actual = predict_cil(true_version_loss, published, InferenceLoad(1.0, 300), PublishCosts(STEP_S, 0.2, 0.5))
    assert schedule.predicted_cil == pytest.approx(actual.cil, rel=0.02)


def test_a_stall_longer_than_the_interval_makes_fixed_publish_less() -> None:
    cheap, dear = Fixed(**common()), Fixed(**common())
    drive(cheap, decaying(60), stall=0.01)
    drive(dear, decaying(60), stall=5 * STEP_S)  # each publish stalls training for 5 steps
    assert cheap.interval is not None
    assert dear.interval is None or dear.interval > cheap.interval


def test_a_reported_writer_time_makes_fixed_publish_less_often() -> None:
    plain, told = Fixed(**common()), Fixed(**common())
    told.observe_commit_time(4.0 * STEP_S)  # the publisher's writer needs 4 steps per version
    drive(plain, decaying(60))
    drive(told, decaying(60))
    assert plain.interval is not None and told.interval is not None and told.interval > plain.interval
    restored = Fixed(**common())
    restored.load_state_dict(json.loads(json.dumps(told.state_dict())))
    assert told.costs().commit_s == restored.costs().commit_s == 4.0 * STEP_S


# -- Greedy (Algorithm 3) ----------------------------------------------------------------------------------
def test_greedy_publishes_often_while_the_loss_falls_and_rarely_once_it_is_flat() -> None:
    schedule = greedy(warmup_steps=20, fallback_interval=5)
    published = drive(schedule, decaying(400, noise=0.002))
    after = [s for s in published if s > 20]
    assert 1 <= len(after) < 380
    early, late = [s for s in after if s <= 100], [s for s in after if s > 200]
    assert len(early) > len(late)
    assert schedule.threshold == pytest.approx(0.0, abs=0.05) or schedule.threshold > 0


def test_refitting_follows_a_new_learning_curve_that_fitting_once_misses() -> None:
    # The loss settles at 0.5, then (new data, a learning-rate change) falls again from step 150.
    x = np.arange(1, 301, dtype=np.float64)
    losses = 0.5 + 0.4 * np.exp(-x / 20) - np.where(x > 150, 0.4 * (1 - np.exp(-(x - 150) / 40)), 0.0)
    paper = greedy(warmup_steps=40, detect_changes=False, max_interval=10**6)  # no cap on the gap
    once = greedy(warmup_steps=40)  # fits once, and again when the losses change (the default)
    refit = greedy(warmup_steps=40, refit_every=20, refit_error=0.2, fit_window=40)
    after_change = lambda published: [s for s in published if 160 <= s <= 300]  # noqa: E731
    assert after_change(drive(paper, losses)) == []  # its curve said the loss had settled for good
    assert len(after_change(drive(once, losses))) >= 3
    assert len(after_change(drive(refit, losses))) >= 3


@pytest.mark.parametrize("make", [lambda **settings: Fixed(**common(**settings)), greedy], ids=["Fixed", "Greedy"])
def test_a_concept_shift_is_detected_and_the_curve_fitted_again_on_the_new_regime(make, caplog) -> None:
    """Issue 12, item 2: fitted once, the paper's schedules served one version through every
    shift (their curve said the loss had settled). The losses now jump at steps 120 and 240."""
    x = np.arange(1, 361, dtype=np.float64)
    regime_start = np.where(x > 240, 240, np.where(x > 120, 120, 0))
    losses = 0.2 + 0.6 * np.exp(-(x - regime_start) / 15) + np.random.default_rng(1).normal(0, 0.01, len(x))
    paper, default = make(detect_changes=False, max_interval=10**6), make()
    with caplog.at_level(logging.INFO, LOG):
        published = drive(default, losses)
    for shift in (120, 240):
        assert f"left the fitted curve after step {shift}" in caplog.text
        assert any(shift < step <= shift + 30 for step in published), (shift, published)
    if make is greedy:  # fitted once, the paper's Greedy never publishes again
        assert len([s for s in drive(paper, losses) if s > 60]) <= 1
    assert default.curve is not None and default.curve(np.array([300.0]))[0] < 0.5


def test_a_schedule_restored_in_a_new_warm_up_fits_again() -> None:
    """A checkpoint taken between a detected change and the fit that follows it."""
    x = np.arange(1, 301, dtype=np.float64)
    losses = 0.2 + 0.6 * np.exp(-(x - np.where(x > 120, 120, 0)) / 15)
    clock = FakeClock()
    first = greedy()
    drive(first, losses[:125], clock=clock)
    assert first.curve is None  # the change at step 120 was seen: a new warm-up
    resumed = greedy()
    resumed.load_state_dict(first.state_dict())
    drive(resumed, losses[125:], first=126, clock=clock)
    assert resumed.curve is not None and resumed.curve(np.array([280.0]))[0] < 0.3


def test_staleness_is_learnt_from_served_losses() -> None:
    # Training loss stays flat; a served version's loss grows by 0.01 per step of age.
    flat = np.full(200, 0.3)
    served = lambda version, step: 0.3 + 0.01 * (step - 1 - version)  # noqa: E731
    schedule = greedy(warmup_steps=20, refit_every=20, fit_window=40, probe_every=5, threshold=0.1)
    published = drive(schedule, flat, served=served)
    assert schedule.staleness.linear == pytest.approx(0.01, rel=0.05)
    # Publishes about when 0.01·age first exceeds 0.1 (the slope is learnt, so give or take a step).
    assert set(np.diff([s for s in published if s > 100]).tolist()) <= {10, 11, 12}


def test_a_custom_predictor_is_used() -> None:
    class Halving(LossCurve):
        def __call__(self, steps):
            return 1.0 / (1.0 + np.asarray(steps, dtype=np.float64))

    class Oracle(LossPredictor):
        def fit(self, steps, losses):
            return Halving()

    # its curve does not describe these losses: change detection would rightly drop it
    schedule = greedy(predictor=Oracle(), threshold=0.001, detect_changes=False)
    drive(schedule, decaying(100))
    assert isinstance(schedule.curve, Halving)


# -- beyond the paper: the loss-driven warm-up, the safety net, following the losses ------------------------
def test_the_improvement_watch_by_hand() -> None:
    watch = ImprovementWatch(z=2.0)
    for loss in (1.0, 0.9, 0.8):
        watch.observe(loss)
    assert watch.noise == math.inf and not watch.significant()  # two differences: noise not known yet
    watch.observe(0.7)
    assert watch.noise == 0.0 and watch.significant()  # a steady fall has no noise: any drop counts
    watch.published()
    assert watch.reference == pytest.approx(0.8) and watch.since_count == 0  # mean of 0.9, 0.8, 0.7
    flat = ImprovementWatch(z=2.0)
    for loss in (0.5, 0.6, 0.4, 0.6, 0.4, 0.6, 0.45):
        flat.observe(loss)
    assert flat.noise > 0.05 and not flat.significant()  # 0.05 below, well inside the noise
    assert flat.significant(staleness=0.2)  # unless the serving weights have gone stale
    restored = ImprovementWatch.from_state(json.loads(json.dumps(flat.state_dict())), z=2.0)
    assert restored == flat


def test_a_warmup_on_improvement_publishes_a_fast_fall_early_and_a_flat_loss_on_the_fallback() -> None:
    fast = drive(greedy(warmup_on_improvement=True), decaying(30, noise=0.001, rate=5.0))
    assert len(fast) > 3 and fast[0] < 10
    flat = np.full(30, 0.3) + np.random.default_rng(0).normal(0, 0.01, 30)
    published = drive(greedy(warmup_on_improvement=True), flat)
    assert {10, 20, 30} <= set(published) and len(published) <= 4  # two standard errors: a rare false alarm
    assert drive(greedy(), decaying(30, noise=0.001, rate=5.0)) == [10, 20, 30]  # off by default


@pytest.mark.parametrize("make", [lambda: greedy(threshold=10.0, max_interval=7),
                                  lambda: Fixed(**common(max_interval=7))], ids=["greedy", "fixed"])
def test_max_interval_bounds_the_gap_whatever_the_curve_says(make) -> None:
    schedule = make()
    published = drive(schedule, np.full(200, 0.3))  # flat: by the curve, publishing never pays
    assert max(np.diff([s for s in published if s > 30]).tolist()) <= 7
    assert len([s for s in published if s > 30]) >= 170 // 7


def test_following_the_losses_catches_a_drop_the_fitted_curve_never_predicted() -> None:
    # As in the refitting test: settled at 0.5, then a new fall from step 150. Fitted once.
    x = np.arange(1, 301, dtype=np.float64)
    losses = 0.5 + 0.4 * np.exp(-x / 20) - np.where(x > 150, 0.4 * (1 - np.exp(-(x - 150) / 40)), 0.0)
    losses += np.random.default_rng(0).normal(0, 0.002, len(x))
    schedule = greedy(warmup_steps=40, follow_losses=True, max_interval=100)
    published = drive(schedule, losses)
    assert len([s for s in published if 150 < s <= 220]) >= 20  # the new fall is served as it happens
    assert len([s for s in published if 100 <= s <= 150]) <= 2  # the flat stretch is not
    assert schedule.predicted_cil is not None and schedule.predicted_cil > 0


# -- edge cases --------------------------------------------------------------------------------------------
def test_zero_requests_publish_nothing(caplog) -> None:
    schedule = Fixed(**common(total_requests=0))
    with caplog.at_level(logging.WARNING, LOG):
        published = drive(schedule, decaying(100))
    assert published == []
    assert "past the last expected request" in caplog.text


@pytest.mark.parametrize("make", [Fixed, Greedy])
def test_nothing_is_published_past_the_last_expected_request(make) -> None:
    """Issue 12, item 5: the schedules went on publishing (on the fallback) after the last request."""
    schedule = make(**common(total_requests=150))  # one request per second: the last comes at step 150
    published = drive(schedule, decaying(300))
    assert published and max(published) < 151


@pytest.mark.parametrize("make", [Fixed, Greedy])
def test_told_that_no_requests_come_the_schedule_stops_publishing(make) -> None:
    schedule = make(**common())
    losses = decaying(300)
    published = drive(schedule, losses[:100])
    schedule.requests_ended()
    assert published and drive(schedule, losses[100:], first=101) == []


def test_a_schedule_told_that_no_requests_come_stays_told_after_a_restore() -> None:
    clock, losses = FakeClock(), decaying(300)
    first = greedy()
    drive(first, losses[:100], clock=clock)
    first.requests_ended()
    resumed = greedy()
    resumed.load_state_dict(first.state_dict())
    assert drive(resumed, losses[100:], first=101, clock=clock) == []


def test_a_warmup_longer_than_training_keeps_the_default_schedule() -> None:
    schedule = greedy(warmup_steps=1000, fallback_interval=7)
    assert drive(schedule, decaying(100)) == list(range(7, 101, 7))
    assert schedule.curve is None and schedule.predicted_cil is None


def test_non_finite_losses_fall_back_with_a_logged_reason_then_recover(caplog) -> None:
    losses = np.concatenate([np.full(40, np.nan), decaying(60)])
    losses[[3, 9]] = np.inf
    schedule = Fixed(**common(warmup_steps=30, fallback_interval=10))
    with caplog.at_level(logging.WARNING, LOG):
        published = drive(schedule, losses)
    assert "non-finite training loss" in caplog.text
    assert "cannot fit the loss curve (only 0 finite losses, need at least 8)" in caplog.text
    assert [s for s in published if s <= 40] == [10, 20, 30, 40]  # the fallback meanwhile
    assert schedule.curve is not None  # refitted once enough finite losses arrived


def test_too_few_points_after_a_short_warmup_fall_back_until_there_are_enough(caplog) -> None:
    schedule = greedy(warmup_steps=3, fallback_interval=4)
    with caplog.at_level(logging.WARNING, LOG):
        drive(schedule, decaying(40))
    assert "only 4 finite losses, need at least 8" in caplog.text
    assert schedule.curve is not None


def test_a_failing_user_predictor_falls_back_with_its_reason(caplog) -> None:
    class Broken(LossPredictor):
        def fit(self, steps, losses):
            raise FitError("the oracle is on holiday")

    schedule = greedy(predictor=Broken())
    with caplog.at_level(logging.WARNING, LOG):
        assert drive(schedule, decaying(60)) == [10, 20, 30, 40, 50, 60]
    assert "the oracle is on holiday" in caplog.text


def test_bad_arguments_name_the_value_and_the_fix() -> None:
    with pytest.raises(ConfigurationError, match="warmup_steps=-1"):
        Fixed(warmup_steps=-1)
    with pytest.raises(ConfigurationError, match="request_rate=0.0"):
        Greedy(request_rate=0.0)
    with pytest.raises(ConfigurationError, match="threshold=-0.5"):
        Greedy(threshold=-0.5)
    with pytest.raises(ConfigurationError, match="predictor must be"):
        Fixed(predictor="exp3")
    with pytest.raises(ConfigurationError, match="max_interval=-1"):
        Greedy(max_interval=-1)


# -- state -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: Fixed(**common()),
    lambda: Fixed(**common(refit_every=25, fit_window=60, probe_every=5)),
    lambda: greedy(),
    lambda: greedy(refit_every=25, refit_error=0.2, fit_window=60, probe_every=5, tune_threshold=True),
    lambda: greedy(refit_every=25, refit_error=0.2, fit_window=60, follow_losses=True,
                            warmup_on_improvement=True, max_interval=15),
], ids=["fixed", "fixed_refit", "greedy", "greedy_refit", "greedy_follow_losses"])
def test_state_dict_round_trip_resumes_the_same_decisions(make) -> None:
    losses = decaying(300, noise=0.01)
    served = lambda version, step: 0.1 + 0.002 * (step - version)  # noqa: E731
    original, clock = make(), FakeClock()
    drive(original, losses[:120], clock=clock, served=served)
    state = json.loads(json.dumps(original.state_dict(), allow_nan=False))  # plain JSON values only
    resumed = make()
    resumed.load_state_dict(state)
    resumed_clock = FakeClock()
    resumed_clock.now = clock.now
    assert drive(resumed, losses[120:], 121, resumed_clock, served=served) == \
        drive(original, losses[120:], 121, clock, served=served)
    assert resumed.predicted_cil == pytest.approx(original.predicted_cil, rel=0.05)


def test_a_fresh_state_round_trips_too() -> None:
    schedule = Greedy()
    schedule.load_state_dict(json.loads(json.dumps(schedule.state_dict(), allow_nan=False)))
    assert schedule.predicted_cil is None


# -- Lightning ---------------------------------------------------------------------------------------------
def test_greedy_in_a_real_trainer_publishes_fewer_times_than_steps(tmp_path) -> None:
    steps = 160
    L.seed_everything(0, verbose=False)  # the losses, hence the decisions, are then reproducible
    schedule = Greedy(request_rate=50.0, total_requests=100_000, warmup_steps=20, fallback_interval=10,
                      refit_every=20, fit_window=40)
    callback = ViperCallback("regressor", LOOPBACK_ANY_PORT, str(tmp_path / "pfs"), schedule=schedule,
                             publish_on_train_end=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[callback])
    trainer.fit(Regressor())
    versions = range(1, callback.last_version + 1)
    assert 3 <= len(versions) < steps  # the warm-up's two, then at least one chosen by the rule
    assert callback.last_step > 20
    assert schedule.curve is not None and schedule.predicted_cil is not None
    assert json.dumps(callback.state_dict()["schedule"], allow_nan=False)


@pytest.mark.parametrize("name", ["Fixed", "Greedy"])
def test_lightning_cli_yaml_selects_the_schedule_with_init_args(name, tmp_path) -> None:
    config = {"callback": {"class_path": "viper_lightning.ViperCallback", "init_args": {
        "model_name": "nt3", "pfs_root": str(tmp_path), "schedule": {
            "class_path": f"viper_lightning.schedules.{name}",
            "init_args": {"request_rate": 20.0, "total_requests": 5000, "warmup_steps": 40, "refit_every": 25,
                          "load_time_s": 0.02, "warmup_on_improvement": True, "max_interval": 15, "predictor": {
                              "class_path": "viper_lightning.predictor.LearningCurveFitter",
                              "init_args": {"families": ["exp3", "lin2"], "polish": 1}}}}}}}
    parser = ArgumentParser()
    parser.add_argument("--callback", type=ViperCallback)
    parsed = parser.parse_string(yaml.safe_dump(config))
    callback = parser.instantiate(parsed).callback
    schedule = callback.schedule
    assert type(schedule).__name__ == name and schedule.needs_loss
    assert schedule.load == InferenceLoad(20.0, 5000) and schedule.warmup_steps == 40 and schedule.refitting
    assert isinstance(schedule.predictor, LearningCurveFitter) and schedule.predictor.families == ("exp3", "lin2")
    assert schedule.predictor.polish == 1 and schedule.max_interval == 15 and schedule.warmup_on_improvement
    assert math.isclose(schedule.costs().load_time_s, 0.02)


@pytest.mark.parametrize("make", [Fixed, Greedy])
def test_a_flat_fit_never_means_never_publish_again(make) -> None:
    """Issue 12, item 2: a curve that has flattened predicts no gain from any publish, but it says
    nothing about the loss beyond the steps it was fitted on; the served version goes stale."""
    flat = 0.3 + np.random.default_rng(2).normal(0, 0.001, 400)
    schedule = make(**common(warmup_steps=40, detect_changes=False))  # the cap alone
    published = drive(schedule, flat)
    gaps = np.diff([s for s in published if s > 40])
    assert len(gaps) >= 5 and gaps.max() <= 41  # at most the span of the 41 losses it fitted



def test_after_a_change_the_serving_weights_are_priced_on_the_new_data() -> None:
    """Issue 12: after a shift the serving weights are at least as bad as the first losses since
    it, so the drop since the shift publishes at once, not only a drop below where the losses
    stood when the change was noticed (the fallback is out of the way here)."""
    x = np.arange(1, 301, dtype=np.float64)
    losses = np.where(x <= 150, 0.2, 0.3 + 0.7 * np.exp(-(x - 151) / 15)) + np.random.default_rng(3).normal(0, 0.01, 300)
    published = drive(greedy(follow_losses=True, fallback_interval=1000), losses)
    after = [step for step in published if step > 150]
    assert after and after[0] <= 156, published  # the change is noticed at step 155


def test_the_gap_is_capped_where_publishing_costs_the_budget() -> None:
    """A flat noisy loss rarely drops significantly: publishes then come at least as often as a
    1% share of the training time pays for (a publish costs 0.1 step here: every 10 steps)."""
    losses = 0.5 + np.random.default_rng(0).normal(0, 0.01, 400)
    published = drive(greedy(follow_losses=True, publish_budget=0.01), losses, stall=0.1)
    assert max(np.diff(published)) <= 10, published
    uncapped = drive(greedy(follow_losses=True, publish_budget=0.0), losses, stall=0.1)
    assert max(np.diff(uncapped)) > 10, uncapped  # the span of the fitted losses is the only cap


def test_publishing_never_costs_more_than_the_ceiling() -> None:
    """A loss that falls fast would publish nearly every step; at 0.5 step per publish and a 10%
    ceiling, never more often than every 5 steps."""
    losses = decaying(200, noise=0.001, rate=80.0)
    published = drive(greedy(follow_losses=True, warmup_on_improvement=True, max_publish_share=0.1), losses,
                      stall=0.5)
    assert min(np.diff(published)) >= 5, published
    unbounded = drive(greedy(follow_losses=True, warmup_on_improvement=True, max_publish_share=0.0), losses,
                      stall=0.5)
    assert min(np.diff(unbounded)) < 5, unbounded


def test_publish_shares_are_checked() -> None:
    for bad in (dict(publish_budget=1.0), dict(max_publish_share=-0.1), dict(publish_budget=float("nan")),
                dict(publish_budget=0.2, max_publish_share=0.1)):
        with pytest.raises(ConfigurationError):
            Greedy(**bad)


def test_the_cost_bounds_survive_a_restore() -> None:
    """The ceiling is learnt from the measured costs, which a checkpoint keeps: a resumed
    schedule keeps it from its first step, not only after its next publish."""
    losses, clock = decaying(200, noise=0.001, rate=80.0), FakeClock()
    first = greedy(follow_losses=True, warmup_on_improvement=True, max_publish_share=0.1)
    before = drive(first, losses[:100], clock=clock, stall=0.5)
    resumed = greedy(follow_losses=True, warmup_on_improvement=True, max_publish_share=0.1)
    resumed.load_state_dict(first.state_dict())
    after = drive(resumed, losses[100:], first=101, clock=clock, stall=0.5)
    assert after and min(np.diff([before[-1], *after])) >= 5, (before, after)


def test_a_threshold_with_the_default_loss_following_rule_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="follow_losses"):
        Greedy(threshold=0.1)
    with pytest.raises(ConfigurationError, match="follow_losses"):
        Greedy(tune_threshold=True)
    assert Greedy(threshold=0.1, follow_losses=False).threshold == 0.1
