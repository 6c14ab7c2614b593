#!/usr/bin/env bash
# Build a throwaway venv at $1 with recast and the newest versions of its dependencies that
# pyproject.toml allows; torch stays on the 2.13.0 CPU wheel (any other spec downloads CUDA).
# Used by `make lock` (to freeze them) and `make test-latest` (to test against them).
set -euo pipefail
venv=$1
python=${PYTHON:-python3}
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch is named again in the upgrade: the eager strategy would otherwise move it too
"$venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,demo]" torch==2.13.0
