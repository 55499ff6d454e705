#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what it needs.
# Reinstalls only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.viper-installed
wanted=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "bootstrap: installing dependencies into .venv (torch pinned by constraints.txt)"
    # torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet -c constraints.txt torch
    .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,serve,cli,bench,s3,litserve]"
    echo "$wanted" > "$stamp"
fi
