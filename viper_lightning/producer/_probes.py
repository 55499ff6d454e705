"""Served-loss probes for schedules that ask for them: the loss of an older published version
on the batch this step trained on."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any

import lightning as L
import torch

log = logging.getLogger("viper_lightning.callback")

__all__ = ["ServedLossProbe"]

_OLDEST_KEPT = 160  # steps: twice the oldest probe age a schedule asks about (LossHistory.probe_version)


class ServedLossProbe:
    """Keeps host copies of a few published versions and scores one on a training batch.

    A schedule that learns how fast a served version goes stale (`probe_versions`, then
    `observe_served_loss`) asks about versions of several ages, up to about 80 steps. Keeping
    every version would cost a model's memory per publish, so copies are kept in host memory on
    a log scale of age: the oldest of each power-of-two age bracket, nothing past `_OLDEST_KEPT`
    steps, at most `MAX_COPIES` in all. A probe then scores the newest kept version at or before
    the one asked for (its true age is what the schedule learns from).

    The loss is the module's own `training_step`, run on a separate copy of the module (one more
    copy of the weights on the training device, made at the first probe), in eval mode as a
    served model answers, without gradients, and with the random number generators forked, so
    the training run itself is untouched and what the step logs goes nowhere. A module that
    optimizes manually (its step needs the trainer's optimizers) is never probed, and a probe
    that fails turns probing off with a warning: a probe is a measurement, never a reason to
    stop training.
    """

    MAX_COPIES = _OLDEST_KEPT.bit_length() + 1

    def __init__(self) -> None:
        self._copies: dict[int, dict[str, torch.Tensor]] = {}
        self._module: L.LightningModule | None = None
        self.seconds = 0.0  # training-thread time spent keeping copies and probing
        self.probes = 0
        self.disabled: str | None = None  # why probing is off, once it is

    @property
    def kept(self) -> list[int]:
        """Steps of the versions kept, oldest first."""
        return sorted(self._copies)

    def reset(self) -> None:
        """Forget the copies and the probe module (a new fit starts)."""
        self._copies.clear()
        self._module, self.disabled = None, None

    def remember(self, step: int, module: L.LightningModule) -> None:
        """Keep the weights published after `step` (a host copy, so training may go on)."""
        if self.disabled is not None:
            return
        started = time.perf_counter()
        with torch.no_grad():
            self._copies[step] = {name: tensor.detach().to("cpu", copy=True)
                                  for name, tensor in module.state_dict().items()}
        oldest_in: dict[int, int] = {}
        for kept in sorted(self._copies, reverse=True):  # newest first: the oldest of a bracket comes last
            age = step - kept
            if age > _OLDEST_KEPT or age < 0:  # too old, or left over from before a resume
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
        its loss on `batch` (None when none is kept, probing is off, or the step returns no
        scalar loss)."""
        kept = [s for s in self._copies if s <= version_step]
        if not kept or self.disabled is not None:
            return None
        if not module.automatic_optimization:
            self._disable("the module optimizes manually: its training_step needs the trainer's optimizers")
            return None
        started = time.perf_counter()
        version = max(kept)
        try:
            outputs = self._run_step(module, self._copies[version], batch, batch_idx)
        except Exception as exc:  # a user's training_step may need what a detached copy lacks
            self._disable(f"the probe's training_step failed: {type(exc).__name__}: {exc}")
            return None
        self.probes += 1
        self.seconds += time.perf_counter() - started
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            return version, float(loss)
        return None

    def _run_step(self, module: L.LightningModule, weights: dict[str, torch.Tensor], batch: Any,
                  batch_idx: int) -> Any:
        if self._module is None:
            self._module = copy.deepcopy(module)  # LightningModule drops its trainer when copied
        probe = self._module
        probe.load_state_dict(weights)
        probe.eval()
        devices = [module.device] if module.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "self.log() without a trainer": nothing to log to, on purpose
            return probe.training_step(batch, batch_idx)

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        self._copies.clear()
        self._module = None
        log.warning("served-loss probes are off for the rest of this run: %s", reason)
