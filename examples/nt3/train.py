"""Train NT3 continuously with Viper publishing it: the producer side of the demo.

    python -m examples.nt3.train fit --config examples/nt3/train.yaml

Everything, the ViperCallback included, is configured in the YAML file. The model's and the
data's `input_length` are linked, so it is set once under `data:`.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from .data import DriftingGeneStream
from .model import NT3

__all__ = ["NT3CLI", "main"]


class NT3CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.input_length", "model.input_length")


def main(args: list[str] | None = None) -> NT3CLI:
    # LightningCLI saves the parsed config as config.yaml in the run directory; the input file
    # is named train.yaml so the two never collide, and reruns may overwrite the saved copy.
    return NT3CLI(NT3, DriftingGeneStream, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
