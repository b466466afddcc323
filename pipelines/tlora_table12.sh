#!/usr/bin/env bash
# TLoRA on BBC News topics, with the paper's Table 12 ablation of the frozen A:
#   calibrate (covariance + sensitivity on the task data) → init --method tlora with A from W·C, W or
#   random (A frozen in all three, the same rank and alpha budget) → train the same steps → held-out loss.
# Usage: pipelines/tlora_table12.sh [WORK_DIR]   (default: runs/tlora_table12)
set -euo pipefail
WORK=${1:-runs/tlora_table12}
MODEL=${MODEL:-smollm2-135m}
STEPS=${STEPS:-40}
RANK=${RANK:-8}
LR=${LR:-5e-4}
export HF_HUB_OFFLINE=1
DATA="$WORK/data"
TEMPLATES=(--prompt-template $'Article: {text:.400}\nTopic:' --response-template ' {label}')
start=$(date +%s)

lrsurgery assets bbc-news -o "$DATA" --overwrite
# reused when it already holds this model's, data's and settings' calibration (fingerprints decide)
lrsurgery calibrate "$MODEL" --data "$DATA/train.jsonl" "${TEMPLATES[@]}" --samples 32 --seq-len 256 \
  --reuse -o "$WORK/stats"
lrsurgery inspect "$WORK/stats" --top 5 | tail -7
for a in wc w random; do
  lrsurgery init "$MODEL" --method tlora --stats "$WORK/stats" --rank "$RANK" --alpha $((2 * RANK)) \
    --a-init "$a" -o "$WORK/init-$a" --overwrite
  lrsurgery train "$WORK/init-$a" --data "$DATA/train.jsonl" "${TEMPLATES[@]}" --seq-len 256 \
    --batch-size 8 --max-steps "$STEPS" --lr "$LR" --warmup-ratio 0.1 \
    --eval-data "$DATA/test.jsonl" -o "$WORK/run-$a" --overwrite
done

python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
print("| A (frozen) | held-out loss | trainable parameters |\n|---|---|---|")
for a in ("wc", "w", "random"):
    extra = json.loads((work / f"run-{a}" / "manifest.json").read_text())["extra"]
    print(f"| {a} | {extra['eval']['loss']:.4f} | {extra['trainable_parameters']} |")
PY
echo "tlora pipeline finished in $(( $(date +%s) - start ))s"
