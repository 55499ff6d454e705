"""The ensemble's data and members: images made and augmented on the CPU (the input work the
shared pipeline does once for every member), and a small CNN per member.

    python -m examples.ensemble.run --members 4        (the loader and the members, one command)
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
import torch.nn.functional as F

__all__ = ["IMAGE", "CROP", "OUT", "batches", "preprocess", "Member"]

IMAGE, CROP, OUT, CLASSES = 64, 56, 32, 10


def _raw(index: int) -> tuple[torch.Tensor, int]:
    """Sample `index` as stored: a 3x64x64 uint8 image and its label (deterministic)."""
    generator = torch.Generator().manual_seed(index)
    label = index % CLASSES
    base = torch.randint(0, 128, (3, IMAGE, IMAGE), generator=generator, dtype=torch.uint8)
    base[label % 3, label * 5:label * 5 + 8, :] += 100  # a class-dependent stripe to learn
    return base, label


def preprocess(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What each member's own DataLoader would repeat: to float, normalise, random crop and
    flip, resize (bilinear) to 32x32."""
    x = images.float().div_(255.0)
    x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 1e-6)
    top, left = (int(v) for v in torch.randint(0, IMAGE - CROP + 1, (2,), generator=generator))
    x = x[:, :, top:top + CROP, left:left + CROP]
    if torch.rand((), generator=generator) < 0.5:
        x = x.flip(3)
    return F.interpolate(x, size=(OUT, OUT), mode="bilinear", align_corners=False).contiguous()


def batches(samples: int, batch_size: int, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of preprocessed batches `{"x", "y"}`, in a fixed shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(samples, generator=generator)
    for start in range(0, samples - batch_size + 1, batch_size):
        raw = [_raw(int(index)) for index in order[start:start + batch_size]]
        images = torch.stack([image for image, _ in raw])
        yield {"x": preprocess(images, generator), "y": torch.tensor([label for _, label in raw])}


class Member(L.LightningModule):
    """One member of the ensemble: a small CNN (members differ by their seed)."""

    def __init__(self, seed: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(4),
            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, CLASSES))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["y"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)
