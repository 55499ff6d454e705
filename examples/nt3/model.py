"""NT3-style 1-D CNN classifier, modelled on CANDLE's NT3 benchmark.

NT3 classifies tumour vs. normal tissue from a single RNA-seq expression vector
(60483 genes). Almost all of its weights sit in the first dense layer, whose
fan-in is the flattened convolution output, so the model size is controlled by
``input_length`` and ``dense_units``. That makes it a convenient stand-in for
"a big model whose checkpoints are expensive to move around": the helpers at
the bottom of this module compute the size analytically, so callers can pick a
target size without building the model first.
"""

from __future__ import annotations

import lightning
import torch
from torch import Tensor, nn

_CONV1_KERNEL = 20
_CONV2_KERNEL = 10
_POOL2 = 10
_HIDDEN2 = 20
_BYTES_PER_FLOAT32 = 4
_BYTES_PER_MB = 1_000_000
_MIN_INPUT_LENGTH = _CONV1_KERNEL + _CONV2_KERNEL - 2 + _POOL2


def _require_positive(name: str, value: float) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is strictly positive."""
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}; pass a positive value.")


def _flat_features(input_length: int, conv_channels: int) -> int:
    """Number of features entering the first dense layer (after both convs and pooling)."""
    if input_length < _MIN_INPUT_LENGTH:
        raise ValueError(
            f"input_length must be >= {_MIN_INPUT_LENGTH} so the conv/pool stack yields at "
            f"least one position, got {input_length}; use a longer input vector."
        )
    conv_out = input_length - (_CONV1_KERNEL - 1) - (_CONV2_KERNEL - 1)
    return conv_channels * (conv_out // _POOL2)


def _fixed_parameter_count(conv_channels: int, num_classes: int) -> int:
    """Parameters that do not depend on ``dense_units`` other than via its fan-out.

    Covers both conv layers (weights and biases), the bias of the second hidden
    layer and the whole output layer.
    """
    conv1 = conv_channels * _CONV1_KERNEL + conv_channels
    conv2 = conv_channels * conv_channels * _CONV2_KERNEL + conv_channels
    return conv1 + conv2 + _HIDDEN2 + _HIDDEN2 * num_classes + num_classes


def _parameters_per_dense_unit(input_length: int, conv_channels: int) -> int:
    """Parameters added by one extra unit in the first dense layer (fan-in, bias, fan-out)."""
    return _flat_features(input_length, conv_channels) + 1 + _HIDDEN2


def nt3_parameter_bytes(
    input_length: int, conv_channels: int, dense_units: int, num_classes: int = 2
) -> int:
    """Float32 size in bytes of an NT3 ``state_dict`` with these dimensions.

    Computed analytically (no allocation), so it is cheap even for the ~600 MB
    full-size model; it equals the sum of ``nbytes`` over the real state_dict.
    """
    for name, value in (
        ("input_length", input_length),
        ("conv_channels", conv_channels),
        ("dense_units", dense_units),
        ("num_classes", num_classes),
    ):
        _require_positive(name, value)
    per_unit = _parameters_per_dense_unit(input_length, conv_channels)
    count = _fixed_parameter_count(conv_channels, num_classes) + dense_units * per_unit
    return count * _BYTES_PER_FLOAT32


def dense_units_for_megabytes(
    megabytes: float, input_length: int = 60483, conv_channels: int = 128
) -> int:
    """Pick ``dense_units`` so the float32 NT3 model is about ``megabytes`` MB (1 MB = 10**6 bytes).

    The first dense layer dominates the size, so the model grows linearly in
    ``dense_units``. With the real NT3 input (``input_length=60483``,
    ``conv_channels=128``) and the benchmark's ``dense_units=200`` the model is
    about 619 MB (~590 MiB), i.e. the "~600 MB" NT3 model; each dense unit adds
    roughly 3.1 MB at that input length. Returns at least 1.
    """
    _require_positive("megabytes", megabytes)
    target_params = megabytes * _BYTES_PER_MB / _BYTES_PER_FLOAT32
    fixed = _fixed_parameter_count(conv_channels, num_classes=2)
    per_unit = _parameters_per_dense_unit(input_length, conv_channels)
    return max(1, round((target_params - fixed) / per_unit))


class NT3(lightning.LightningModule):
    """NT3 tumour/normal classifier over a 1-channel gene-expression vector.

    The layer stack mirrors CANDLE NT3 (conv 20 -> pool 1 -> conv 10 -> pool 10
    -> dense -> dense 20 -> classes). The arguments are flat and typed so that
    LightningCLI can expose every one of them as a command-line flag.
    """

    def __init__(
        self,
        input_length: int = 6000,
        conv_channels: int = 128,
        dense_units: int = 200,
        num_classes: int = 2,
        dropout: float = 0.1,
        lr: float = 1e-3,
    ) -> None:
        """Build the network; sizes are validated up front so errors name the bad argument."""
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}; e.g. use 0.1.")
        _require_positive("lr", lr)
        flat = _flat_features(input_length, conv_channels)
        _require_positive("dense_units", dense_units)
        _require_positive("num_classes", num_classes)
        self.save_hyperparameters()
        self.features = self._feature_stack(conv_channels)
        self.classifier = self._classifier_stack(flat, dense_units, num_classes, dropout)

    @staticmethod
    def _feature_stack(conv_channels: int) -> nn.Sequential:
        """Convolutional feature extractor; MaxPool1d(1) is kept to match NT3 layer-for-layer."""
        return nn.Sequential(
            nn.Conv1d(1, conv_channels, kernel_size=_CONV1_KERNEL),
            nn.ReLU(),
            nn.MaxPool1d(1),
            nn.Conv1d(conv_channels, conv_channels, kernel_size=_CONV2_KERNEL),
            nn.ReLU(),
            nn.MaxPool1d(_POOL2),
            nn.Flatten(),
        )

    @staticmethod
    def _classifier_stack(
        flat: int, dense_units: int, num_classes: int, dropout: float
    ) -> nn.Sequential:
        """Dense head; the first Linear holds nearly all of the model's parameters."""
        return nn.Sequential(
            nn.Linear(flat, dense_units),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(dense_units, _HIDDEN2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(_HIDDEN2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map a ``(batch, input_length)`` float tensor to ``(batch, num_classes)`` logits."""
        expected = self.hparams["input_length"]
        if x.dim() != 2 or x.shape[1] != expected:
            raise ValueError(
                f"x must have shape (batch, {expected}), got {tuple(x.shape)}; "
                "pass one expression vector per row."
            )
        return self.classifier(self.features(x.unsqueeze(1)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logged to the progress bar to watch drift tracking."""
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain Adam, as in the NT3 benchmark's default setup."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
