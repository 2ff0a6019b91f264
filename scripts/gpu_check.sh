#!/usr/bin/env bash
# One GPU run: environment facts, the GPU tests, the attention benchmark, the model benchmark.
# Usage (GPU machine, repo root):
#   PARTS="op pass bench" BENCH_GRIDS=24x36x64 BENCH_CONFIGS=block-thr0.4 bash scripts/gpu_check.sh
#   PARTS=model MODEL_RUNS="dense:--variant dense;vmoba:--variant vmoba" bash scripts/gpu_check.sh
#   PARTS: op (tests/test_attention_gpu.py), pass (tests/test_api_gpu.py), warm (compile the
#   attention benchmark's functions alongside the tests, for a later bench part on the same
#   machine), bench (bench_attention.py), model (bench_model.py runs), demo (the demo's output on CUDA),
#   stacks (fused QKV, group offloading with streams, first-block cache, input memory formats on
#   Triton and FA4; the offloading stacks' placement in float32), probe (bench_model.py --probe).
# The tests run as parallel pytest processes (compiling is CPU-bound),
# each in its own process so that a CUDA fault in one cannot poison the others. Logs go to $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
LOGS=${LOGS:-/tmp/vmoba_logs}; mkdir -p "$LOGS"  # tarred into $OUT at the end
trap 'tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")"' EXIT
PARTS=${PARTS:-op pass}
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # diffusers missing: the wheels in .whl/, offline
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
  --layers "${BENCH_LAYERS:-0,1,2}" --batch "${BENCH_BATCH:-1}" --heads "${BENCH_HEADS:-12}")
pids=()
if [[ " $PARTS " == *" bench "* || " $PARTS " == *" warm "* ]]; then  # compile alongside the tests
  python3 benchmarks/bench_attention.py "${BENCH_ARGS[@]}" --compile-only --jobs "${BENCH_JOBS:-8}" \
    >"$LOGS/bench_warmup.log" 2>&1 &
  warm=$!
fi
if [[ " $PARTS " == *" op "* ]]; then  # OP_SHARDS: pytest -k expressions, one per process, ';'-separated
  IFS=';' read -ra shards <<< "${OP_SHARDS:-compiled and bf16;compiled and fp32;eager-call and bf16;eager-call and fp32;token_pairs}"
  for k in "${shards[@]}"; do
    shard "op_${k// /_}" tests/test_attention_gpu.py "$k" & pids+=($!)
  done
fi
if [[ " $PARTS " == *" pass "* ]]; then  # PASS_SHARDS likewise (default: one process)
  IFS=';' read -ra shards <<< "${PASS_SHARDS:-}"
  for k in "${shards[@]:-}"; do shard "pass_${k// /_}" tests/test_api_gpu.py "$k" & pids+=($!); done
fi
if [[ " $PARTS " == *" stacks "* ]]; then  # the CPU compat suite's CUDA shard, and input memory formats
  shard stacks tests/test_api_gpu.py "user_stacks" & pids+=($!)
  shard offload_float32 tests/test_api_gpu.py "offloaded_placement" & pids+=($!)
  shard memory_formats tests/test_attention_gpu.py "memory_formats" & pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
if [ ${#pids[@]} -gt 0 ]; then
  cat "$LOGS"/gpu_tests_*.log | grep -E "^(FAILED|ERROR)" | head -20
fi

if [ -n "${warm:-}" ]; then wait "$warm"; echo "== warm-up: $(tail -1 "$LOGS/bench_warmup.log")"; fi
if [[ " $PARTS " == *" bench "* ]]; then
  timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_attention.py "${BENCH_ARGS[@]}" \
    --out "$OUT/bench_attention.json" 2>&1 | tee "$LOGS/bench_attention.log" | grep -v '^{' | tail -40
fi
if [[ " $PARTS " == *" model "* ]]; then  # MODEL_RUNS: NAME:ARGS, ';'-separated, one process each
  IFS=';' read -ra runs <<< "${MODEL_RUNS:-dense:--variant dense;vmoba:--variant vmoba}"
  for r in "${runs[@]}"; do
    name=${r%%:*}
    # shellcheck disable=SC2086  # ARGS are words
    timeout ${MODEL_TIMEOUT:-280} python3 benchmarks/bench_model.py --grid "${MODEL_GRID:-24x36x64}" \
      ${r#*:} --out "$OUT/model_$name.json" 2>&1 | tee "$LOGS/model_$name.log" | grep -v '^{' | tail -14
  done
fi
if [[ " $PARTS " == *" probe "* ]]; then  # the structural fallback's token-order probe vs a dense forward
  timeout ${PROBE_TIMEOUT:-240} python3 benchmarks/bench_model.py --probe --grid "${MODEL_GRID:-24x36x64}" \
    --out "$OUT/probe.json" 2>&1 | tee "$LOGS/probe.log" | tail -3
fi
if [[ " $PARTS " == *" demo "* ]]; then  # the demo's whole output: its report, no warnings
  timeout ${DEMO_TIMEOUT:-240} python3 -m vmoba_compile demo --device cuda >"$LOGS/demo.log" 2>&1
  echo "== demo rc $?: $(wc -l < "$LOGS/demo.log") lines, $(grep -c ChromiumEventLogger "$LOGS/demo.log") of ChromiumEventLogger"
  cat "$LOGS/demo.log" | tail -40
fi
