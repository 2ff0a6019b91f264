#!/usr/bin/env bash
# Several independent jobs at once on a machine of several GPUs, one GPU each (the cores are
# shared, so compile-heavy lanes slow each other a little).
# Usage (GPU machine, repo root), one quoted command per lane:
#   bash scripts/gpu_lanes.sh 'PARTS="op pass" bash scripts/gpu_check.sh' \
#     'STEPS=5000 PARTS=dense bash benchmarks/quality/run_gpu.sh'
# Each lane is stopped after LANE_TIMEOUT seconds (default 540). Lane i runs with
# CUDA_VISIBLE_DEVICES=i mod (GPU count), OUT=/tmp/lanes/lane<i> and its own inductor cache; its
# output goes to lane<i>/lane.log. At the end every lane's files are tarred into $OUT/lanes.tgz,
# except *.pt files (checkpoints), which are moved to $OUT/lane<i>/.
set -o pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # diffusers missing: the wheels in .whl/, offline
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
GPUS=$(nvidia-smi --list-gpus | wc -l)
ROOT=/tmp/lanes; mkdir -p "$ROOT"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$ROOT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$ROOT/env.txt"
i=0; pids=()
for cmd in "$@"; do
  lane=$ROOT/lane$i; mkdir -p "$lane"
  echo "== lane $i (GPU $((i % GPUS))): $cmd" | tee -a "$ROOT/env.txt"
  (
    export CUDA_VISIBLE_DEVICES=$((i % GPUS)) OUT=$lane LOGS=$lane/logs \
      TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_lane$i
    start=$SECONDS
    timeout -k 10 "${LANE_TIMEOUT:-540}" bash -c "$cmd" >"$lane/lane.log" 2>&1
    echo "== lane $i exit $? after $((SECONDS - start)) s" >>"$lane/lane.log"
  ) &
  pids+=($!); i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p"; done
for lane in "$ROOT"/lane*; do
  tail -25 "$lane/lane.log" | sed "s|^|$(basename "$lane"): |"
  for f in $(find "$lane" -name '*.pt'); do mkdir -p "$OUT/$(basename "$lane")"; mv "$f" "$OUT/$(basename "$lane")/"; done
done
tar czf "$OUT/lanes.tgz" -C /tmp lanes
