#!/usr/bin/env bash
# The GPU check: every CUDA path of the project in one call, on a bare GPU machine.
#
#   bash scripts/gpu_check.sh OUTDIR                    # on a GPU machine (at most 8 minutes)
#   bash scripts/gpu_check.sh --dry-run OUTDIR          # anywhere: what CI runs, so this cannot rot
#   bash scripts/gpu_check.sh --download-wheels DIR [PACKAGE...]   # before: wheels for an offline GPU machine
#
# Options: --python PY (default python3: on the GPU machines here, the one holding a CUDA torch),
#          --wheels DIR (install what is missing from these wheels only, no index; default .whl if present).
#
# Steps, each bounded in time, each run even when an earlier one failed:
#   install   keep the interpreter's torch when it is a CUDA build; otherwise make .venv-gpu with
#             the CUDA build pinned by constraints-gpu.txt. Then fill only the gaps that
#             pyproject.toml declares (scripts/gpu_check.py missing).
#   tests     tests/test_gpu_tier.py and tests/test_cuda_ipc.py, CUDA tests included. NCCL between
#             two ranks needs two GPUs: on a one-GPU machine that test skips with its reason.
#   training  a Lightning Trainer(accelerator="gpu") with ViperCallback and a consumer on the same
#             GPU in another process, checked bit for bit (scripts/gpu_training_check.py).
#   bench     python -m benchmarks.update_latency --sizes-mb 256 1024 with memcpy, memcpy-gpu,
#             dram-shm, pfs and gpu-ipc.
# OUTDIR receives gpu_check.log, steps.tsv, environment.txt, pytest.xml, training_check.json,
# update_latency.json, update_latency.png and summary.txt (also printed at the end).
#
# --dry-run installs nothing and needs no GPU: it checks that every step parses and runs up to
# the point where CUDA is needed (the CUDA tests are collected and skip with their reasons, the
# training check runs on the GPU tier's host stand-in, the benchmark runs its CPU baseline at
# 1 MB and reports the GPU strategies it skips) and writes the same files.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
PY=python3
WHEELS=""
OUT=""
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

download_wheels() {
    # The GPU machines here reach no package index: carry the wheels their image lacks (see the
    # device notes). Their Python is CPython 3.12 on x86-64 manylinux.
    local dir=$1; shift
    local packages=("$@")
    [ ${#packages[@]} -gt 0 ] || packages=(pyzmq jsonargparse blake3)  # what the nvidia-h200 image lacks of core, dev and bench
    mkdir -p "$dir"
    exec python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$dir" "${packages[@]}"
}

# step NAME SECONDS COMMAND...: run it bounded, log it, record its status; never stop the script.
step() {
    local name=$1 seconds=$2; shift 2
    local started=$SECONDS status
    echo "== $name (limit ${seconds}s): $*" | tee -a "$LOG"
    timeout -k 10 "$seconds" "$@" >>"$LOG" 2>&1
    case $? in
        0) status=ok ;;
        124|137) status=timeout; FAILED=1 ;;
        *) status=failed; FAILED=1 ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" "$*" >>"$OUT/steps.tsv"
    echo "   $name: $status after $((SECONDS - started)) s" | tee -a "$LOG"
}

pip_from_wheels() {
    if [ -n "$WHEELS" ]; then
        "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$@"
    else
        "$PY" -m pip install --quiet "$@"
    fi
}

install() {
    if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
        echo "install: $PY has no CUDA build of torch; making .venv-gpu with constraints-gpu.txt"
        [ -x .venv-gpu/bin/python ] || "$PY" -m venv .venv-gpu || return 1
        PY=$ROOT/.venv-gpu/bin/python
        pip_from_wheels -c constraints-gpu.txt torch && pip_from_wheels -c constraints-gpu.txt -e ".[dev,bench]"
        return
    fi
    local missing
    missing=$("$PY" scripts/gpu_check.py missing) || return 1
    if [ -z "$missing" ]; then
        echo "install: $PY already has everything pyproject.toml declares"
        return 0
    fi
    echo "install: adding to $SITE: $(echo $missing)"
    mkdir -p "$SITE"
    # --no-deps: the interpreter's own packages (its CUDA torch above all) must not be replaced.
    # shellcheck disable=SC2086
    pip_from_wheels --no-deps --target "$SITE" $missing
}

