"""Models of a requested size for the benchmarks: the NT3 example at the paper's input length."""

from __future__ import annotations

import math

import torch

from examples.nt3.model import NT3, dense_units_for_megabytes

NT3_INPUT_LENGTH = 60483
NT3_CHANNELS = 128


def nt3_of_size(megabytes: float) -> torch.nn.Module:
    """An NT3 whose state_dict is about `megabytes` MB (600 MB is the paper's NT3)."""
    torch.manual_seed(0)
    units = dense_units_for_megabytes(megabytes, NT3_INPUT_LENGTH, NT3_CHANNELS)
    return NT3(input_length=NT3_INPUT_LENGTH, conv_channels=NT3_CHANNELS, dense_units=units)


def state_nbytes(model: torch.nn.Module) -> int:
    return sum(tensor.nbytes for tensor in model.state_dict().values())


LAYERS = 20  # of the layered model: each layer holds 5% of its bytes


def layered_of_size(megabytes: float, layers: int = LAYERS) -> torch.nn.Module:
    """A stack of `layers` equal square Linear layers of about `megabytes` MB in all: with the
    first ones frozen (see `freeze_all_but`), a backbone under a trained head."""
    torch.manual_seed(0)
    width = max(1, int(math.sqrt(megabytes * 1e6 / 4 / layers)))
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))


def freeze_all_but(model: torch.nn.Module, fraction: float) -> None:
    """Leave the last layers that hold `fraction` of a layered model's bytes trainable and
    freeze the others (requires_grad=False): what a run with a frozen backbone changes."""
    layers = list(model.children())
    trainable = max(1, round(fraction * len(layers)))
    for index, layer in enumerate(layers):
        layer.requires_grad_(index >= len(layers) - trainable)


def nudge(model: torch.nn.Module, seed: int) -> None:
    """A stand-in for a training step: change every element of every trainable parameter (a
    frozen one, requires_grad=False, keeps its bytes, as under an optimizer)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(float(seed + 1))


WIDE_OUTPUTS = 1024


def wide_kwargs(megabytes: float) -> dict[str, int]:
    """Constructor arguments of benchmarks.serving_model.Wide for about `megabytes` MB."""
    return {"features": max(1, int(megabytes * 1e6 / 4 / WIDE_OUTPUTS)), "outputs": WIDE_OUTPUTS}
