"""Small synthetic workloads for the schedule harness, each a different kind of loss process.

Every workload is a stream of batches indexed by drift position (one position per training
step, carried on across epochs), seeded, and cheap enough to train 600 steps on two cores in
well under a minute. `sample_batch(n, position)` draws held-out samples at a position (what the
harness scores requests with), from a stream separate from training's.

- `shifts`: a linear classification rule that jumps to a new random rule three times (abrupt
  concept shifts: the loss jumps, then falls again);
- `plateau`: the label's signal is absent for the first 250 steps, then appears (the loss sits
  at chance, then drops late);
- `cheap`: a recommender-style model, a big embedding table updated sparsely, on drifting item
  preferences (a step touches a few rows; a publish copies the whole table);
- `expensive`: a wide model on big batches of the same drifting rule (a step costs far more).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

Draw = Callable[[int, int, torch.Generator], tuple[Tensor, Tensor]]  # (n, position, generator) -> (x, y)
_TRAIN, _HELD_OUT = 0, 1


class PositionStream(L.LightningDataModule):
    """Batches drawn at consecutive drift positions; the position keeps counting across epochs."""

    def __init__(self, draw: Draw, batch_size: int, steps_per_epoch: int, seed: int = 0) -> None:
        super().__init__()
        self.draw, self.batch_size, self.steps_per_epoch, self.seed = draw, batch_size, steps_per_epoch, seed
        self.position = 0

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Epoch(self), batch_size=None)

    def sample_batch(self, n: int, position: int) -> tuple[Tensor, Tensor]:
        return self.draw(n, position, self._generator(position, _HELD_OUT))

    def next_batch(self) -> tuple[Tensor, Tensor]:
        batch = self.draw(self.batch_size, self.position, self._generator(self.position, _TRAIN))
        self.position += 1
        return batch

    def _generator(self, position: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + position) * 2 + stream)


class _Epoch(IterableDataset):
    def __init__(self, stream: PositionStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for _ in range(self.stream.steps_per_epoch):
            yield self.stream.next_batch()


class SmallNet(L.LightningModule):
    """An MLP trained with Adam; the loss is `loss_fn` (per-sample losses, averaged)."""

    def __init__(self, inputs: int, width: int, outputs: int, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 lr: float = 1e-2, depth: int = 1) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for index in range(depth):
            layers += [torch.nn.Linear(inputs if index == 0 else width, width), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, outputs))
        self.loss_fn, self.lr = loss_fn, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self(x), y).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class SparseRecommender(L.LightningModule):
    """Scores items with a large embedding table (sparse gradients, plain SGD: a step updates
    only the rows of its batch), so a step is cheap and the weights are big."""

    def __init__(self, items: int = 50_000, dims: int = 16, lr: float = 2.0) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(items, dims, sparse=True)
        self.head = torch.nn.Linear(dims, 2)
        self.lr = lr

    def forward(self, items: Tensor) -> Tensor:
        return self.head(self.table(items))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        items, liked = batch
        return torch.nn.functional.cross_entropy(self(items), liked)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)  # SGD without momentum takes sparse gradients


def drifting_preferences(items: int = 50_000, popular: int = 200, period: int = 300) -> Draw:
    """Requests for the `popular` items of the moment (the popular set slides through the
    catalogue, one item every `period / popular` steps); an item is liked when its hash bit says
    so, and the bit flips every `period` steps."""

    def draw(n: int, position: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        start = position * popular // period
        chosen = (start + torch.randint(0, popular, (n,), generator=generator)) % items
        liked = ((chosen * 2654435761 % 97) % 2) ^ ((position // period) % 2)
        return chosen, liked.long()
    return draw


def _rule(dims: int, seed: int) -> Tensor:
    direction = torch.randn(dims, generator=torch.Generator().manual_seed(seed))
    return direction / direction.norm()


def shifting_rule(dims: int = 16, shifts: tuple[int, ...] = (150, 300, 450), label_noise: float = 0.05) -> Draw:
    """Labels sign(w_k · x), with a new random w_k after each step in `shifts`."""
    rules = [_rule(dims, 100 + k) for k in range(len(shifts) + 1)]

    def draw(n: int, position: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rule = rules[sum(position >= shift for shift in shifts)]
        x = torch.randn(n, dims, generator=generator)
        flip = torch.rand(n, generator=generator) < label_noise
        return x, ((x @ rule > 0) ^ flip).long()
    return draw


def late_signal(dims: int = 16, appears: int = 250) -> Draw:
    """Labels carried by x only from step `appears` on: chance level until then."""
    rule = _rule(dims, 200)

    def draw(n: int, position: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, 2, (n,), generator=generator)
        x = torch.randn(n, dims, generator=generator)
        if position >= appears:
            x = x + 1.5 * (2 * y - 1).float().unsqueeze(1) * rule
        return x, y
    return draw


def rotating_rule(dims: int = 16, radians_per_step: float = 0.004) -> Draw:
    """Labels sign(w(t) · x), w turning slowly in a fixed plane (gradual drift)."""
    first, second = _rule(dims, 300), _rule(dims, 301)
    second = second - (second @ first) * first
    second = second / second.norm()

    def draw(n: int, position: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        angle = torch.tensor(radians_per_step * position)
        rule = torch.cos(angle) * first + torch.sin(angle) * second
        x = torch.randn(n, dims, generator=generator)
        return x, (x @ rule > 0).long()
    return draw
