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


def serve_and_record(model_factory, model_name: str, endpoint: str, pfs_root: str, routes: list[str] | None,
                     log_path: str, ready, final_version) -> None:
    """Answer "requests", each from one leased version, and append every new (version, digest of
    the weights it answered with) and every update applied (version, route) to `log_path` (JSON
    lines, flushed: a killed consumer leaves what it served), until `final_version` (a shared integer, 0 until the run ends) is set; then
    wait for that version and record it as final. Shared values, not Events: an Event's set()
    waits for every waiter to wake, and a killed consumer never does."""
    import json

    from viper_lightning import take_snapshot
    from viper_lightning._digest import digest_buffer

    def answered(lease) -> tuple[int, str]:
        return lease.version or 0, digest_buffer(take_snapshot(lease.model.state_dict()).data)

    import threading

    seen: set[tuple[int, str]] = set()
    lock = threading.Lock()  # the subscriber's thread writes too: whole lines only

    def write(line: dict) -> None:
        with lock:
            log.write(json.dumps(line) + "\n")

    with open(log_path, "a", buffering=1) as log, \
         ModelSubscriber(model_factory(), model_name, endpoint, pfs_root, routes=routes,
                         on_update=lambda record: write({"applied": record.version, "route": record.route})
                         ) as subscriber:
        ready.set()
        while not final_version.value:
            with subscriber.lease() as lease:
                answer = answered(lease)
            if answer[0] > 0 and answer not in seen:
                seen.add(answer)
                write({"version": answer[0], "digest": answer[1]})
            subscriber.wait_for_version(answer[0] + 1, 0.005)  # the next request comes soon, or a newer version
        reached = subscriber.wait_for_version(final_version.value, WAIT_S)
        with subscriber.lease() as lease:
            version, digest = answered(lease)
        write({"final": version, "digest": digest, "reached": reached, "refused": subscriber.stats.refused})
