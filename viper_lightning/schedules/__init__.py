"""When to publish: the baselines, and the learning-curve predictor schedules (`Fixed`, `Greedy`)."""

from ._base import PublishSchedule
from ._every_epoch import EveryEpoch
from ._every_n_steps import EveryNSteps
from ._fixed import Fixed
from ._greedy import Greedy

__all__ = ["PublishSchedule", "EveryNSteps", "EveryEpoch", "Fixed", "Greedy"]
