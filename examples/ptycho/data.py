"""Endless synthetic ptychography stream whose illumination probe drifts with every step.

Each sample is an object patch (amplitude and phase made of a few Gaussian blobs) lit by a
Gaussian probe with a little phase curvature; the input is the standardised log intensity of
its far-field diffraction pattern, the target the object's amplitude and phase. The probe's
centre circles the patch by `drift_per_step` radians per step, so the inverse map changes
slowly and continual training has something to track.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

_BLOBS = 3
_PROBE_WIDTH = 5.0  # probe standard deviation, pixels
_PROBE_CURVATURE = 0.05  # radians per pixel² of defocus-like phase
_TRAIN_STREAM = 0
_EVAL_STREAM = 1


def _require_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}; pass a positive value.")


class DiffractionSimulator:
    """Draws (diffraction, object) pairs at any drift position, reproducibly from `seed`."""

    def __init__(self, size: int, drift_per_step: float, probe_orbit: float, seed: int) -> None:
        self.size, self.drift_per_step, self.probe_orbit, self.seed = size, drift_per_step, probe_orbit, seed
        axis = torch.arange(size, dtype=torch.float32)
        self._y, self._x = torch.meshgrid(axis, axis, indexing="ij")

    def probe(self, step: int) -> Tensor:
        """The complex illumination at drift position `step`."""
        angle = self.drift_per_step * step
        centre_x = self.size / 2 + self.probe_orbit * math.cos(angle)
        centre_y = self.size / 2 + self.probe_orbit * math.sin(angle)
        radius2 = (self._x - centre_x) ** 2 + (self._y - centre_y) ** 2
        return torch.exp(-radius2 / (2 * _PROBE_WIDTH**2)) * torch.exp(1j * _PROBE_CURVATURE * radius2)

    def objects(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Amplitude in [0.5, 1] and phase in [0, π/2], both from the same blobs."""
        shape = (n, _BLOBS, 1, 1)
        centre_x = torch.rand(shape, generator=generator) * self.size
        centre_y = torch.rand(shape, generator=generator) * self.size
        width = 1.5 + 2.0 * torch.rand(shape, generator=generator)
        height = torch.rand(shape, generator=generator)
        radius2 = (self._x - centre_x) ** 2 + (self._y - centre_y) ** 2
        level = (height * torch.exp(-radius2 / (2 * width**2))).sum(dim=1).clamp(max=1.5) / 1.5
        return 0.5 + 0.5 * level, math.pi / 2 * level

    def draw(self, n: int, step: int, stream: int) -> tuple[Tensor, Tensor]:
        """`n` samples at drift position `step`: inputs (n, 1, S, S), targets (n, 2, S, S)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step * 2 + stream) % (2**63))
        amplitude, phase = self.objects(n, generator)
        field = amplitude * torch.exp(1j * phase) * self.probe(step)
        intensity = torch.fft.fftshift(torch.fft.fft2(field).abs() ** 2, dim=(-2, -1))
        x = torch.log1p(intensity)
        x = (x - x.mean(dim=(-2, -1), keepdim=True)) / x.std(dim=(-2, -1), keepdim=True)
        return x.unsqueeze(1), torch.stack([amplitude, phase], dim=1)


class _EpochOfBatches(IterableDataset):
    """One epoch of ready-made batches per iteration; the drift position keeps counting."""

    def __init__(self, simulator: DiffractionSimulator, batch_size: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.simulator, self.batch_size, self.steps_per_epoch = simulator, batch_size, steps_per_epoch
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        first, self.epoch = self.epoch * self.steps_per_epoch, self.epoch + 1
        return (self.simulator.draw(self.batch_size, first + i, _TRAIN_STREAM) for i in range(self.steps_per_epoch))


class DriftingDiffractionStream(lightning.LightningDataModule):
    """Continual-training data for `PtychoRegressor`: `steps_per_epoch` batches per epoch, the
    probe drifting by `drift_per_step` radians along a circle of `probe_orbit` pixels."""

    def __init__(self, size: int = 16, batch_size: int = 32, steps_per_epoch: int = 100,
                 drift_per_step: float = 0.01, probe_orbit: float = 3.0, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("size", size), ("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch)):
            _require_positive(name, value)
        self.save_hyperparameters()
        self.simulator = DiffractionSimulator(size, drift_per_step, probe_orbit, seed)
        self.dataset = _EpochOfBatches(self.simulator, batch_size, steps_per_epoch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None)  # the dataset yields whole batches

    def sample_batch(self, n: int, step: int) -> tuple[Tensor, Tensor]:
        """`n` held-out samples at drift position `step` (a stream separate from training)."""
        _require_positive("n", n)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}; drift positions start at 0.")
        return self.simulator.draw(n, step, _EVAL_STREAM)
