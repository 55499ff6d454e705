"""A small model served by TorchServe in tests. It is the archive's model file, so it imports
nothing from the project; it is a LightningModule so a real Trainer can train and publish it."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class Scorer(L.LightningModule):
    def __init__(self, features: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2048, self.net[0].in_features, generator=generator)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=16)


class TinySharded(torch.nn.Sequential):
    """benchmarks._sharded_rank.tiny_model's architecture, unsharded, for serving what its FSDP2
    ranks publish."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Linear(8, 30), torch.nn.BatchNorm1d(30), torch.nn.ReLU(), torch.nn.Linear(30, 5))
