"""PtychoNN-style regression on a drifting synthetic diffraction stream.

PtychoNN learns to turn far-field diffraction patterns into the object's amplitude and phase,
trained while the experiment runs. Here the object patches are random Gaussian blobs and the
illuminating probe slowly wanders (as a beam does), so the mapping the network learns keeps
moving: a served copy that is not refreshed gets steadily worse. Small enough to train on a CPU.
"""

from .data import DriftingDiffractionStream
from .model import PtychoRegressor

__all__ = ["DriftingDiffractionStream", "PtychoRegressor"]
