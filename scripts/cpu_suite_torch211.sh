#!/usr/bin/env bash
# The CPU suite under torch 2.11, the oldest supported version and the GPU measurements' one:
# Dynamo differs between 2.11 and 2.13 (CI's), and GPU runs have failed on such differences that
# CI could not see. PyPI's torch 2.11.0 is the CUDA build; it runs on CPU.
# Usage (repo root): bash scripts/cpu_suite_torch211.sh [pytest arguments, default: the suite]
# Builds .venv-torch211 once (about 4 GB of wheels), then runs pytest in it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-torch211}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==2.11.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
"$VENV/bin/python" -m pytest -q -m "not gpu" "${@:-tests}"
