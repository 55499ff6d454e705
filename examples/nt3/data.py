"""Endless, slowly drifting two-class gene-expression stream for continual training.

Real deployments keep training on new data while a served copy of the model
answers requests; the served copy goes stale because the data keeps changing.
This module fakes that situation cheaply: each sample is a smooth class-specific
expression profile plus Gaussian noise, and the class profile rotates a little
with every training step. A model that keeps training tracks the rotation; a
frozen snapshot slowly loses accuracy, which is what serving tests want to see.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import lightning
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

# Per-gene RMS of the class signal (noise std is ``noise``, 1.0 by default).
# Weak per gene, so no single gene gives the class away, but the evidence adds
# up over genes: longer inputs are easier, as with real expression data.
_SIGNAL_RMS = 0.15
# Width of the moving average that makes profiles smooth, like co-expressed
# gene blocks; smooth profiles are what a conv front end can pick up quickly.
_SMOOTHING = 15
_TRAIN_STREAM = 0
_EVAL_STREAM = 1


def _require_positive(name: str, value: float) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is strictly positive."""
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}; pass a positive value.")


def _stream_seed(seed: int, step: int, stream: int) -> int:
    """Reproducible generator seed, distinct per step and stream for a given ``seed``."""
    return (seed * 1_000_003 + step * 2 + stream) % (2**63)


def _smooth_orthonormal_pair(input_length: int, generator: torch.Generator) -> Tensor:
    """Two smooth, orthonormal profiles spanning the plane the class signal rotates in."""
    raw = torch.randn(2, 1, input_length + _SMOOTHING - 1, generator=generator)
    kernel = torch.full((1, 1, _SMOOTHING), 1.0 / _SMOOTHING)
    smooth = torch.nn.functional.conv1d(raw, kernel).squeeze(1)
    q, _ = torch.linalg.qr(smooth.T)
    return q.T.contiguous()


class _DriftingGeneDataset(IterableDataset):
    """Yields one epoch of ``(x, y)`` samples per iteration; ``epoch`` says which one.

    Samples are generated batch by batch with a generator seeded from the global
    step, so the data is identical whatever ``num_workers`` is: worker ``w``
    produces batches ``w, w + W, ...`` and the DataLoader's round-robin puts them
    back in order.
    """

    def __init__(
        self,
        input_length: int,
        batch_size: int,
        steps_per_epoch: int,
        drift_per_step: float,
        noise: float,
        seed: int,
    ) -> None:
        """Fix the class-signal plane from ``seed``; the stream starts at epoch 0."""
        super().__init__()
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.drift_per_step = drift_per_step
        self.noise = noise
        self.seed = seed
        self.epoch = 0
        plane = _smooth_orthonormal_pair(input_length, torch.Generator().manual_seed(seed))
        self.plane = plane * _SIGNAL_RMS * math.sqrt(input_length)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Start the current epoch; the epoch is read now, not when the first item is pulled."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._epoch_samples(self.epoch, worker, workers)

    def _epoch_samples(
        self, epoch: int, worker: int, workers: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """This worker's share of one epoch, one sample at a time."""
        first_step = epoch * self.steps_per_epoch
        for batch in range(worker, self.steps_per_epoch, workers):
            x, y = self.draw(self.batch_size, first_step + batch, _TRAIN_STREAM)
            yield from zip(x, y)

    def class_profile(self, step: int) -> Tensor:
        """Mean expression offset of class 1 at drift position ``step`` (class 0 gets minus it)."""
        angle = self.drift_per_step * step
        return math.cos(angle) * self.plane[0] + math.sin(angle) * self.plane[1]

    def draw(self, n: int, step: int, stream: int) -> tuple[Tensor, Tensor]:
        """``n`` labelled samples at drift position ``step`` from an independent stream."""
        generator = torch.Generator().manual_seed(_stream_seed(self.seed, step, stream))
        y = torch.randint(0, 2, (n,), generator=generator)
        sign = (2 * y - 1).to(torch.float32).unsqueeze(1)
        noise = torch.randn(n, self.plane.shape[1], generator=generator) * self.noise
        return sign * self.class_profile(step) + noise, y

    def advance(self) -> None:
        """Move to the next epoch so the drift carries on instead of replaying data."""
        self.epoch += 1


class _EpochAdvancingLoader(DataLoader):
    """DataLoader that moves its dataset to the next epoch each time it is iterated.

    The epoch lives in the main-process dataset; workers receive a copy when the
    iterator is created, so advancing right after that works for any
    ``num_workers`` (persistent workers would keep a stale copy, so they are not used).
    """

    def __iter__(self) -> Iterator[Any]:
        """Create the epoch's iterator (capturing the epoch), then advance the dataset."""
        iterator = super().__iter__()
        self.dataset.advance()
        return iterator


class DriftingGeneStream(lightning.LightningDataModule):
    """Synthetic continual-training data: two classes whose profiles rotate slowly.

    Each epoch has ``steps_per_epoch`` batches so epoch-based schedules fire at
    a predictable rate, but the drift position keeps counting across epochs, so
    the stream never repeats. Class 1 has mean profile ``+p(t)`` and class 0
    ``-p(t)``, where ``p(t)`` turns by ``drift_per_step`` radians per batch inside
    a fixed plane of smooth profiles; ``noise`` is the per-gene noise std.
    At the default 0.002 rad/step a frozen model is near chance after ~800
    steps (a quarter turn) and systematically wrong after that, so staleness
    of a served snapshot shows up clearly in :meth:`sample_batch` accuracy.
    Everything is derived from ``seed``, so runs are reproducible and do not
    depend on ``num_workers``.
    """

    def __init__(
        self,
        input_length: int = 6000,
        batch_size: int = 32,
        steps_per_epoch: int = 100,
        drift_per_step: float = 0.002,
        noise: float = 1.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        """Validate the settings and build the stream (cheap: two profiles of ``input_length``)."""
        super().__init__()
        for name, value in (
            ("input_length", input_length),
            ("batch_size", batch_size),
            ("steps_per_epoch", steps_per_epoch),
            ("noise", noise),
        ):
            _require_positive(name, value)
        if num_workers < 0:
            raise ValueError(
                f"num_workers must be >= 0, got {num_workers}; use 0 for in-process loading."
            )
        self.save_hyperparameters()
        self.dataset = _DriftingGeneDataset(
            input_length, batch_size, steps_per_epoch, drift_per_step, noise, seed
        )

    def train_dataloader(self) -> DataLoader:
        """Finite loader over the next epoch(s) of the stream, ``batch_size`` samples per batch."""
        return _EpochAdvancingLoader(
            self.dataset,
            batch_size=self.hparams["batch_size"],
            num_workers=self.hparams["num_workers"],
        )

    def sample_batch(self, n: int, step: int) -> tuple[Tensor, Tensor]:
        """``n`` fresh samples at drift position ``step``, e.g. to score a served model.

        Drawn from a stream separate from training, so they are held-out data
        even at a step the model was trained on.
        """
        _require_positive("n", n)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}; drift positions start at 0.")
        return self.dataset.draw(n, step, _EVAL_STREAM)

    def state_dict(self) -> dict[str, Any]:
        """Save the stream position so a resumed run continues the drift where it stopped."""
        return {"epoch": self.dataset.epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stream position saved by :meth:`state_dict`."""
        self.dataset.epoch = int(state_dict["epoch"])
