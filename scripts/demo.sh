#!/usr/bin/env bash
# The README's demo command: set up .venv if needed, then train NT3 while a consumer follows it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m examples.nt3.demo "$@"
