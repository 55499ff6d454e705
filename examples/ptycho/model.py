"""A small PtychoNN-like network: diffraction pattern in, object amplitude and phase out."""

from __future__ import annotations

import lightning
import torch
from torch import Tensor, nn


class PtychoRegressor(lightning.LightningModule):
    """Conv encoder, dense bottleneck, dense decoder to a 2-channel (amplitude, phase) image.

    PtychoNN uses a conv encoder and two conv decoders; a dense decoder keeps this one fast on
    a CPU while keeping its character (most weights in the dense layers, MSE regression).
    """

    def __init__(self, size: int = 16, channels: int = 16, hidden: int = 256, lr: float = 1e-3) -> None:
        super().__init__()
        if size % 2 or size < 4:
            raise ValueError(f"size must be an even number >= 4, got {size}; e.g. use 16.")
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.decoder = nn.Sequential(
            nn.Linear(2 * channels * (size // 2) ** 2, hidden), nn.ReLU(), nn.Linear(hidden, 2 * size * size))

    def forward(self, x: Tensor) -> Tensor:
        size = self.hparams["size"]
        return self.decoder(self.encoder(x)).view(-1, 2, size, size)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
