#!/usr/bin/env bash
# Dual (DMC-LoRA) ablation on SmolLM2-135M + BBC News (paper Table 4 rows, plus LoRA at equal total rank):
#   init (one per row) → train (same steps, data and schedule) → held-out loss on the BBC test split.
# Usage: pipelines/dual_table4.sh [WORK_DIR]   (default: runs/dual_table4); STEPS, R_SHARE, R_EXPERT, LR, SEQ_LEN, BATCH,
# DELTA_T, CHARS (article characters in the prompt) override.
set -euo pipefail
WORK=${1:-runs/dual_table4}
MODEL=${MODEL:-smollm2-135m}
STEPS=${STEPS:-30}
R_SHARE=${R_SHARE:-4}
R_EXPERT=${R_EXPERT:-4}
LR=${LR:-5e-4}
CHARS=${CHARS:-400}
SEQ_LEN=${SEQ_LEN:-128}
BATCH=${BATCH:-4}
DELTA_T=${DELTA_T:-5}
export HF_HUB_OFFLINE=1
DATA="$WORK/data"

lrsurgery assets bbc-news -o "$DATA" --overwrite
TRAIN=(--data "$DATA/train.jsonl" --prompt-template $'Article: {text:.'"$CHARS"$'}\nTopic:' --response-template ' {label}'
  --seq-len "$SEQ_LEN" --batch-size "$BATCH" --max-steps "$STEPS" --lr "$LR" --warmup-ratio 0.1 --seed 0
  --eval-data "$DATA/test.jsonl")
SCREEN=(--k-final $(( R_EXPERT * 3 / 4 > 0 ? R_EXPERT * 3 / 4 : 1 )) --t1 0.15 --t2 0.5 --delta-t "$DELTA_T")

runs=()
for row in e-only shared-only expert-only all; do
  lrsurgery init "$MODEL" --method dual --r-share "$R_SHARE" --r-expert "$R_EXPERT" --ablation "$row" \
    -o "$WORK/init-$row" --overwrite
  extra=()
  [[ $row == expert-only || $row == all ]] && extra=("${SCREEN[@]}")
  lrsurgery train "$WORK/init-$row" "${TRAIN[@]}" "${extra[@]}" -o "$WORK/run-$row" --overwrite
  runs+=("$WORK/run-$row")
done
lrsurgery init "$MODEL" --method lora --rank $(( R_SHARE + R_EXPERT )) --dropout 0.05 -o "$WORK/init-lora" --overwrite
lrsurgery train "$WORK/init-lora" "${TRAIN[@]}" -o "$WORK/run-lora" --overwrite
runs+=("$WORK/run-lora")

python - "${runs[@]}" <<'PY' | tee "$WORK/heldout.md"
import json, sys
from pathlib import Path
print("| run | held-out loss | trainable parameters |\n|---|---|---|")
for run in sys.argv[1:]:
    extra = json.loads((Path(run) / "manifest.json").read_text())["extra"]
    print(f"| {Path(run).name} | {extra['eval']['loss']:.4f} | {extra['trainable_parameters']} |")
PY
