#!/usr/bin/env bash
# One device call: environment facts, the GPU tests (each file in its own process: a CUDA fault
# is sticky), then the attention benchmark. Usage (GPU machine, repo root):
#   PARTS="op pass bench" BENCH_GRIDS=24x36x64 BENCH_CONFIGS=block-thr0.25-head bash scripts/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
PARTS=${PARTS:-op pass}
if ls .whl/*.whl >/dev/null 2>&1; then  # diffusers is not on the GPU image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
for part in $PARTS; do
  case $part in
    op) file=tests/test_gpu.py ;;
    pass) file=tests/test_gpu_pass.py ;;
    *) continue ;;
  esac
  echo "== pytest $file"
  kfilter=(); [ -n "${PYTEST_K:-}" ] && [ "$part" = op ] && kfilter=(-k "$PYTEST_K")
  timeout ${TEST_TIMEOUT:-280} python3 -m pytest -q -m gpu "$file" "${kfilter[@]}" -p no:cacheprovider -rA 2>&1 \
    | tee "$OUT/gpu_tests_$part.log" | grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error" | tail -30
done
if [[ " $PARTS " == *" bench "* ]]; then
  timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_attention.py --grids "${BENCH_GRIDS:-24x36x64}" \
    --configs "${BENCH_CONFIGS:-}" --layers "${BENCH_LAYERS:-0,1,2}" --out "$OUT/bench_attention.json" 2>&1 \
    | tee "$OUT/bench_attention.log" | grep -v '^{' | tail -40
fi
