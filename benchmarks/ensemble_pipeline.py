"""Input CPU per training step, and step throughput, for an ensemble's members reading K
independent DataLoaders against one shared pipeline.

    python -m benchmarks.ensemble_pipeline --members 1 2 4 --json OUT.json --plot OUT.png

Each member is a process running a real Lightning Trainer on `examples.ensemble.pipeline`'s
Member (a small CNN), one torch thread per process (so that the processes share the cores
rather than fight over them). The input is the example's: 3x64x64 images made and augmented on
the CPU (normalise, random crop and flip, bilinear resize to 32x32), `--batch-size` per batch.
  independent  each member iterates its own DataLoader (num_workers=0) over that pipeline;
  shared       one loader process (BatchLoader) makes each batch once, and every member reads it
               from shared memory (SharedBatchesDataModule).
input_cpu_s_per_step: the CPU seconds spent on input in all processes, over all members' steps:
each member's thread time inside the DataLoader's next, plus, in the shared mode, all the CPU of
the loader process (every thread of it, user and system) while it serves. The loader runs in a
process of its own, started afresh for each run as the members are, as `examples.ensemble.run`
runs it. steps_per_s: steps per second of wall time, per member (the mean).
Every process of both modes keeps its freed memory for its next batches, as BatchLoader does by
default (`keep_freed_memory`): glibc's own choice between giving it back and keeping it differs
from one process to the next and would move one process's input CPU by a quarter, so that the
ratio would measure the allocator's luck rather than the sharing.
Each case runs `--repeat` times (default 3), the cases interleaved, and reports its medians
(and every run's values): on a small shared machine one run's CPU times drift by a fifth.
Every member also checks the batches it saw: in the shared mode all members must have seen the
same ones (the run fails otherwise).
`--json OUT` writes `{"results": [{"mode", "members", "input_cpu_s_per_step", "steps_per_s"}]}`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from examples.ensemble.pipeline import Member
from examples.ensemble.run import EpochBatches
from viper_lightning.data import BatchLoader, SharedBatches, keep_freed_memory


class TimedInput(IterableDataset):
    """An iterable's batches, with this thread's CPU time spent producing them added up, and a
    digest of each batch (to compare what members saw)."""

    def __init__(self, source: Iterable) -> None:
        super().__init__()
        self.source, self.cpu_s, self.digests = source, 0.0, []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        iterator = iter(self.source)
        while True:
            started = time.thread_time()
            try:
                batch = next(iterator)
            except StopIteration:
                self.cpu_s += time.thread_time() - started
                return
            self.cpu_s += time.thread_time() - started
            self.digests.append(hashlib.blake2b(batch["x"].numpy().tobytes(), digest_size=8).hexdigest())
            yield batch


class _Independent:
    """One member's own pipeline: the example's batches, one epoch per iteration."""

    def __init__(self, samples: int, batch_size: int) -> None:
        self.epochs = EpochBatches(samples, batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.epochs)


class _Steps(Callback):
    def __init__(self) -> None:
        self.started = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.steps == 0:
            self.started = time.perf_counter()  # from the first step: process start-up is not input
        self.steps += 1


def member_main(mode: str, member: int, directory: str, samples: int, batch_size: int, epochs: int,
                out: str) -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    source = SharedBatches(directory, member) if mode == "shared" else _Independent(samples, batch_size)
    timed = TimedInput(source)
    steps = _Steps()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[steps])
    trainer.fit(Member(seed=member), DataLoader(timed, batch_size=None, num_workers=0))
    wall = time.perf_counter() - steps.started
    if isinstance(source, SharedBatches):
        source.close()
    Path(out).write_text(json.dumps({"input_cpu_s": timed.cpu_s, "steps": steps.steps,
                                     "steps_per_s": (steps.steps - 1) / wall if wall > 0 else 0.0,
                                     "digests": timed.digests}))


def loader_main(directory: str, members: int, samples: int, batch_size: int, epochs: int, out: str) -> None:
    """The shared mode's loader process: serves, then writes the CPU it spent serving."""
    torch.set_num_threads(1)
    epochs_of = EpochBatches(samples, batch_size)
    with BatchLoader(members, epochs_of.slot_bytes(), directory=directory) as loader:
        started = resource.getrusage(resource.RUSAGE_SELF)
        served = loader.serve(epochs_of, epochs)
        ended = resource.getrusage(resource.RUSAGE_SELF)
    Path(out).write_text(json.dumps({"loader_cpu_s": (ended.ru_utime + ended.ru_stime)
                                     - (started.ru_utime + started.ru_stime), "served": served}))


