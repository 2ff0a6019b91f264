#!/usr/bin/env bash
# The quality experiments in one command on a GPU (repo root): train dense and VMoBA with the
# same steps, data and seed; evaluate the dense model training-free over the sweep and ablations;
# write the real q/k the CPU quality guard checks (VMOBA_QUALITY_FIXTURE). Results land in $OUT;
# plots are drawn from them by plots.py.
#   STEPS=800 PARTS="dense vmoba eval" bash benchmarks/quality/run_gpu.sh
# TRAIN_TIMEOUT / EVAL_TIMEOUT (seconds) bound each stage: checkpoints and the exported weights
# are written every 200 steps and eval.json after every config, so a stage cut short still reports.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # diffusers missing: the wheels in .whl/, offline
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
OUT=${OUT:-out}; WORK=${WORK:-/tmp/quality}; mkdir -p "$OUT" "$WORK"
STEPS=${STEPS:-800}; PARTS=${PARTS:-dense vmoba eval}
Q=benchmarks/quality
for att in dense vmoba; do
  [[ " $PARTS " == *" $att "* ]] || continue
  echo "== train $att ($STEPS steps)"
  timeout "${TRAIN_TIMEOUT:-1800}" python3 $Q/train.py --attention $att --steps "$STEPS" --ckpt "$WORK/$att.pt" \
    --log "$OUT/train_$att.jsonl" --export "$WORK/${att}_weights.pt" ${TRAIN_ARGS:-} 2>&1 \
    | grep -E "val_loss|resumed|Error|error" | tail -5
done
cp "$WORK/dense_weights.pt" "$OUT/" 2>/dev/null
if [[ " $PARTS " == *" eval "* ]]; then
  echo "== evaluate"
  timeout "${EVAL_TIMEOUT:-1800}" python3 $Q/evaluate.py --ckpt "${EVAL_CKPT:-$WORK/dense_weights.pt}" --out "$OUT" \
    --fixture "$OUT/quality_fixture.pt" ${EVAL_ARGS:-} 2>&1 | grep -v '^{"config"' | tail -40
fi
