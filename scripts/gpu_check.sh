#!/usr/bin/env bash
# One device call: environment facts, the GPU test suite, then the attention benchmark.
# Usage (on the GPU machine, repo root): bash scripts/gpu_check.sh [bench grids]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
if [ -n "${BENCH_GRIDS:-}" ]; then
  timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_attention.py --grids "$BENCH_GRIDS" --out "$OUT/bench_attention.json" 2>&1 | tee "$OUT/bench_attention.log" | grep -v '^{' | tail -40
fi
