#!/usr/bin/env bash
# One GPU run: environment facts, the GPU tests, the attention benchmark, the model benchmark.
# Usage (GPU machine, repo root):
#   PARTS="op pass bench" BENCH_GRIDS=24x36x64 BENCH_CONFIGS=block-thr0.4 bash scripts/gpu_check.sh
#   PARTS=model MODEL_GRID=24x36x64 bash scripts/gpu_check.sh   (bench_model, dense then vmoba)
# The tests run as parallel pytest processes (compiling is CPU-bound; the machine has 16 cores),
# each in its own process so that a CUDA fault in one cannot poison the others. Logs go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
LOGS=${LOGS:-/tmp/vmoba_logs}; mkdir -p "$LOGS"  # tarred into $OUT at the end (8 files come back)
trap 'tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"' EXIT
PARTS=${PARTS:-op pass}
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # not on the GPU image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOGS/env.txt"

shard() {  # shard NAME FILE [pytest -k expression]
  local name=$1 file=$2; shift 2
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -m gpu "$file" ${1:+-k "$1"} -p no:cacheprovider -rA \
    >"$LOGS/gpu_tests_$name.log" 2>&1
  echo "== $name: $(tail -1 "$LOGS/gpu_tests_$name.log")"
}
BENCH_ARGS=(--grids "${BENCH_GRIDS:-24x36x64}" --configs "${BENCH_CONFIGS:-}"
  --layers "${BENCH_LAYERS:-0,1,2}" --batch "${BENCH_BATCH:-1}")
pids=()
if [[ " $PARTS " == *" bench "* ]]; then  # compile the benchmark's functions alongside the tests
  python3 benchmarks/bench_attention.py "${BENCH_ARGS[@]}" --compile-only --jobs "${BENCH_JOBS:-8}" \
    >"$LOGS/bench_warmup.log" 2>&1 &
  warm=$!
fi
if [[ " $PARTS " == *" op "* ]]; then  # OP_SHARDS: pytest -k expressions, one per process, ';'-separated
  IFS=';' read -ra shards <<< "${OP_SHARDS:-compiled and bf16;compiled and fp32;eager-call and bf16;eager-call and fp32}"
  for k in "${shards[@]}"; do
    shard "op_${k// /_}" tests/test_attention_gpu.py "$k" & pids+=($!)
  done
fi
if [[ " $PARTS " == *" pass "* ]]; then  # PASS_SHARDS likewise (default: one process)
  IFS=';' read -ra shards <<< "${PASS_SHARDS:-}"
  for k in "${shards[@]:-}"; do shard "pass_${k// /_}" tests/test_api_gpu.py "$k" & pids+=($!); done
fi
for p in "${pids[@]}"; do wait "$p"; done
if [ ${#pids[@]} -gt 0 ]; then
  cat "$LOGS"/gpu_tests_*.log | grep -E "^(FAILED|ERROR)" | head -20
fi

if [[ " $PARTS " == *" bench "* ]]; then
  wait $warm; tail -3 "$LOGS/bench_warmup.log"
  timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_attention.py "${BENCH_ARGS[@]}" \
    --out "$OUT/bench_attention.json" 2>&1 | tee "$LOGS/bench_attention.log" | grep -v '^{' | tail -40
fi
if [[ " $PARTS " == *" model "* ]]; then  # end to end, one variant per process
  for variant in dense vmoba; do
    timeout ${MODEL_TIMEOUT:-280} python3 benchmarks/bench_model.py --grid "${MODEL_GRID:-24x36x64}" \
      --variant $variant --steps "${MODEL_STEPS:-10}" --train-steps "${MODEL_TRAIN_STEPS:-3}" \
      --out "$OUT/bench_model_$variant.json" 2>&1 | tee "$LOGS/bench_model_$variant.log" | tail -12
  done
fi
