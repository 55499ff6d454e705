"""A consumer in its own process, as a TorchServe worker would be (spawned by tests)."""

from __future__ import annotations

import multiprocessing

import safetensors.torch

from viper_lightning import ModelSubscriber

WAIT_S = 60.0


def follow(model_factory, model_name: str, endpoint: str, pfs_root: str, out_path: str,
           inbox: multiprocessing.Queue, outbox: multiprocessing.Queue) -> None:
    """Serve updates until told the final version, then save the served weights to `out_path`."""
    with ModelSubscriber(model_factory(), model_name, endpoint, pfs_root) as subscriber:
        outbox.put("ready")
        final_version = inbox.get(timeout=WAIT_S * 5)
        reached = subscriber.wait_for_version(final_version, WAIT_S)
        with subscriber.lease() as lease:
            tensors = {name: tensor.detach().clone().contiguous()
                       for name, tensor in lease.model.state_dict().items()}
            safetensors.torch.save_file(tensors, out_path)
            outbox.put({"reached": reached, "version": lease.version, "applied": subscriber.stats.applied,
                        "refused": subscriber.stats.refused})
