"""Served-loss probes for schedules that ask for them: the loss of an older published version
on the batch this step trained on."""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import lightning as L
import torch

__all__ = ["ServedLossProbe"]

_OLDEST_KEPT = 160  # steps: twice the oldest probe age a schedule asks about (LossHistory.probe_version)


class ServedLossProbe:
    """Keeps host copies of a few published versions and scores one on a training batch.

    A schedule that learns how fast a served version goes stale (`probe_versions`, then
    `observe_served_loss`) asks about versions of several ages, up to about 80 steps. Keeping
    every version would cost a model's memory per publish, so copies are kept on a log scale of
    age: the oldest of each power-of-two age bracket, nothing past `_OLDEST_KEPT` steps, at most
    `MAX_COPIES` in all. A probe then scores the newest kept version at or before the one asked
    for (its true age is what the schedule learns from). The loss is the module's own
    `training_step` run on a separate copy of the module (never the training one), in eval mode
    without gradients, so training is untouched and what it logs goes nowhere.
    """

    MAX_COPIES = _OLDEST_KEPT.bit_length() + 1

    def __init__(self) -> None:
        self._copies: dict[int, dict[str, torch.Tensor]] = {}
        self._module: L.LightningModule | None = None
        self.seconds = 0.0  # training-thread time spent keeping copies and probing
        self.probes = 0

    @property
    def kept(self) -> list[int]:
        """Steps of the versions kept, oldest first."""
        return sorted(self._copies)

    def remember(self, step: int, module: L.LightningModule) -> None:
        """Keep the weights published after `step` (a copy, so training may go on)."""
        started = time.perf_counter()
        with torch.no_grad():
            self._copies[step] = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        oldest_in: dict[int, int] = {}
        for kept in sorted(self._copies, reverse=True):  # newest first: the oldest of a bracket comes last
            age = step - kept
            if age > _OLDEST_KEPT:
                del self._copies[kept]
                continue
            bracket = age.bit_length()
            if bracket in oldest_in:
                del self._copies[oldest_in[bracket]]  # a newer one of the same bracket
            oldest_in[bracket] = kept
        self.seconds += time.perf_counter() - started

    def loss(self, version_step: int, module: L.LightningModule, batch: Any,
             batch_idx: int) -> tuple[int, float] | None:
        """The newest kept version at or before the one published after `version_step`, and
        its loss on `batch` (None when none is kept or the step returns no scalar loss)."""
        kept = [s for s in self._copies if s <= version_step]
        if not kept:
            return None
        started = time.perf_counter()
        version = max(kept)
        if self._module is None:
            self._module = copy.deepcopy(module)  # LightningModule drops its trainer when copied
        probe = self._module
        probe.load_state_dict(self._copies[version])
        probe.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "self.log() without a trainer": nothing to log to, on purpose
            outputs = probe.training_step(batch, batch_idx)
        self.probes += 1
        self.seconds += time.perf_counter() - started
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            return version, float(loss)
        return None