def measure(mode: str, members: int, samples: int, batch_size: int, epochs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="viper-bench-ensemble-") as root:
        outs = [str(Path(root) / f"member{k}.json") for k in range(members)]
        loader_out = str(Path(root) / "loader.json")
        directory = root  # unused by independent members
        if mode == "shared":  # BatchLoader's default place for its ring, /dev/shm; members wait for the loader there
            directory = tempfile.mkdtemp(prefix="viper-bench-ensemble-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
        sizes = [str(samples), str(batch_size), str(epochs)]
        command = [sys.executable, "-m", "benchmarks.ensemble_pipeline"]
        processes = [subprocess.Popen([*command, "--member", mode, str(k), directory, *sizes, outs[k]])
                     for k in range(members)]
        if mode == "shared":
            processes.append(subprocess.Popen([*command, "--loader", directory, str(members), *sizes, loader_out]))
        try:
            codes = [process.wait() for process in processes]
        finally:
            if directory != root:
                shutil.rmtree(directory, ignore_errors=True)
        if any(codes):
            raise RuntimeError(f"{mode} x{members}: processes exited with {codes}")
        reports = [json.loads(Path(out).read_text()) for out in outs]
        loader_cpu = json.loads(Path(loader_out).read_text())["loader_cpu_s"] if mode == "shared" else 0.0
    steps = sum(report["steps"] for report in reports)
    same = all(report["digests"] == reports[0]["digests"] for report in reports)
    if mode == "shared" and not same:
        raise RuntimeError("the members of the shared pipeline saw different batches")
    return {"mode": mode, "members": members,
            "input_cpu_s_per_step": (loader_cpu + sum(report["input_cpu_s"] for report in reports)) / steps,
            "steps_per_s": sum(report["steps_per_s"] for report in reports) / members,
            "loader_cpu_s": loader_cpu, "steps": steps, "same_batches": same}


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--member":  # a member process of this benchmark
        mode, member, directory, samples, batch_size, epochs, out = sys.argv[2:9]
        member_main(mode, int(member), directory, int(samples), int(batch_size), int(epochs), out)
        return
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--loader":  # the shared mode's loader process
        directory, members, samples, batch_size, epochs, out = sys.argv[2:8]
        loader_main(directory, int(members), int(samples), int(batch_size), int(epochs), out)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (medians are reported)")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(args.repeat):
        for members in args.members:
            for mode in ("independent", "shared"):
                runs.setdefault((mode, members), []).append(
                    measure(mode, members, args.samples, args.batch_size, args.epochs))
    results = []
    for (mode, members), measured in runs.items():
        results.append({"mode": mode, "members": members,
                        "input_cpu_s_per_step": statistics.median(r["input_cpu_s_per_step"] for r in measured),
                        "steps_per_s": statistics.median(r["steps_per_s"] for r in measured),
                        "same_batches": all(r["same_batches"] for r in measured), "runs": measured})
        r = results[-1]
        print(f"{mode:<12} x{members}  input CPU {r['input_cpu_s_per_step'] * 1e3:7.1f} ms/step  "
              f"{r['steps_per_s']:6.2f} steps/s per member  (medians of {len(measured)}: "
              + ", ".join(f"{m['input_cpu_s_per_step'] * 1e3:.1f}" for m in measured)
              + f" ms/step)  same batches: {r['same_batches']}", flush=True)
    print("\nratios measured in this run:")
    for members in args.members:
        independent, shared = (next(r for r in results if r["mode"] == m and r["members"] == members)
                               for m in ("independent", "shared"))
        print(f"  x{members}: input CPU per step, independent / shared "
              f"{independent['input_cpu_s_per_step'] / shared['input_cpu_s_per_step']:.2f}; steps/s shared / "
              f"independent {shared['steps_per_s'] / independent['steps_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": args.samples, "batch_size": args.batch_size,
                                               "epochs": args.epochs, "results": results}, indent=2))
    if args.plot:
        plot(results, args.plot)


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (cpu, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in ("independent", "shared"):
        points = sorted((r["members"], r["input_cpu_s_per_step"] * 1e3, r["steps_per_s"])
                        for r in results if r["mode"] == mode)
        cpu.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
        speed.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=mode)
    cpu.set(xlabel="members", ylabel="input CPU ms per step")
    speed.set(xlabel="members", ylabel="steps/s per member")
    for axes in (cpu, speed):
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
