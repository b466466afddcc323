#!/usr/bin/env bash
# Quickstart: SmolLM2-135M learns BBC News topics.
#   init (PiSSA) → train (SFT on topic labels) → fuse → eval base vs fine-tuned on held-out articles.
# Usage: pipelines/quickstart.sh [WORK_DIR]   (default: runs/quickstart)
set -euo pipefail
WORK=${1:-runs/quickstart}
MODEL=${MODEL:-smollm2-135m}
STEPS=${STEPS:-30}
export HF_HUB_OFFLINE=1
export BBC_DATA="$WORK/data"
start=$(date +%s)

lrsurgery assets bbc-news -o "$BBC_DATA" --overwrite
lrsurgery init "$MODEL" --method pissa --rank 8 -o "$WORK/init" --overwrite
lrsurgery train "$WORK/init" --data "$BBC_DATA/train.jsonl" \
  --prompt-template $'Article: {text:.400}\nTopic:' --response-template ' {label}' \
  --seq-len 128 --batch-size 8 --max-steps "$STEPS" --lr 3e-4 --warmup-ratio 0.1 \
  -o "$WORK/run" --overwrite
lrsurgery fuse "$WORK/run" -o "$WORK/merged" --overwrite
lrsurgery eval "$MODEL" "$WORK/merged" --task examples/tasks/bbc_topic.yaml -o "$WORK/results.json" --overwrite

python - "$WORK/results.json" "$MODEL" "$WORK/merged" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
base, tuned = (results[m]["bbc_topic"]["acc"] for m in sys.argv[2:4])
print(f"held-out BBC topic accuracy: base {base:.3f} -> fine-tuned {tuned:.3f}")
PY
echo "quickstart finished in $(( $(date +%s) - start ))s; results in $WORK/results.json"