environment() {
    {
        echo "date: $(date -u +%FT%TZ)   host: $(uname -srm)   mode: $([ $DRY = 1 ] && echo dry-run || echo full)"
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        echo "cpus: $(nproc)   /dev/shm free: $(df -h --output=avail /dev/shm | tail -1 | tr -d ' ') (the 1 GB cases need 2 GB)"
        "$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, "
                   f"CUDA {torch.version.cuda}, devices {torch.cuda.device_count()}")'
    } >"$OUT/environment.txt" 2>&1
    cat "$OUT/environment.txt" | tee -a "$LOG"
}

finish() {
    "$PY" scripts/gpu_check.py summary "$OUT" || echo "gpu_check: the summary could not be written" >&2
}
# Everything runs from main, called on the last line: bash has then read the whole file, so
# editing or updating the script while it runs cannot change what runs.
main() {
    while [ $# -gt 0 ]; do
        case $1 in
            --dry-run) DRY=1 ;;
            --python) PY=${2:?--python needs an interpreter}; shift ;;
            --wheels) WHEELS=${2:?--wheels needs a directory}; shift ;;
            --download-wheels) shift; download_wheels "${1:?--download-wheels needs a directory}" "${@:2}" ;;
            -h|--help) usage ;;
            -*) echo "gpu_check: unknown option $1" >&2; usage ;;
            *) [ -z "$OUT" ] || usage; OUT=$1 ;;
        esac
        shift
    done
    [ -n "$OUT" ] || usage
    [ -n "$WHEELS" ] || { [ -d .whl ] && WHEELS=.whl; }
    command -v "$PY" >/dev/null || { echo "gpu_check: no interpreter $PY" >&2; exit 2; }
    mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
    LOG=$OUT/gpu_check.log
    : >"$LOG"
    : >"$OUT/steps.tsv"
    SITE=${TMPDIR:-/tmp}/viper-gpu-check-site
    export PYTHONPATH=$ROOT PYTHONUNBUFFERED=1
    FAILED=0
    trap finish EXIT
    export PY WHEELS SITE ROOT
    export -f install pip_from_wheels  # so that `step` can bound them with timeout like any command

    TESTS=(tests/test_gpu_tier.py tests/test_cuda_ipc.py)
    PYTEST=(-m pytest -p no:cacheprovider -rA --junitxml="$OUT/pytest.xml")
    BENCH=(-m benchmarks.update_latency --repeat 3 --json "$OUT/update_latency.json" --plot "$OUT/update_latency.png")
    STRATEGIES=(memcpy memcpy-gpu gpu-ipc dram-shm pfs)  # the GPU ones first: a run cut short keeps them

    if [ $DRY = 1 ]; then
        missing=$("$PY" scripts/gpu_check.py missing | tr '\n' ' ')
        echo "dry run: nothing is installed; the full run would add: ${missing:-nothing}" | tee -a "$LOG"
        "$PY" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null ||
            echo "dry run: $PY's torch is not a CUDA build; the full run would make .venv-gpu from constraints-gpu.txt" | tee -a "$LOG"
        environment
        step tests 120 "$PY" "${PYTEST[@]}" -m gpu "${TESTS[@]}"
        step training 120 "$PY" scripts/gpu_training_check.py --device cpu --json "$OUT/training_check.json"
        step bench 120 "$PY" "${BENCH[@]}" --sizes-mb 1 --strategies "${STRATEGIES[@]}"
    else
        step install 60 bash -c install
        if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            [ -x .venv-gpu/bin/python ] && PY=$ROOT/.venv-gpu/bin/python
        fi
        [ -d "$SITE" ] && export PYTHONPATH=$SITE:$ROOT
        environment
        if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
            echo "gpu_check: no CUDA device is visible to $PY; run with --dry-run on a machine without one" | tee -a "$LOG"
            exit 1
        fi
        step tests 120 "$PY" "${PYTEST[@]}" "${TESTS[@]}"
        step training 90 "$PY" scripts/gpu_training_check.py --device cuda --json "$OUT/training_check.json"
        step bench 210 "$PY" "${BENCH[@]}" --sizes-mb 256 1024 --strategies "${STRATEGIES[@]}"
    fi
    exit $FAILED
}

main "$@"
