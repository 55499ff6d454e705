"""SampleLossCallback: feeds each sample's training loss to the data module's ImportanceScores."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["SampleLossCallback"]

log = logging.getLogger("viper_lightning.data")


class SampleLossCallback(Callback):
    """Records the per-sample losses of every training batch into `trainer.datamodule.scores`
    (ImportanceDataModule's), gathered from every DDP rank first so that all rank alike, and logs
    the epoch's cache hit ratio as `data/hit_ratio`.

    The LightningModule's `training_step` returns the per-sample losses beside the loss, e.g.
    `{"loss": (losses * batch["weight"]).mean(), "sample_losses": losses.detach()}` with
    `losses = F.cross_entropy(logits, batch["y"], reduction="none")`.

    Args:
        loss_key: the key of the per-sample losses in training_step's output.
    """

    def __init__(self, loss_key: str = "sample_losses") -> None:
        self.loss_key = loss_key
        self.hits = self.draws = 0  # this epoch's, on this rank
        self.total_hits = self.total_draws = 0
        self._warned = False

    @property
    def hit_ratio(self) -> float:
        """Cache hits over draws, on this rank, since training started."""
        return self.total_hits / self.total_draws if self.total_draws else 0.0

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.hits = self.draws = 0

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        scores = getattr(trainer.datamodule, "scores", None)
        losses = outputs.get(self.loss_key) if isinstance(outputs, dict) else None
        usable = scores is not None and losses is not None and isinstance(batch, dict) and "index" in batch \
            and losses.numel() == batch["index"].numel()
        if usable:
            indices = batch["index"].detach().reshape(-1).to(torch.int64)
            losses = losses.detach().reshape(-1).to(torch.float64)
            hits = int(batch["hit"].sum()) if "hit" in batch else 0
            self.hits, self.draws = self.hits + hits, self.draws + len(indices)
            self.total_hits, self.total_draws = self.total_hits + hits, self.total_draws + len(indices)
        else:
            if not self._warned:
                self._warned = True
                log.warning("SampleLossCallback records nothing: it needs ImportanceDataModule's batches (with "
                            "'index') and training_step returning %r, one loss per sample", self.loss_key)
            indices, losses = torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.float64)
        if trainer.world_size > 1:  # every rank gathers, whatever it has: none may wait alone
            indices, losses = _gathered(pl_module, indices, losses, getattr(trainer.datamodule, "batch_size", 1))
        if scores is not None and len(indices):
            scores.record(indices.cpu().numpy(), losses.cpu().numpy())

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.draws:
            pl_module.log("data/hit_ratio", self.hits / self.draws, on_epoch=True, sync_dist=True)


def _gathered(pl_module: L.LightningModule, indices: torch.Tensor, losses: torch.Tensor,
              batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (index, loss) pairs; a short last batch is padded with index -1 (ignored)."""
    pad = batch_size - len(indices)
    if pad > 0:
        indices = torch.cat([indices, indices.new_full((pad,), -1)])
        losses = torch.cat([losses, losses.new_zeros(pad)])
    # plain collectives, not Lightning's all_gather (autograd-aware: these need no gradient)
    import torch.distributed as dist

    device = pl_module.device
    result = []
    for tensor in (indices.to(device), losses.to(device)):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        result.append(torch.cat(parts))
    return result[0], result[1]
