"""A small text classifier over byte tokens (ids 1-256, 0 pads). It is an archive's model file,
so it imports nothing from the project."""

import torch


class ByteClassifier(torch.nn.Module):
    """Mean of the tokens' embeddings, then a linear head: int64 ids [batch, length] -> logits."""

    def __init__(self, dim: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(257, dim, padding_idx=0)
        self.head = torch.nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(ids) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return self.head(pooled)
