"""ImportanceScores: each sample's latest training loss, ranked (as SHADE scores importance)."""

from __future__ import annotations

import threading

import numpy as np

from .._errors import ConfigurationError

__all__ = ["ImportanceScores"]


class ImportanceScores:
    """The latest loss of every sample, and their ranks: rank 0 is the highest loss, the most
    important sample to train on again. Ranks, not raw losses, drive sampling and caching, so a
    few huge losses (outliers, label noise) cannot take all the draws. A sample never scored yet
    ranks first: it is the one nothing is known about.

    One object per training process, fed by SampleLossCallback (which gathers the losses of every
    DDP rank first, so each rank ranks alike) and read by ImportanceSampler and SampleCache."""

    def __init__(self, size: int, power: float = 1.0, seed: int = 0) -> None:
        if size < 1 or not power > 0:
            raise ConfigurationError(f"ImportanceScores(size={size}, power={power}): need size >= 1 and power > 0")
        self.power = power
        self._losses = np.full(size, np.inf)
        self._tiebreak = np.random.default_rng(seed).random(size)  # equal losses (unscored ones) in random order
        self._ranks: np.ndarray | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._losses)

    def record(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """The losses of these samples, just computed (indices outside the data set are ignored)."""
        indices, losses = np.asarray(indices, dtype=np.int64), np.asarray(losses, dtype=np.float64)
        keep = (indices >= 0) & (indices < len(self._losses)) & np.isfinite(losses)
        with self._lock:
            self._losses[indices[keep]] = losses[keep]

    def refresh(self) -> None:
        """Rank the losses recorded so far. Ranks are kept until the next refresh (the sampler
        refreshes them as each epoch starts): ranking sorts the whole data set, too much to do
        after every batch of a big one."""
        with self._lock:
            order = np.lexsort((self._tiebreak, -self._losses))
            ranks = np.empty(len(order), dtype=np.int64)
            ranks[order] = np.arange(len(order))
            self._ranks = ranks

    def scored(self, index: int) -> bool:
        """Whether sample `index` has a loss yet."""
        return bool(np.isfinite(self._losses[index]))

    def ranks(self) -> np.ndarray:
        """Each sample's rank at the last refresh (0: the highest loss; unscored samples first,
        in random order)."""
        if self._ranks is None:
            self.refresh()
        return self._ranks

    def probabilities(self) -> np.ndarray:
        """Sampling probabilities from the ranks: proportional to ((N - rank) / N) ** power."""
        weights = ((len(self._losses) - self.ranks()) / len(self._losses)) ** self.power
        return weights / weights.sum()

    def state_dict(self) -> dict[str, list[float]]:
        return {"losses": [float(v) for v in self._losses]}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        losses = np.asarray(state.get("losses", []), dtype=np.float64)
        if losses.shape != self._losses.shape:
            raise ConfigurationError(f"the checkpoint scores {losses.shape[0]} samples, this data set has "
                                     f"{len(self._losses)}: it was saved with another data set")
        with self._lock:
            self._losses = losses
        self.refresh()
