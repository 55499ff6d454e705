"""Viper's Inference Performance Predictor: learning curves, the CIL model, publish plans.

- `LearningCurveFitter` fits the training loss with the paper's four families (Exp2, Exp3,
  Lin2, Expd3) and keeps the lowest MSE; any `LossPredictor` can replace it.
- `predict_cil` is Algorithm 1: the cumulative inference loss a consumer pays under a publish
  plan, given its request rate, the training stall per publish and the consumer's load time.
- `best_fixed_interval` (Algorithm 2) and `greedy_plan` (Algorithm 3) turn a curve into publish
  steps (`significant_drop_plan`: Algorithm 3 on the observed losses, as `Greedy(follow_losses=True)`
  decides); the schedules `viper_lightning.schedules.Fixed` and `Greedy` run them during training.
"""

from ._cil import CILPrediction, InferenceLoad, PublishCosts, predict_cil
from ._curves import CURVE_FAMILIES, FitError, LearningCurve, LearningCurveFitter, LossCurve, LossPredictor
from ._plans import (
    PLAN_WINDOW,
    LossLevels,
    PlanContext,
    best_fixed_interval,
    best_greedy_threshold,
    fixed_plan,
    fixed_prediction,
    greedy_gain,
    greedy_plan,
    greedy_prediction,
    greedy_threshold,
    significant_drop_plan,
)
from ._staleness import StalenessModel, fit_staleness

__all__ = [
    "CURVE_FAMILIES",
    "LossCurve",
    "LearningCurve",
    "LossPredictor",
    "LearningCurveFitter",
    "FitError",
    "InferenceLoad",
    "PublishCosts",
    "CILPrediction",
    "predict_cil",
    "StalenessModel",
    "fit_staleness",
    "PlanContext",
    "fixed_plan",
    "fixed_prediction",
    "greedy_prediction",
    "PLAN_WINDOW",
    "best_fixed_interval",
    "greedy_threshold",
    "greedy_gain",
    "greedy_plan",
    "best_greedy_threshold",
    "LossLevels",
    "significant_drop_plan",
]
