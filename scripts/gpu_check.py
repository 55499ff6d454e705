"""Helpers of scripts/gpu_check.sh, kept in Python where bash would be fragile.

    python scripts/gpu_check.py missing          # requirements the GPU check lacks, one a line
    python scripts/gpu_check.py summary OUTDIR   # OUTDIR/summary.txt from what the steps wrote

`missing` reads the requirements from pyproject.toml (the core dependencies and the `dev` and
`bench` extras) and prints those whose module is absent or whose installed version falls
outside the declared range, so a GPU machine's own CUDA torch and packages are kept and only
the gaps are filled. torch is left out: the shell script checks that it is a CUDA build.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("dev", "bench")
SIZES = (256e6, 1024e6)
SUMMARY_STRATEGIES = ("memcpy", "memcpy-gpu", "dram-shm", "gpu-ipc", "pfs")


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    return list(project["dependencies"]) + [req for extra in EXTRAS for req in optional.get(extra, [])]


def _split(requirement: str) -> tuple[str, str]:
    """('pyzmq', '>=25') from 'pyzmq>=25'; extras and markers are dropped."""
    match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(\[[^\]]*\])?\s*([^;]*)", requirement)
    if match is None:
        raise SystemExit(f"cannot read the requirement {requirement!r} in pyproject.toml")
    return match.group(1), match.group(3).strip()


def is_satisfied(requirement: str) -> bool:
    name, spec = _split(requirement)
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # no way to compare versions: presence has to do
        return True
    return SpecifierSet(spec).contains(installed, prereleases=True)


def missing() -> list[str]:
    return [req for req in requirements() if _split(req)[0] != "torch" and not is_satisfied(req)]


# -- summary ---------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _steps(out: Path) -> list[str]:
    lines = ["steps (status, seconds, command):"]
    try:
        rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line]
    except OSError:
        return lines + ["  none recorded"]
    return lines + [f"  {name:<10}{status:<10}{float(seconds):>7.1f}  {command}" for name, status, seconds, command in rows]


def _tests(out: Path) -> list[str]:
    try:
        root = ElementTree.parse(out / "pytest.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return ["tests: no pytest report"]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    details = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}.{case.get('name', '')}".removeprefix("tests.")
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
            continue
        kind = "skipped" if outcome.tag == "skipped" else "failed"
        counts[kind] += 1
        details.append(f"  {kind.upper()} {name}: {(outcome.get('message') or '').splitlines()[0][:300]}")
    return [f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"] + details


def _training(out: Path) -> list[str]:
    report = _read_json(out / "training_check.json")
    if report is None:
        return ["training check: no report"]
    verdict = "PASSED" if report.get("passed") else "FAILED"
    lines = [f"training check ({report['device']}, {report.get('gpu_name') or 'host stand-in'}): {verdict}",
             f"  final version {report['final_version']}, served v{report.get('served_version')}, "
             f"bit exact: {report['bit_exact']}, routes taken: {', '.join(report['routes_taken']) or 'none'} "
             f"(expected {report['expected_route']})"]
    if report.get("stall_ms_median") is not None:
        lines.append(f"  training-thread stall per publish: median {report['stall_ms_median']:.2f} ms, "
                     f"max {report['stall_ms_max']:.2f} ms ({report['weights_bytes'] / 1e6:.0f} MB of weights)")
    lines += [f"  refused: {reason}" for reason in report.get("refusals", [])[:5]]
    return lines


def _benchmark(out: Path) -> list[str]:
    data = _read_json(out / "update_latency.json")
    if data is None:
        return ["benchmark: no results"]
    results = data["results"]
    lines = [f"benchmark (update_latency, median of {results[0]['repeat'] if results else '?'}):",
             f"  {'strategy':<12}{'MB':>7}{'e2e ms':>10}{'stall ms':>10}  (host thread)"]
    for result in results:
        stall = result.get("training_stall_s")
        lines.append(f"  {result['strategy']:<12}{result['size_bytes'] / 1e6:>7.0f}{result['e2e_s'] * 1e3:>10.2f}"
                     f"{'' if stall is None else f'{stall * 1e3:>10.2f}'}")
    lines += [f"  not run: {name}: {why}" for name, why in data.get("skipped", {}).items()]
    for size_mb in sorted({r["size_mb"] for r in results}):
        peers = {r["strategy"]: r for r in results if r["size_mb"] == size_mb}
        gpu, memcpy, pfs = peers.get("gpu-ipc"), peers.get("memcpy"), peers.get("pfs")
        if gpu and memcpy and pfs:
            lines.append(f"  {size_mb:g} MB: gpu-ipc e2e / memcpy {gpu['e2e_s'] / memcpy['e2e_s']:.2f}, "
                         f"pfs / gpu-ipc {pfs['e2e_s'] / gpu['e2e_s']:.1f}x, "
                         f"gpu-ipc host stall / memcpy {gpu['training_stall_s'] / memcpy['training_stall_s']:.3f}")
        if gpu and "device_stall_s" in gpu and peers.get("memcpy-gpu"):
            lines.append(f"  {size_mb:g} MB: the training stream waited {gpu['device_stall_s'] * 1e3:.2f} ms per "
                         f"publish, {gpu['device_stall_s'] / peers['memcpy-gpu']['e2e_s']:.2f}x one device copy")
    return lines


def summary(out: Path) -> str:
    environment = (out / "environment.txt").read_text().strip() if (out / "environment.txt").exists() else ""
    sections = [["GPU check summary", environment], _steps(out), _tests(out), _training(out), _benchmark(out)]
    text = "\n\n".join("\n".join(line for line in section if line) for section in sections) + "\n"
    (out / "summary.txt").write_text(text)
    return text


def main(argv: list[str]) -> int:
    if argv == ["missing"]:
        print("\n".join(missing()))
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        print(summary(Path(argv[1])), end="")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
