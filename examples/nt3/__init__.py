"""NT3-style tumour/normal classifier and a drifting synthetic gene-expression stream.

The pair reproduces the shape of CANDLE's NT3 benchmark (a 1-D CNN over a long
gene-expression vector with a very large first dense layer) without needing the
real data set, so checkpoint/serving behaviour can be exercised at realistic
model sizes while the data keeps changing, as in continual training.
"""

from .data import DriftingGeneStream
from .model import NT3

__all__ = ["NT3", "DriftingGeneStream"]
