"""The harness's workloads: train once, keep every step's weights, measure the real publish costs.

A schedule does not change what training computes, only when weights are copied out, so each
workload trains once and every schedule is replayed against the same trajectory. Publish
costs come from the real `ModelPublisher` and `ModelSubscriber` on loopback with a temporary
file-system tier, for this workload's model.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from torch import Tensor

from examples.nt3 import NT3, DriftingGeneStream
from examples.ptycho import DriftingDiffractionStream, PtychoRegressor
from viper_lightning import ModelPublisher, ModelSubscriber

from ._cil_synthetic import (PositionStream, SmallNet, SparseRecommender, drifting_preferences, late_signal,
                             rotating_rule, shifting_rule)

PerSampleLoss = Callable[[Tensor, Tensor], Tensor]
WAIT_S = 60.0


@dataclass(frozen=True)
class Workload:
    """A continual-training scenario: model, drifting data, and the consumer's traffic."""

    name: str
    build: Callable[[], tuple[L.LightningModule, L.LightningDataModule]]
    per_sample_loss: PerSampleLoss
    steps_per_epoch: int
    requests_per_step: float  # requests arriving per (undisturbed) training step
    request_size: int  # samples per request


def _nt3() -> tuple[L.LightningModule, L.LightningDataModule]:
    data = DriftingGeneStream(input_length=1000, batch_size=32, steps_per_epoch=100, drift_per_step=0.005,
                              noise=2.0, seed=0)
    return NT3(input_length=1000, conv_channels=8, dense_units=32, lr=1e-3), data


def _ptycho() -> tuple[L.LightningModule, L.LightningDataModule]:
    return PtychoRegressor(), DriftingDiffractionStream(steps_per_epoch=100, drift_per_step=0.01)


def _shifts() -> tuple[L.LightningModule, L.LightningDataModule]:
    return SmallNet(16, 32, 2, _cross_entropy), PositionStream(shifting_rule(), batch_size=32, steps_per_epoch=100)


def _plateau() -> tuple[L.LightningModule, L.LightningDataModule]:
    return SmallNet(16, 32, 2, _cross_entropy), PositionStream(late_signal(), batch_size=32, steps_per_epoch=100)


def _cheap() -> tuple[L.LightningModule, L.LightningDataModule]:
    return SparseRecommender(), PositionStream(drifting_preferences(), batch_size=64, steps_per_epoch=100)


def _expensive() -> tuple[L.LightningModule, L.LightningDataModule]:
    return (SmallNet(16, 512, 2, _cross_entropy, lr=1e-3, depth=3),
            PositionStream(rotating_rule(), batch_size=1024, steps_per_epoch=100))


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="none")


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return ((outputs - targets) ** 2).flatten(1).mean(dim=1)


WORKLOADS = {
    "nt3": Workload("nt3", _nt3, _cross_entropy, steps_per_epoch=100, requests_per_step=4, request_size=8),
    "ptycho": Workload("ptycho", _ptycho, _mse, steps_per_epoch=100, requests_per_step=4, request_size=8),
    "shifts": Workload("shifts", _shifts, _cross_entropy, steps_per_epoch=100, requests_per_step=4, request_size=8),
    "plateau": Workload("plateau", _plateau, _cross_entropy, steps_per_epoch=100, requests_per_step=4,
                        request_size=8),
    "cheap": Workload("cheap", _cheap, _cross_entropy, steps_per_epoch=100, requests_per_step=4, request_size=8),
    "expensive": Workload("expensive", _expensive, _cross_entropy, steps_per_epoch=100, requests_per_step=4,
                          request_size=8),
}


