"""Cumulative inference loss (CIL) of publish schedules during continual training on drifting data.

    python -m benchmarks.schedule_cil --json OUT.json --plot OUT.png

For each workload (the NT3-style classifier on the drifting gene-expression stream, a
PtychoNN-style regressor on a drifting diffraction stream, and the small synthetic ones of
`_cil_synthetic`: abrupt concept shifts, a plateau that drops late, steps far cheaper and far
dearer than a publish) the model trains once with a real
Lightning Trainer, keeping its weights after every step; every schedule is then replayed
against that run on a simulated clock (the schedule cannot change what training computes,
only when weights are copied out). The stall, writer time and publish-to-serving latency per
publish are measured on this machine with the real ModelPublisher/ModelSubscriber (loopback,
temporary file-system tier) for each workload's model.

A consumer answers requests at a steady rate while training runs. The data drifts with wall
time: a request at time t sees the data at drift position t / step time, so every millisecond
training loses (publish stalls, served-loss probes, the schedule's own CPU time) leaves the
model further behind the data for the rest of the run. The realised CIL sums the real loss of
the version that answered each request, on that request's own held-out samples at its drift
position. Overhead = stalls (as measured) + probes + the schedule's decision CPU time, all paid
on the training thread. The adaptive schedules also report the CIL they predicted (Algorithm
1). Settings are the module constants below, the same for every workload.

How the adaptive schedules are configured (what a user would set; nothing here is tuned per
workload). `fixed` and `greedy` are the paper's Algorithms 2 and 3: fit once after the warm-up,
Greedy's threshold from the warm-up. The `_refit` variants add what this project does beyond
the paper:
- refits every REFIT_EVERY steps and whenever the losses leave the curve (REFIT_ERROR), with a
  cheaper fit (only the family leading on the coarse grid is polished by curve_fit), since a
  refit runs on the training thread;
- a warm-up that also publishes when the loss has dropped significantly (`warmup_on_improvement`);
- the fallback interval doubles as a safety net on the gap between publishes (`max_interval`).
`greedy_refit` also follows the observed losses (`follow_losses`: the curve forecasts the CIL,
the losses decide) and so takes no served-loss probes: a probe is a forward pass on the
training thread, and the cap on the gap already bounds how stale a served version gets.
`fixed_refit` keeps the probes, since its interval choice rests on the learnt staleness.
All four learn the writer's commit time from the replay, as they learn the stall and the
consumer's load time (what the publisher's `last_commit` and the subscriber's stats report).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from tqdm import tqdm

from viper_lightning.predictor import LearningCurveFitter
from viper_lightning.schedules import EveryEpoch, EveryNSteps, Fixed, Greedy, PublishSchedule

from ._cil_replay import Replay, Requests, Scorer, realised, replay
from ._cil_workloads import WORKLOADS, MeasuredCosts, Trajectory, Workload, measure_costs, train

STEPS = 600
EVERY_N = (1, 2, 5, 10, 25, 50)
WARMUP_STEPS = 30  # the adaptive schedules publish every FALLBACK_INTERVAL steps until then
FALLBACK_INTERVAL = 10
PROBE_EVERY = 10  # served-loss probes on the current training batch (paid for as training time)
REFIT_EVERY = 200  # the error trigger refits when the losses leave the curve; this is the backstop
REFIT_ERROR = 0.25
FIT_WINDOW = 100
ADAPTIVE = ("fixed", "greedy", "fixed_refit", "greedy_refit")


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str
    make: Callable[[], PublishSchedule]


@dataclass
class Outcome:
    candidate: Candidate
    replay: Replay
    cil_real: float
    request_losses: np.ndarray

    def as_json(self) -> dict[str, Any]:
        return {"name": self.candidate.name, "kind": self.candidate.kind, "cil_real": self.cil_real,
                "cil_predicted": self.replay.predicted_cil, "publishes": self.replay.publishes,
                "overhead_s": self.replay.overhead_s}


def candidates(requests: Requests) -> list[Candidate]:
    common = dict(request_rate=requests.rate, total_requests=len(requests.times), warmup_steps=WARMUP_STEPS,
                  fallback_interval=FALLBACK_INTERVAL, probe_every=PROBE_EVERY)
    refit = dict(refit_every=REFIT_EVERY, refit_error=REFIT_ERROR, fit_window=FIT_WINDOW, warmup_on_improvement=True,
                 max_interval=FALLBACK_INTERVAL, predictor=LearningCurveFitter(polish=1))
    return [
        Candidate("every_epoch", "every_epoch", EveryEpoch),
        *(Candidate(f"every_{n}_steps", "every_n_steps", partial(EveryNSteps, n)) for n in EVERY_N),
        Candidate("fixed", "fixed", partial(Fixed, **common)),
        Candidate("greedy", "greedy", partial(Greedy, **common)),
        Candidate("fixed_refit", "fixed_refit", partial(Fixed, **common, **refit)),
        Candidate("greedy_refit", "greedy_refit", partial(Greedy, **{**common, "probe_every": 0}, **refit,
                                                          follow_losses=True)),
    ]


@dataclass
class WorkloadRun:
    workload: Workload
    trajectory: Trajectory
    costs: MeasuredCosts
    requests: Requests
    outcomes: list[Outcome]


def run_workload(workload: Workload, steps: int, bar: tqdm) -> WorkloadRun:
    bar.set_postfix_str(f"{workload.name}: training {steps} steps")
    trajectory = train(workload, steps)
    bar.set_postfix_str(f"{workload.name}: measuring publish costs")
    costs = measure_costs(trajectory)
    requests = Requests.uniform(workload, steps, trajectory.step_time_s)
    scorer = Scorer(workload, trajectory, requests)
    outcomes = []
    for candidate in candidates(requests):
        bar.set_postfix_str(f"{workload.name}: {candidate.name}")
        replayed = replay(candidate.make(), trajectory, costs, workload, scorer)
        cil, losses = realised(replayed.live, requests, scorer)
        outcomes.append(Outcome(candidate, replayed, cil, losses))
        bar.update()
    return WorkloadRun(workload, trajectory, costs, requests, outcomes)


# -- reporting -------------------------------------------------------------------------------------
def verdict(run: WorkloadRun) -> list[str]:
    """The acceptance checks of issue 12 for this workload, each with its numbers: against
    every_epoch (where some every_n_steps gets 15% below it), against the best every_n_steps
    chosen in hindsight (at most 5% above it, with fewer publishes), and the forecast."""
    kinds = {o.candidate.kind: o for o in run.outcomes if o.candidate.kind != "every_n_steps"}
    best_n = min((o for o in run.outcomes if o.candidate.kind == "every_n_steps"), key=lambda o: o.cil_real)
    best = min((kinds[k] for k in ADAPTIVE), key=lambda o: o.cil_real)
    epoch = kinds["every_epoch"].cil_real
    error = abs(best.replay.predicted_cil - best.cil_real) / best.cil_real
    reachable = best_n.cil_real <= 0.85 * epoch
    return [
        f"best adaptive: {best.candidate.name} (CIL {best.cil_real:.2f}, {best.replay.publishes} publishes)",
        _check(best.cil_real <= 0.85 * epoch or not reachable,
               f"{100 * (1 - best.cil_real / epoch):.1f}% below every_epoch ({epoch:.2f}); need >= 15%"
               + ("" if reachable else " (no every_n_steps reaches that here: not required)")),
        _check(best.cil_real <= 1.05 * best_n.cil_real, f"vs the best every_n_steps ({best_n.candidate.name}, "
               f"{best_n.cil_real:.2f}): {100 * (best.cil_real / best_n.cil_real - 1):+.1f}%; need <= +5%"),
        _check(best.replay.publishes < best_n.replay.publishes,
               f"{best.replay.publishes} publishes vs {best_n.candidate.name}'s {best_n.replay.publishes}; need fewer"),
        _check(error <= 0.2, f"predicted CIL {best.replay.predicted_cil:.2f} is {100 * error:.1f}% off the "
               "realised; need <= 20%"),
    ]


def _check(ok: bool, text: str) -> str:
    return f"[{'ok' if ok else 'FAIL'}] {text}"


def print_table(runs: list[WorkloadRun]) -> None:
    for run in runs:
        _print_header(run)
        epoch = next(o for o in run.outcomes if o.candidate.kind == "every_epoch").cil_real
        print(f"{'schedule':<16}{'publishes':>10}{'overhead ms':>13}{'(stall':>8}{'probe':>7}{'decide)':>9}"
              f"{'CIL real':>10}{'CIL pred':>10}{'pred err':>10}{'vs epoch':>10}")
        for o in run.outcomes:
            r, predicted = o.replay, o.replay.predicted_cil
            error = f"{100 * (predicted - o.cil_real) / o.cil_real:+.1f}%" if predicted is not None else "-"
            print(f"{o.candidate.name:<16}{r.publishes:>10}{r.overhead_s * 1e3:>13.1f}{r.stall_s * 1e3:>8.1f}"
                  f"{r.probe_s * 1e3:>7.1f}{r.decision_s * 1e3:>9.1f}{o.cil_real:>10.2f}"
                  f"{(f'{predicted:.2f}' if predicted is not None else '-'):>10}{error:>10}"
                  f"{100 * (o.cil_real / epoch - 1):>+9.1f}%")
        for line in verdict(run):
            print("  " + line)


def _print_header(run: WorkloadRun) -> None:
    c, t = run.costs, run.trajectory
    print(f"\n{run.workload.name}: {t.steps} steps of {t.step_time_s * 1e3:.2f} ms; per publish (median of "
          f"{c.samples}, real publisher/subscriber): stall {c.stall_s * 1e3:.3f} ms, writer {c.commit_s * 1e3:.2f} "
          f"ms, publish->serving {c.latency_s * 1e3:.2f} ms; probe {c.probe_s * 1e3:.2f} ms; "
          f"{len(run.requests.times)} requests at {run.requests.rate:.0f}/s")


def plot(runs: list[WorkloadRun], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(runs), 1, figsize=(12, 4.5 * len(runs)), squeeze=False)
    for run, ax in zip(runs, axes[:, 0]):
        window = max(1, int(run.workload.requests_per_step * 10))  # about 10 training steps of requests
        for o in run.outcomes:
            smoothed = np.convolve(o.request_losses, np.ones(window) / window, mode="valid")
            adaptive = o.candidate.kind in ADAPTIVE
            ax.plot(run.requests.times[window - 1:], smoothed, lw=1.6 if adaptive else 0.8,
                    ls="-" if adaptive else "--", label=f"{o.candidate.name} ({o.replay.publishes} pub.)")
        ax.set_title(f"{run.workload.name}: loss of the served model on each request "
                     f"(moving average over {window} requests)")
        ax.set_xlabel("time since training started (s)")
        ax.set_ylabel("request loss (log scale)")
        ax.set_yscale("log")
        ax.legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per workload")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--plot", help="write the figure here (PNG)")
    args = parser.parse_args(argv)
    runs = []
    per_workload = len(EVERY_N) + 1 + len(ADAPTIVE)
    with tqdm(total=per_workload * len(args.workloads), desc="schedule CIL", unit="schedule") as bar:
        for name in args.workloads:
            runs.append(run_workload(WORKLOADS[name], args.steps, bar))
    print_table(runs)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"workloads": [{"name": run.workload.name, "schedules": [o.as_json() for o in run.outcomes]}
                                     for run in runs]}, out, indent=2)
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
