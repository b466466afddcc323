#!/usr/bin/env bash
# TLoRA (Lin et al., 2026): calibrate → init (A frozen from W·C, ranks and scales by sensitivity) → train
# (B only) → fuse → eval. SmolLM2-135M learns BBC News topics.
# Usage: pipelines/tlora.sh [WORK_DIR]   (default: runs/tlora); the variables below override.
# The calibration is reused when STATS already holds one of the same model, data and settings (their
# fingerprints decide, not the folder name), so other runs and `lrsurgery compare` can share it.
# The paper's 7B values (Table 10, Llama-2-7B math/code/chat): RANK=128 ALPHA=128 LR=2e-5, batch 128,
# cosine, warmup 0.03, 1 epoch, 32 calibration samples (`--preset tlora-math`); sized here for 2 CPU cores.
set -euo pipefail
WORK=${1:-runs/tlora}
MODEL=${MODEL:-smollm2-135m}
RANK=${RANK:-8}
ALPHA=${ALPHA:-8}
LR=${LR:-5e-4}
STEPS=${STEPS:-60}
BATCH=${BATCH:-8}
SAMPLES=${SAMPLES:-32}
STATS=${STATS:-runs/stats/$MODEL-bbc-news}
source "$(dirname "$0")/recipe.sh"

lrsurgery calibrate "$MODEL" --data "$DATA/train.jsonl" "${TEMPLATES[@]}" --samples "$SAMPLES" --seq-len "$SEQ_LEN" \
  --reuse -o "$STATS"
lrsurgery init "$MODEL" --method tlora --stats "$STATS" --rank "$RANK" --alpha "$ALPHA" -o "$WORK/init" --overwrite
train_fuse_eval
