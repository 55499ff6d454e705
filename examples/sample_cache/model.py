"""A classifier whose training_step reports each sample's loss, for SampleLossCallback."""

from __future__ import annotations

import lightning as L
import torch

from .data import CLASSES

__all__ = ["Classifier"]


class Classifier(L.LightningModule):
    """An MLP; each sample's loss is weighted by the sampler's importance weight (batch["weight"])
    and returned unweighted as `sample_losses`."""

    def __init__(self, dim: int = 32, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        losses = torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")
        return {"loss": (losses * batch["weight"]).mean(), "sample_losses": losses.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
