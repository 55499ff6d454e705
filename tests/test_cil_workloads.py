"""The schedule harness's synthetic workloads produce the loss processes they are named after
(real Lightning Trainers, a few hundred steps each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks._cil_synthetic import PositionStream, late_signal, shifting_rule
from benchmarks._cil_real import run_real
from benchmarks._cil_workloads import WORKLOADS, train
from viper_lightning.schedules import EveryNSteps


def test_a_stream_continues_its_positions_across_epochs_and_holds_out_its_samples() -> None:
    stream = PositionStream(shifting_rule(), batch_size=4, steps_per_epoch=3)
    first = [batch for batch in stream.train_dataloader()]
    second = [batch for batch in stream.train_dataloader()]
    assert stream.position == 6 and len(first) == len(second) == 3
    assert not torch.equal(first[0][0], second[0][0])  # the next epoch is new data, not a replay
    again = PositionStream(shifting_rule(), batch_size=4, steps_per_epoch=3)
    assert torch.equal(next(iter(again.train_dataloader()))[0], first[0][0])  # seeded
    held_out = stream.sample_batch(4, 0)
    assert not torch.equal(held_out[0], first[0][0])


def test_the_late_signal_only_carries_labels_from_its_step_on() -> None:
    draw = late_signal(appears=10)
    generator = torch.Generator().manual_seed(0)
    x_early, y_early = draw(4000, 5, generator)
    x_late, y_late = draw(4000, 10, generator)
    gap = lambda x, y: float((x[y == 1].mean(0) - x[y == 0].mean(0)).norm())  # noqa: E731
    assert gap(x_early, y_early) < 0.2 < 2.0 < gap(x_late, y_late)


def test_shifts_make_the_loss_jump_and_the_plateau_drops_late() -> None:
    shifts = train(WORKLOADS["shifts"], 200).losses
    assert shifts[150:160].mean() > 1.5 * shifts[130:150].mean()  # the rule changed at step 150
    plateau = train(WORKLOADS["plateau"], 350).losses
    assert abs(plateau[100:250].mean() - np.log(2)) < 0.03  # chance level, however long it trains
    assert plateau[320:350].mean() < 0.6 * plateau[200:250].mean()


def test_a_real_run_serves_its_versions_on_the_world_clock() -> None:
    """Real-run mode: the callback publishes, the subscriber serves, and what it served is the
    recorded run's weights of that step (checked inside run_real), at world times that grow."""
    trajectory = train(WORKLOADS["shifts"], 40)
    run = run_real(WORKLOADS["shifts"], EveryNSteps(10), trajectory, trajectory.step_time_s)
    steps = [step for step, _ in run.live]
    times = [seconds for _, seconds in run.live]
    assert run.publishes == 4 and steps[0] == 0 and set(steps[1:]) <= {10, 20, 30, 40} and steps[-1] == 40
    assert times == sorted(times) and times[-1] >= 30 * trajectory.step_time_s
    assert run.hook_s > 0 and len(run.computes) == 40  # one compute span per step; hooks also at epoch ends
    assert sum(published for _, published in run.hooks) == 4


def test_a_real_run_that_differs_from_the_recorded_one_is_refused() -> None:
    """The replay's weights score the real run only if training really is the same run."""
    trajectory = train(WORKLOADS["shifts"], 20)
    trajectory.weights[20] += 1e-3  # as if the real run had trained differently
    with pytest.raises(RuntimeError, match="differs from the recorded run"):
        run_real(WORKLOADS["shifts"], EveryNSteps(10), trajectory, trajectory.step_time_s)