@dataclass
class Trajectory:
    """One training run: weights after every step (row 0: initial), the logged losses, the
    batches trained on, and the measured time per step."""

    module: L.LightningModule
    data: L.LightningDataModule
    weights: Tensor
    losses: np.ndarray
    batches: list[tuple[Tensor, Tensor]]
    step_time_s: float
    names: list[str] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.losses)

    def state_dict(self, version: int) -> dict[str, Tensor]:
        pieces = torch.split(self.weights[version], [shape.numel() for shape in self.shapes])
        return {name: piece.view(shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}


class _Recorder(L.Callback):
    """Copies the weights out after every optimizer step; its own copying is not timed."""

    def __init__(self, steps: int) -> None:
        self.steps, self.losses, self.batches, self.step_times = steps, [], [], []
        self.weights: Tensor | None = None
        self._last = 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        state = module.state_dict()
        self.names, self.shapes = list(state), [t.shape for t in state.values()]
        self.weights = torch.empty(self.steps + 1, sum(s.numel() for s in self.shapes))
        self._copy(module, 0)
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.step_times.append(time.perf_counter() - self._last)
        self.losses.append(float(outputs["loss"]))
        self.batches.append(tuple(t.detach() for t in batch))
        self._copy(module, trainer.global_step)
        self._last = time.perf_counter()

    def _copy(self, module: L.LightningModule, row: int) -> None:
        with torch.no_grad():
            torch.cat([t.detach().reshape(-1).float() for t in module.state_dict().values()], out=self.weights[row])


def train(workload: Workload, steps: int) -> Trajectory:
    """Train `steps` optimizer steps with a real Lightning Trainer, recording everything."""
    L.seed_everything(0, verbose=False)
    module, data = workload.build()
    recorder = _Recorder(steps)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder])
    trainer.fit(module, datamodule=data)
    step_time = statistics.median(recorder.step_times[5:] or recorder.step_times)  # skip the warm-up of torch
    trajectory = Trajectory(module, data, recorder.weights, np.array(recorder.losses), recorder.batches, step_time)
    trajectory.names, trajectory.shapes = recorder.names, recorder.shapes
    return trajectory


@dataclass(frozen=True)
class MeasuredCosts:
    """Medians of real publishes: the training stall, the writer's commit, publish-to-serving.
    `stall_s` is the publisher's snapshot until `hook_s` is measured too: then it is what a
    publish adds to the callback's hook, and `hook_s` the hook on a step that does not publish."""

    stall_s: float
    commit_s: float
    latency_s: float
    probe_s: float  # one eval-mode forward pass over a training batch (a served-loss probe)
    samples: int
    hook_s: float = 0.0


def measure_costs(trajectory: Trajectory, publishes: int = 16) -> MeasuredCosts:
    """Publish this model `publishes` times through the real publisher to a real subscriber."""
    stalls, commits, latencies = [], [], []
    model = copy.deepcopy(trajectory.module)
    with tempfile.TemporaryDirectory(prefix="viper-cil-") as root, \
            ModelPublisher("cil", "tcp://127.0.0.1:*", root) as publisher, \
            ModelSubscriber(copy.deepcopy(model), "cil", publisher.endpoint, root, load_latest=False,
                            on_update=lambda record: latencies.append(record.latency_s)) as subscriber:
        if not publisher.wait_for_subscribers(1, WAIT_S):
            raise RuntimeError("the measuring subscriber never connected")
        for round_ in range(publishes + 1):  # the first, cold publish is discarded
            model.load_state_dict(trajectory.state_dict(min(round_ + 1, trajectory.steps)))
            version = publisher.publish(model)
            if version is None:
                raise RuntimeError(f"a publish was skipped ({publisher.publishes_skipped} so far): every snapshot slot was "
                                   "still held")
            publisher.flush(WAIT_S)
            if not subscriber.wait_for_version(version, WAIT_S):
                raise RuntimeError(f"the subscriber never served version {version}")
            commit = publisher.last_commit
            stalls.append(commit.stall_s)
            commits.append(_writer_seconds(commit))
    return MeasuredCosts(statistics.median(stalls[1:]), statistics.median(commits[1:]),
                         statistics.median(latencies[1:]), _probe_time(trajectory), publishes)


def _writer_seconds(commit: object) -> float:
    """Time the background writer spent on one version (whichever stages this publisher reports)."""
    return sum(getattr(commit, name, 0.0) for name in ("digest_s", "store_s", "notify_s"))


def _probe_time(trajectory: Trajectory, repeat: int = 50) -> float:
    model = copy.deepcopy(trajectory.module).eval()
    x, _ = trajectory.batches[-1]
    times = []
    with torch.no_grad():
        for _ in range(repeat):
            started = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - started)
    return statistics.median(times)
