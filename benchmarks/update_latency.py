"""End-to-end update latency, per strategy and model size, measured side by side.

    python -m benchmarks.update_latency --sizes-mb 64 256 --repeat 3 --json OUT.json --plot OUT.png

A version is published in this process and applied by a consumer in another process (as a
TorchServe worker would be). e2e is the publish call to the consumer serving the new weights.
`memcpy` is one in-process copy of the same bytes into a reused buffer: the physical limit.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from tqdm import tqdm

from viper_lightning import ModelPublisher, ModelSubscriber
from viper_lightning._buffers import copy_tensor

from ._models import nt3_of_size, nudge, state_nbytes

WAIT_S = 300.0


def measure_memcpy(model: torch.nn.Module, repeat: int) -> dict[str, Any]:
    """One warm copy of all the weights into a preallocated buffer."""
    source = torch.cat([t.reshape(-1).view(torch.uint8) for t in model.state_dict().values()])
    target = torch.empty_like(source)
    copy_tensor(target, source)  # fault the pages in once: only warm copies count
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        copy_tensor(target, source)
        times.append(time.perf_counter() - started)
    e2e = statistics.median(times)
    return {"e2e_s": e2e, "stages": {"copy": e2e}, "training_stall_s": e2e}


def measure_pfs(model: torch.nn.Module, repeat: int, megabytes: float) -> dict[str, Any]:
    """File-system tier, push-notified: snapshot, digest, write+fsync, notice, read, verify, swap."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="viper-bench-") as root, \
         ModelPublisher("bench", "tcp://127.0.0.1:*", root) as publisher:
        runs = _run_consumer(context, publisher, model, repeat, megabytes, root)
    return _summarise(runs)


def _run_consumer(context, publisher: ModelPublisher, model: torch.nn.Module, repeat: int,
                  megabytes: float, root: str) -> list[dict[str, float]]:
    reports, done = context.Queue(), context.Event()
    process = context.Process(target=_follow, args=(megabytes, publisher.endpoint, root, reports, done))
    process.start()
    try:
        if not publisher.wait_for_subscribers(1, WAIT_S):
            raise RuntimeError("the consumer process never subscribed")
        return [_one_update(publisher, model, reports, seed) for seed in range(repeat + 1)][1:]
    finally:
        done.set()
        process.join(WAIT_S)


def _follow(megabytes: float, endpoint: str, pfs_root: str, reports, done) -> None:
    model = nt3_of_size(megabytes)
    with ModelSubscriber(model, "bench", endpoint, pfs_root, load_latest=False,
                         on_update=lambda record: reports.put(asdict(record)),
                         on_refusal=lambda refusal: reports.put({"refused": refusal.reason})):
        done.wait(WAIT_S * 10)


def _one_update(publisher: ModelPublisher, model: torch.nn.Module, reports, seed: int) -> dict[str, float]:
    """Publish once and wait for the consumer to serve it (the first, cold one is discarded)."""
    nudge(model, seed)
    version = publisher.publish(model)
    publisher.flush(WAIT_S)
    report = reports.get(timeout=WAIT_S)
    if "refused" in report or report["version"] != version:
        raise RuntimeError(f"consumer did not apply version {version}: {report}")
    commit = publisher.last_commit
    notify = report["discovery_s"] - commit.stall_s - commit.digest_s - commit.store_s
    return {"e2e_s": report["latency_s"], "snapshot": commit.stall_s, "digest": commit.digest_s,
            "store": commit.store_s, "notify": max(0.0, notify), "transfer": report["transfer_s"],
            "verify": report["verify_s"], "swap": report["swap_s"], "training_stall_s": commit.stall_s}


def _summarise(runs: list[dict[str, float]]) -> dict[str, Any]:
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    stages = {key: value for key, value in median.items() if key not in ("e2e_s", "training_stall_s")}
    return {"e2e_s": median["e2e_s"], "stages": stages, "training_stall_s": median["training_stall_s"]}


STRATEGIES: dict[str, Callable[..., dict[str, Any]]] = {
    "memcpy": lambda model, repeat, megabytes: measure_memcpy(model, repeat),
    "pfs": measure_pfs,
}


def run(sizes_mb: list[float], repeat: int, strategies: list[str]) -> list[dict[str, Any]]:
    results = []
    with tqdm(total=len(sizes_mb) * len(strategies), desc="update latency", unit="case") as bar:
        for megabytes in sizes_mb:
            model = nt3_of_size(megabytes)
            for strategy in strategies:
                bar.set_postfix_str(f"{strategy} @ {megabytes:g} MB")
                measured = STRATEGIES[strategy](model, repeat, megabytes)
                results.append({"strategy": strategy, "size_bytes": state_nbytes(model), "repeat": repeat,
                                **measured})
                bar.update()
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'strategy':<12}{'size MB':>9}{'e2e ms':>10}{'stall ms':>10}{'x memcpy':>10}{'pfs / this':>12}")
    for result in results:
        peers = {r["strategy"]: r for r in results if r["size_bytes"] == result["size_bytes"]}
        memcpy, pfs = peers.get("memcpy"), peers.get("pfs")
        stall = result["training_stall_s"]
        print(f"{result['strategy']:<12}{result['size_bytes'] / 1e6:>9.0f}{result['e2e_s'] * 1e3:>10.1f}"
              f"{(stall or 0) * 1e3:>10.1f}"
              f"{result['e2e_s'] / memcpy['e2e_s'] if memcpy else float('nan'):>10.1f}"
              f"{pfs['e2e_s'] / result['e2e_s'] if pfs else float('nan'):>12.2f}")
        stages = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in result["stages"].items())
        print(f"{'':<12}stages ms: {stages}")


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (anatomy, scaling) = plt.subplots(1, 2, figsize=(13, 5))
    largest = max(r["size_bytes"] for r in results)
    _plot_anatomy(anatomy, [r for r in results if r["size_bytes"] == largest], largest)
    _plot_scaling(scaling, results)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _plot_anatomy(axes, results: list[dict[str, Any]], size: int) -> None:
    names = [r["strategy"] for r in results]
    stage_names = list(dict.fromkeys(stage for r in results for stage in r["stages"]))
    bottoms = [0.0] * len(results)
    for stage in stage_names:
        heights = [r["stages"].get(stage, 0.0) * 1e3 for r in results]
        axes.bar(names, heights, bottom=bottoms, label=stage)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    axes.set_ylabel("ms")
    axes.set_title(f"Latency anatomy at {size / 1e6:.0f} MB")
    axes.legend(fontsize=8)


def _plot_scaling(axes, results: list[dict[str, Any]]) -> None:
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        points = sorted((r["size_bytes"] / 1e6, r["e2e_s"] * 1e3) for r in results if r["strategy"] == strategy)
        axes.plot(*zip(*points), marker="o", label=strategy)
    axes.set_xlabel("model size (MB)")
    axes.set_ylabel("end-to-end update latency (ms)")
    axes.set_title("Latency against model size")
    axes.legend(fontsize=8)


def host_info() -> dict[str, Any]:
    return {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": multiprocessing.cpu_count(), "node": platform.node()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[64, 256])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--plot", help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    results = run(args.sizes_mb, args.repeat, args.strategies)
    print_table(results)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"host": host_info(), "results": results}, out, indent=2)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
