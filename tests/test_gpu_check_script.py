"""scripts/gpu_check.sh, the one prepared run of every CUDA path, in its dry mode: everything
parses and runs up to the point where CUDA is needed, so the script cannot rot between the rare
runs on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without CUDA; "
                                                      "with a GPU, run scripts/gpu_check.sh itself")
def test_dry_run_reaches_every_cuda_step_and_writes_the_summary(tmp_path) -> None:
    out = tmp_path / "gpu-check"
    done = run_script("--dry-run", "--python", sys.executable, str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = (out / "summary.txt").read_text()
    assert "mode: dry-run" in summary and done.stdout.endswith(summary)
    # the CUDA tests are collected and skip with their reasons, NCCL's naming the second GPU
    assert "tests: 0 passed, 0 failed, 3 skipped" in summary
    assert "NCCL point-to-point between two processes needs two GPUs" in summary
    # the training check ran the GPU tier's host stand-in, bit for bit
    training = json.loads((out / "training_check.json").read_text())
    assert training["passed"] and training["bit_exact"] and "collective" in training["routes_taken"]
    # the benchmark accepted the GPU strategies and says why it did not run them
    bench = json.loads((out / "update_latency.json").read_text())
    assert {r["strategy"] for r in bench["results"]} == {"memcpy", "dram-shm", "pfs"}
    assert set(bench["skipped"]) == {"memcpy-gpu", "gpu-ipc"}
    assert "not run: gpu-ipc: needs 1 CUDA device(s)" in summary
    steps = [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()]
    assert steps == [["tests", "ok"], ["training", "ok"], ["bench", "ok"]]
    assert (out / "update_latency.png").stat().st_size > 0


def test_the_test_environment_lacks_nothing_the_gpu_check_would_install() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "missing"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_usage_errors_are_refused_before_anything_runs(tmp_path) -> None:
    assert run_script(timeout=30).returncode == 2  # no output folder
    unknown = run_script("--fast", str(tmp_path), timeout=30)
    assert unknown.returncode == 2 and "unknown option --fast" in unknown.stderr
    missing_python = run_script("--python", "no-such-python", str(tmp_path / "out"), timeout=30)
    assert missing_python.returncode == 2 and "no interpreter no-such-python" in missing_python.stderr
    assert not (tmp_path / "out").exists()
