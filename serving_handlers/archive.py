"""Build a TorchServe archive served by ViperHandler, in one command.

    python -m serving_handlers.archive --name nt3 --model-file examples/nt3/model.py \\
        --model-class NT3 --model-kwargs '{"input_length": 2000}' --pfs-root runs/nt3/pfs \\
        --endpoint tcp://127.0.0.1:5555 --export-path model_store

Registering it is then one call to TorchServe's management API (or `torchserve --models`).
"""

from __future__ import annotations

import argparse
import json

from ._mar import build_archive

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="TorchServe model name (and Viper model name)")
    parser.add_argument("--model-file", required=True, help="Python file defining the model class")
    parser.add_argument("--model-class", required=True)
    parser.add_argument("--model-kwargs", default="{}", help="constructor arguments, as JSON")
    parser.add_argument("--weights", help="initial weights (.safetensors); default: a fresh model")
    parser.add_argument("--viper-model", help="Viper model name to follow (default: --name)")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    parser.add_argument("--pfs-root")
    parser.add_argument("--hmac-key-file")
    parser.add_argument("--routes", nargs="+", help="allowed routes: gpu-ipc dram-shm gpu-nccl dram-zmq collective pfs")
    parser.add_argument("--handler", help="a Python file defining one subclass of serving_handlers.ViperHandler "
                                           "(custom preprocess/postprocess); default: ViperHandler itself")
    parser.add_argument("--input-dtype", help="what the default preprocess reads JSON inputs as (default float32; "
                                              "int64 for token ids)")
    parser.add_argument("--export-path", default="model_store")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--no-archive", action="store_true", help="write a folder instead of a .mar")
    args = parser.parse_args(argv)
    viper = {"model_name": args.viper_model or args.name, "endpoint": args.endpoint, "pfs_root": args.pfs_root,
             "hmac_key_file": args.hmac_key_file, "routes": args.routes, "input_dtype": args.input_dtype}
    path = build_archive(args.name, args.model_file, args.model_class,
                         {key: value for key, value in viper.items() if value is not None},
                         export_path=args.export_path, model_kwargs=json.loads(args.model_kwargs),
                         initial_weights=args.weights, version=args.version,
                         archive_format="no-archive" if args.no_archive else "default", handler=args.handler)
    print(path)


if __name__ == "__main__":
    main()
