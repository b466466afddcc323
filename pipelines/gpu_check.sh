#!/usr/bin/env bash
# The CUDA checks in one run: the GPU tests, every method's init → train → fuse with training on the GPU,
# an eval on the GPU, and the GPU benchmarks (train step in fp32 and bf16, TLoRA init against PEFT's PiSSA
# on SmolLM2 and on a two-layer model of Llama-2-7B's shape). Each step has a time limit; a failed step is
# counted, not fatal.
# Usage: pipelines/gpu_check.sh [WORK_DIR]   (default runs/gpu-check; the log is WORK_DIR/gpu_check.log,
#        or $LOG).  MODEL: a SmolLM2-shaped folder or name (default smollm2-135m).  DEVICE: default cuda.
#        BUDGET: seconds for the whole run (default 540): each step's limit is cut to what is left, and
#        steps are skipped once it is spent, so the log always holds every step that ran.
#        PARTS: which sections to run, of tests,methods,bench (default all three), so that the CPU-heavy
#        tests can run beside the method runs while the timed benchmarks run alone.
set -uo pipefail
WORK=${1:-runs/gpu-check}
MODEL=${MODEL:-smollm2-135m}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-30}
LOG=${LOG:-$WORK/gpu_check.log}
BUDGET=${BUDGET:-540}
PARTS=${PARTS:-tests,methods,bench}
BIG_SHAPE=${BIG_SHAPE:---shape llama7b --layers 2}  # the large model of the last benchmark
HERE=$(dirname "$0")
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LRSURGERY_NO_PROGRESS=1
mkdir -p "$WORK" "$(dirname "$LOG")"
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, go on after a failure
  local name=$1 limit=$2 began=$SECONDS rc
  shift 2
  if ((BUDGET - SECONDS < 10)); then
    echo "=== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$LOG"
    failed=$((failed + 1))
    return
  fi
  ((limit > BUDGET - SECONDS)) && limit=$((BUDGET - SECONDS))
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - began))s" | tee -a "$LOG"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}

part() { [[ ",$PARTS," == *",$1,"* ]]; }

step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; python -c '
import torch, transformers, peft, datasets
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", transformers.__version__,
      \"peft\", peft.__version__, \"datasets\", datasets.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'"
FOLDER=$(python -c "from lrsurgery.hf.resolve import resolve_model; print(resolve_model('$MODEL'))") || exit 1
DATA=$WORK/data
part methods && step data 60 lrsurgery assets bbc-news -o "$DATA" --overwrite

# 1. the GPU tests (they compare every GPU path with the CPU on the same inputs)
part tests && step tests 240 env LRSURGERY_TEST_SMOLLM2="$FOLDER" python -m pytest -q -m "" -p no:cacheprovider tests/test_device.py

# 2. every method trained on the GPU (bf16 autocast), from a GPU calibration and GPU SVDs
TRAIN=(--data "$DATA/train.jsonl" --eval-data "$DATA/test.jsonl" --prompt-template $'Article: {text:.400}\nTopic:'
  --response-template ' {label}' --seq-len 128 --batch-size 8 --max-steps "$STEPS" --lr 3e-4 --precision bf16)
part methods && step calibrate 60 lrsurgery calibrate "$FOLDER" --data "$DATA/train.jsonl" --samples 32 --seq-len 256 \
  --device "$DEVICE" -o "$WORK/stats" --overwrite
declare -A INIT=([lora]="--rank 8" [pissa]="--rank 8 --device $DEVICE" [tlora]="--rank 8 --stats $WORK/stats --device $DEVICE"
  [dual]="--r-share 4 --r-expert 4 --device $DEVICE" [srlora]="--rank 8 --r-target 32 --device $DEVICE")
declare -A EXTRA=([dual]="--t1 0.2 --t2 0.6 --delta-t 3" [srlora]="--fusion-ratio 0.5")
for method in ${METHODS:-tlora dual srlora lora pissa}; do
  part methods || break
  # shellcheck disable=SC2086
  step "$method" 90 bash -c "set -e
    lrsurgery init '$FOLDER' --method $method ${INIT[$method]} -o '$WORK/$method/init' --overwrite
    lrsurgery train '$WORK/$method/init' $(printf '%q ' "${TRAIN[@]}") ${EXTRA[$method]:-} -o '$WORK/$method/run' --overwrite
    lrsurgery fuse '$WORK/$method/run' -o '$WORK/$method/merged' --overwrite
    python -c 'import json, sys; e = json.load(open(sys.argv[1]))[\"extra\"]; print(\"held-out loss\", e[\"eval\"][\"loss\"], \"peak MB\", e[\"peak_memory_mb\"], \"switches\", len(e.get(\"srlora\", {}).get(\"switch_steps\", [])), \"screenings\", len(e.get(\"dual\", {}).get(\"k_schedule\", [])))' '$WORK/$method/run/manifest.json'"
done

# the base model and the TLoRA model fused above, side by side, scored on the GPU
part methods && step eval 60 env BBC_DATA="$DATA" lrsurgery eval "$FOLDER" "$WORK/tlora/merged" \
  --task "$HERE/../examples/tasks/bbc_topic.yaml" --limit 100 --device "$DEVICE"

# 3. benchmarks
BENCH=(--model "$FOLDER" --device "$DEVICE" --batch-size "${BENCH_BATCH:-8}" --seq-len "${BENCH_SEQ:-512}" --variants frozen,peft-lora,lora,pissa
  --repeats 1 --rounds "${BENCH_ROUNDS:-10}")
if part bench; then
step train-step-bf16 90 python "$HERE/bench_train_step.py" "${BENCH[@]}" --dtype bf16
step train-step-fp32 90 python "$HERE/bench_train_step.py" "${BENCH[@]}" --dtype fp32
# shellcheck disable=SC2086
step llama7b-shape 60 python "$HERE/synthetic_llama.py" "$WORK/llama7b-2l" $BIG_SHAPE \
  --tokenizer "$FOLDER" --overwrite
step tlora-init-7b-shape 240 python "$HERE/bench_tlora.py" --model "$WORK/llama7b-2l" --device "$DEVICE" \
  --repeats 1 --no-train-step --samples 16 --seq-len 256
step tlora-init 120 python "$HERE/bench_tlora.py" --model "$FOLDER" --device "$DEVICE" --repeats 1 --no-train-step
fi

echo "gpu_check: $failed step(s) failed; log in $LOG" | tee -a "$LOG"
exit "$((failed > 0))"
