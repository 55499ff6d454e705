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


def nudge(model: torch.nn.Module, seed: int, fraction: float = 1.0) -> None:
    """A stand-in for a training step that changes `fraction` of the weights' bytes: the first
    `fraction` of every floating-point parameter's elements (1.0: every weight, as training does;
    less: what a run with frozen parts or adapters changes, spread over every tensor)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point() and parameter.numel():
                flat = parameter.view(-1)
                flat[:max(1, math.ceil(fraction * flat.numel()))].add_(float(seed + 1))


WIDE_OUTPUTS = 1024


def wide_kwargs(megabytes: float) -> dict[str, int]:
    """Constructor arguments of benchmarks.serving_model.Wide for about `megabytes` MB."""
    return {"features": max(1, int(megabytes * 1e6 / 4 / WIDE_OUTPUTS)), "outputs": WIDE_OUTPUTS}
