"""Learning-curve fitting: the training loss as a function of the optimizer step.

Four families from the Viper paper are fitted and the one with the lowest mean squared error
wins. For a fixed decay rate every family is linear in its other parameters, so a grid of rates
solved in closed form gives each family a near-optimal, in-bounds start; `scipy.optimize.
curve_fit` (Levenberg-Marquardt, analytic Jacobians) then polishes it. That keeps a fit cheap,
which matters because a refit runs on the training thread. The step axis is
shifted and scaled to [0, 1] over the fitted window, so the rates stay well conditioned
whatever the step numbers are (steps 10_000..10_200 behave like 0..200).
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from .._errors import ConfigurationError, ViperError

__all__ = ["CURVE_FAMILIES", "FitError", "LossCurve", "LearningCurve", "LossPredictor", "LearningCurveFitter",
           "finite_points"]

log = logging.getLogger("viper_lightning.predictor")

_MAX_DECAY = 200.0  # in units of the fitted window: e^-200 is zero in float64 anyway
_DECAY_GRID = tuple(np.geomspace(0.1, _MAX_DECAY, 12))  # starting decay rates tried (window units)


class FitError(ViperError):
    """No curve could be fitted; the message says why (callers fall back to a default schedule)."""


def _exp2(x: np.ndarray, a: float, b: float) -> np.ndarray:
    return a * np.exp(-b * x)


def _exp3(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.exp(-b * x) + c


def _lin2(x: np.ndarray, a: float, b: float) -> np.ndarray:
    return a * x + b


def _expd3(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return c - (c - a) * np.exp(-b * x)


# Analytic Jacobians: curve_fit otherwise spends most of its time on finite differences.
def _exp2_jac(x: np.ndarray, a: float, b: float) -> np.ndarray:
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e], axis=1)


def _exp3_jac(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], axis=1)


def _lin2_jac(x: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.stack([x, np.ones_like(x)], axis=1)


def _expd3_jac(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    e = np.exp(-b * x)
    return np.stack([e, (c - a) * x * e, 1.0 - e], axis=1)


@dataclass(frozen=True)
class _Family:
    function: Callable[..., np.ndarray]
    jacobian: Callable[..., np.ndarray]
    decay_index: int | None  # which parameter is the decay rate b (bounded to [0, _MAX_DECAY])


CURVE_FAMILIES: dict[str, _Family] = {
    "exp2": _Family(_exp2, _exp2_jac, 1),    # a·e^(−bx)
    "exp3": _Family(_exp3, _exp3_jac, 1),    # a·e^(−bx) + c
    "lin2": _Family(_lin2, _lin2_jac, None),  # a·x + b
    "expd3": _Family(_expd3, _expd3_jac, 1),  # c − (c − a)·e^(−bx)
}


class LossCurve(ABC):
    """A predicted training loss for any optimizer step (what a `LossPredictor` returns)."""

    @abstractmethod
    def __call__(self, steps: np.ndarray | Sequence[float] | float) -> np.ndarray:
        """The predicted loss at each of `steps` (an array of the same shape, all finite)."""

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class LearningCurve(LossCurve):
    """One fitted family: `family(params)` evaluated at (step − origin) / scale.

    Predictions are clipped to [floor, ceiling] so an extrapolated line cannot promise a
    negative loss or run away to infinity.
    """

    family: str
    params: tuple[float, ...]
    origin: float
    scale: float
    mse: float
    points: int
    floor: float
    ceiling: float

    def __call__(self, steps: np.ndarray | Sequence[float] | float) -> np.ndarray:
        x = (np.asarray(steps, dtype=np.float64) - self.origin) / self.scale
        with np.errstate(over="ignore", invalid="ignore"):
            values = CURVE_FAMILIES[self.family].function(x, *self.params)
        if not np.all(np.isfinite(values)):
            values = np.nan_to_num(values, nan=self.ceiling, posinf=self.ceiling, neginf=self.floor)
        return np.clip(values, self.floor, self.ceiling)

    def describe(self) -> str:
        shown = ", ".join(f"{p:.4g}" for p in self.params)
        return f"{self.family}({shown}) over {self.points} points, mse {self.mse:.3g}"


class LossPredictor(ABC):
    """Fits a `LossCurve` to observed (step, loss) pairs. Plug your own into `Fixed`/`Greedy`
    (in YAML: `predictor: {class_path: your.module.YourPredictor, init_args: {...}}`).

    The schedules pass finite values only (NaN and inf are dropped first). `fit` raises
    `FitError` with the reason when it cannot produce a curve; the schedule then logs it and
    keeps to its fallback schedule.
    """

    @abstractmethod
    def fit(self, steps: np.ndarray, losses: np.ndarray) -> LossCurve:
        """A curve through these points, or `FitError`."""


class LearningCurveFitter(LossPredictor):
    """The Viper paper's predictor: fit each family, keep the lowest mean squared error.

    Args:
        families: which of "exp2", "exp3", "lin2", "expd3" to try.
        min_points: fewer finite losses than this raise `FitError` (a 3-parameter curve
            through a handful of noisy points is a guess, not a prediction).
        max_evaluations: `curve_fit`'s `maxfev` for the polish (the grid start stands if it
            runs out, or if its answer leaves the parameter bounds).
        max_points: longer series are averaged into this many bins first (faster, and the
            averaging calms a noisy loss; the MSE is then measured on the bins).
        polish: how many families, those whose coarse grid fits are best, get a finer grid and
            the `curve_fit` polish (the others keep their coarse fit). The polish is most of a
            fit's time; fewer is faster, but a family behind on the coarse grid can overtake
            the leaders once polished, so the default polishes every family.
    """

    def __init__(self, families: Sequence[str] = ("exp2", "exp3", "lin2", "expd3"), min_points: int = 8,
                 max_evaluations: int = 50, max_points: int = 64, polish: int = 4) -> None:
        unknown = [name for name in families if name not in CURVE_FAMILIES]
        if unknown or not families:
            raise ConfigurationError(f"families={list(families)!r}: choose one or more of {list(CURVE_FAMILIES)}")
        if not isinstance(min_points, int) or min_points < 3:
            raise ConfigurationError(f"min_points={min_points!r}: use an integer >= 3 (three-parameter families)")
        if not isinstance(max_evaluations, int) or max_evaluations < 10:
            raise ConfigurationError(f"max_evaluations={max_evaluations!r}: use an integer >= 10")
        if not isinstance(max_points, int) or max_points < min_points:
            raise ConfigurationError(f"max_points={max_points!r}: use an integer >= min_points ({min_points})")
        if not isinstance(polish, int) or polish < 0:
            raise ConfigurationError(f"polish={polish!r}: use an integer >= 0")
        self.families = tuple(families)
        self.polish = polish
        self.min_points = min_points
        self.max_evaluations = max_evaluations
        self.max_points = max_points

    def fit(self, steps: np.ndarray, losses: np.ndarray) -> LearningCurve:
        steps, losses = finite_points(steps, losses)
        if len(steps) < self.min_points:
            raise FitError(f"only {len(steps)} finite losses, need at least {self.min_points}")
        origin = float(steps.min())
        scale = max(float(steps.max()) - origin, 1.0)
        x, y = _binned((steps - origin) / scale, losses, self.max_points)
        floor, ceiling = _bounds_of(losses)
        starts, failures = [], []
        for name in self.families:
            try:
                starts.append(self._grid_fit(name, x, y, floor))
            except FitError as exc:
                failures.append(f"{name}: {exc}")
        if not starts:
            raise FitError("no family could be fitted (" + "; ".join(failures) + ")")
        starts.sort(key=lambda start: start[1])
        results = [self._polished(x, y, *start) if rank < self.polish else start
                   for rank, start in enumerate(starts)]  # the leaders get a finer grid, then curve_fit
        name, mse, params, _ = min(results, key=lambda result: result[1])
        return LearningCurve(name, tuple(float(p) for p in params), origin, scale, mse, len(steps), floor, ceiling)

    def _grid_fit(self, name: str, x: np.ndarray, y: np.ndarray, floor: float) -> _Fitted:
        """The best point of a coarse grid (fast, and away from bad local optima), and its MSE."""
        lower, upper = _parameter_bounds(name, y, floor)
        start = np.clip(_grid_start(name, x, y, lower, upper), lower, upper)
        return name, _mse(CURVE_FAMILIES[name], x, y, start), start, (lower, upper)

    def _polished(self, x: np.ndarray, y: np.ndarray, name: str, mse: float, start: np.ndarray,
                  bounds: tuple[np.ndarray, np.ndarray]) -> _Fitted:
        family = CURVE_FAMILIES[name]
        if family.decay_index is not None:
            start = np.clip(_refined(name, x, y, start, *bounds), *bounds)
        params = self._polish(name, family, x, y, start, bounds)
        return name, _mse(family, x, y, params), params, bounds

    def _polish(self, name: str, family: _Family, x: np.ndarray, y: np.ndarray, start: np.ndarray,
                bounds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Levenberg-Marquardt from the grid point. Its answer is kept only if it stays within the
        bounds and improves the fit; otherwise the grid point stands (it is the bounded optimum up
        to the grid's resolution), which avoids the much slower bounded solver."""
        try:
            with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore"):
                warnings.simplefilter("ignore", OptimizeWarning)  # covariance unknown: only the fit is used
                params, _ = curve_fit(family.function, x, y, p0=start, jac=family.jacobian, method="lm",
                                      maxfev=self.max_evaluations)
        except (RuntimeError, ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
            log.debug("%s: curve_fit stopped (%s); keeping the grid fit", name, str(exc).splitlines()[0])
            return start
        inside = np.all(np.isfinite(params)) and np.all(params >= bounds[0]) and np.all(params <= bounds[1])
        with np.errstate(over="ignore", invalid="ignore"):
            better = np.sum((family.function(x, *params) - y) ** 2) <= np.sum((family.function(x, *start) - y) ** 2)
        return params if inside and better else start

    def __repr__(self) -> str:
        return f"LearningCurveFitter(families={list(self.families)}, min_points={self.min_points})"


_Fitted = tuple  # (family name, MSE, parameters, bounds)


def _mse(family: _Family, x: np.ndarray, y: np.ndarray, params: np.ndarray) -> float:
    """Mean squared error of `params` (FitError when not finite)."""
    with np.errstate(over="ignore", invalid="ignore"):
        mse = float(np.mean((family.function(x, *params) - y) ** 2))
    if not math.isfinite(mse):
        raise FitError("no finite solution")
    return mse


def finite_points(steps: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The (step, loss) pairs where both are finite, as float64 arrays."""
    steps = np.asarray(steps, dtype=np.float64).reshape(-1)
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    if steps.shape != losses.shape:
        raise ConfigurationError(f"{len(steps)} steps but {len(losses)} losses: give one loss per step")
    keep = np.isfinite(steps) & np.isfinite(losses)
    return steps[keep], losses[keep]


def _bounds_of(losses: np.ndarray) -> tuple[float, float]:
    """Clip range for predictions: never below 0 for a non-negative loss, never far above what was seen."""
    low, high = float(losses.min()), float(losses.max())
    spread = max(high - low, abs(high) * 0.1, 1e-12)
    floor = 0.0 if low >= 0 else low - spread
    return floor, high + spread


def _binned(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Average consecutive points into at most `bins` bins (x sorted first)."""
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if len(x) <= bins:
        return x, y
    size, extra = divmod(len(x), bins)  # as np.array_split: the first `extra` bins hold one more
    counts = np.full(bins, size) + (np.arange(bins) < extra)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.add.reduceat(x, starts) / counts, np.add.reduceat(y, starts) / counts


def _parameter_bounds(name: str, y: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Box constraints: decay rates in [0, _MAX_DECAY]; levels within a generous multiple of the
    data (an unbounded a·e^(−bx) imitates a line with a → ∞, b → 0 and never converges); and for
    a loss that is never negative, an asymptote that is not negative either."""
    level = 10.0 * (float(np.max(np.abs(y))) + float(np.ptp(y)) + 1e-12)
    if name == "lin2":
        return np.array([-np.inf, -np.inf]), np.array([np.inf, np.inf])
    lower = np.array([-level, 0.0] + ([-level] if name != "exp2" else []))
    upper = np.array([level, _MAX_DECAY] + ([level] if name != "exp2" else []))
    if floor == 0.0 and name != "exp2":
        lower[2] = 0.0  # the asymptote c
    if floor == 0.0 and name in ("exp2", "expd3"):
        lower[0] = 0.0  # the starting level a
    return lower, upper


def _grid_start(name: str, x: np.ndarray, y: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Best parameters over a grid of decay rates: for a fixed rate every family is linear in
    its other parameters, so the whole grid is a handful of closed-form least-squares solves."""
    if name == "lin2":
        return np.array(np.polyfit(x, y, 1), dtype=np.float64)
    return _best_on_grid(name, x, y, np.asarray(_DECAY_GRID), lower, upper)


def _refined(name: str, x: np.ndarray, y: np.ndarray, coarse: np.ndarray, lower: np.ndarray,
             upper: np.ndarray) -> np.ndarray:
    """A finer grid between the coarse winner's neighbouring rates."""
    index = int(np.argmin(np.abs(np.asarray(_DECAY_GRID) - coarse[1])))
    low, high = _DECAY_GRID[max(index - 1, 0)], _DECAY_GRID[min(index + 1, len(_DECAY_GRID) - 1)]
    return _best_on_grid(name, x, y, np.geomspace(low, high, 12), lower, upper)


def _best_on_grid(name: str, x: np.ndarray, y: np.ndarray, rates: np.ndarray, lower: np.ndarray,
                  upper: np.ndarray) -> np.ndarray:
    e = np.exp(-np.outer(rates, x))  # one row per rate
    e_sum, e_sq, e_y = e.sum(axis=1), (e * e).sum(axis=1), e @ y
    if name == "exp2":
        amplitude, c = e_y / np.maximum(e_sq, 1e-300), np.zeros_like(rates)
    else:
        amplitude, c = _amplitude_and_level(e_sum, e_sq, e_y, len(x), float(y.sum()))
        c = np.clip(c, lower[2], upper[2])  # where the level hit its bound, refit the amplitude alone
        amplitude = np.where(c == lower[2], (e_y - c * e_sum) / np.maximum(e_sq, 1e-300), amplitude)
    sse = ((amplitude[:, None] * e + c[:, None] - y) ** 2).sum(axis=1)
    best = int(np.nanargmin(np.where(np.isfinite(sse), sse, np.nan))) if np.any(np.isfinite(sse)) else 0
    if name == "exp2":
        return np.array([amplitude[best], rates[best]])
    a = amplitude[best] if name == "exp3" else amplitude[best] + c[best]  # expd3: c + (a − c)·e^(−bx)
    return np.array([a, rates[best], c[best]])


def _amplitude_and_level(e_sum: np.ndarray, e_sq: np.ndarray, e_y: np.ndarray, n: int, y_sum: float
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of y ≈ A·e + c for every rate at once (2×2 normal equations)."""
    det = e_sq * n - e_sum * e_sum
    safe = np.where(np.abs(det) > 1e-12, det, np.nan)
    return (e_y * n - e_sum * y_sum) / safe, (e_sq * y_sum - e_sum * e_y) / safe
