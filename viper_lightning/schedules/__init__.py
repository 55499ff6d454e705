"""When to publish: the baselines here, the learning-curve predictor schedules later."""

from ._base import PublishSchedule
from ._every_epoch import EveryEpoch
from ._every_n_steps import EveryNSteps

__all__ = ["PublishSchedule", "EveryNSteps", "EveryEpoch"]
