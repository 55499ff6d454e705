"""How much worse a served version gets as the data drifts away from what it was trained on.

The Viper paper scores a served version by its training loss alone, which is right for a fixed
data distribution. Under drift a version that is `age` steps old answers worse than its own
training loss said; this models the gap as offset + linear·age + quadratic·age² and learns it
from losses of the served version on fresh labelled data (a consumer that gets ground truth,
or a producer that scores the served weights on its current batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from .._errors import ConfigurationError

__all__ = ["StalenessModel", "fit_staleness"]


@dataclass(frozen=True)
class StalenessModel:
    """Served loss minus the version's training loss, as a function of the version's age in steps.

    offset: a constant gap (e.g. eval-mode loss below train-mode loss with dropout); it moves
        predicted CIL but not which version is better, so decisions use `increase` only.
    linear, quadratic: growth per step and per step² of age (never negative).
    """

    offset: float = 0.0
    linear: float = 0.0
    quadratic: float = 0.0

    def __post_init__(self) -> None:
        if not (self.linear >= 0 and self.quadratic >= 0):
            raise ConfigurationError(f"StalenessModel(linear={self.linear}, quadratic={self.quadratic}): "
                                     "a version cannot get better by ageing; use values >= 0")

    def increase(self, age: np.ndarray | float) -> np.ndarray:
        """Extra loss of a version `age` steps old, relative to a fresh one (>= 0)."""
        age = np.maximum(np.asarray(age, dtype=np.float64), 0.0)
        return self.linear * age + self.quadratic * age * age

    def __call__(self, age: np.ndarray | float) -> np.ndarray:
        return self.offset + self.increase(age)

    @property
    def drifting(self) -> bool:
        return self.linear > 0 or self.quadratic > 0


def fit_staleness(ages: Sequence[float] | np.ndarray, residuals: Sequence[float] | np.ndarray,
                  prior: StalenessModel = StalenessModel(), min_points: int = 4,
                  quadratic: bool = False) -> StalenessModel:
    """Least-squares fit of served-minus-training loss against age (slopes bounded at >= 0).

    Only the offset and the linear slope are fitted unless `quadratic`: measured ages are
    usually short (a few publish intervals), the CIL model then extrapolates to longer ones, and
    a curvature fitted on short noisy ages extrapolates wildly. With fewer than `min_points`
    finite observations the prior is returned unchanged; with a single distinct age only the
    offset is fitted. Terms not fitted come from the prior.
    """
    ages = np.asarray(ages, dtype=np.float64).reshape(-1)
    residuals = np.asarray(residuals, dtype=np.float64).reshape(-1)
    keep = np.isfinite(ages) & np.isfinite(residuals)
    ages, residuals = np.maximum(ages[keep], 0.0), residuals[keep]
    if len(ages) < min_points:
        return prior
    distinct = len(np.unique(np.round(ages, 6)))
    terms = ("linear", "quadratic")[: min(distinct - 1, 2 if quadratic else 1)]
    fixed = {term: getattr(prior, term) for term in ("linear", "quadratic") if term not in terms}
    target = residuals - fixed.get("linear", 0.0) * ages - fixed.get("quadratic", 0.0) * ages * ages
    fitted = _nonnegative_slopes(ages, target, terms)
    return StalenessModel(**fitted, **fixed)


def _nonnegative_slopes(ages: np.ndarray, target: np.ndarray, terms: tuple[str, ...]) -> dict[str, float]:
    """Least squares of target ≈ offset + Σ slope·term(age) with every slope >= 0: a closed-form
    solve per subset of terms (at most four), keeping the best feasible one."""
    basis = {"linear": ages, "quadratic": ages * ages}
    best: tuple[float, dict[str, float]] | None = None
    for size in range(len(terms), -1, -1):
        for subset in _subsets(terms, size):
            design = np.stack([np.ones_like(ages)] + [basis[t] for t in subset], axis=1)
            solution = np.linalg.lstsq(design, target, rcond=None)[0]
            if np.any(solution[1:] < 0):
                continue
            sse = float(np.sum((design @ solution - target) ** 2))
            if best is None or sse < best[0]:
                values = {"offset": float(solution[0]), "linear": 0.0, "quadratic": 0.0}
                values.update({t: float(v) for t, v in zip(subset, solution[1:])})
                best = (sse, {k: v for k, v in values.items() if k == "offset" or k in terms})
    return best[1]


def _subsets(terms: tuple[str, ...], size: int) -> list[tuple[str, ...]]:
    if size == 0:
        return [()]
    return [(terms[i], *rest) for i in range(len(terms)) for rest in _subsets(terms[i + 1:], size - 1)]
