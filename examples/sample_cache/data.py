"""A workload whose importance is skewed, stored as a SampleStore for ImportanceDataModule.

    python -m examples.sample_cache.data --root runs/samples --samples 4000
"""

from __future__ import annotations

import argparse

import torch

from viper_lightning.data import SampleStore

__all__ = ["CLASSES", "skewed_workload", "main"]

CLASSES = 4


def skewed_workload(samples: int, dim: int, hard_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points labelled by a linear teacher: `hard_fraction` of them within a small margin of its
    boundaries, the others far from them."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(CLASSES, dim, generator=torch.Generator().manual_seed(1234))
    xs, ys, hard_left, easy_left = [], [], int(samples * hard_fraction), samples - int(samples * hard_fraction)
    while hard_left or easy_left:
        x = torch.randn(4096, dim, generator=generator)
        scores = x @ teacher.T
        top2 = scores.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        for row, gap, label in zip(x, margin, scores.argmax(dim=1)):
            if gap < 0.3 and hard_left:
                hard_left -= 1
            elif gap > 1.0 and easy_left:
                easy_left -= 1
            else:
                continue
            xs.append(row)
            ys.append(label)
    order = torch.randperm(samples, generator=generator)
    return torch.stack(xs)[order], torch.stack(ys)[order]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="where the samples go (any fsspec URL)")
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hard-fraction", type=float, default=0.15)
    args = parser.parse_args(argv)
    x, y = skewed_workload(args.samples, args.dim, args.hard_fraction, seed=0)
    print(f"wrote {SampleStore.write(args.root, zip(x, y))} samples under {args.root}")


if __name__ == "__main__":
    main()
