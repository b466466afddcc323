#!/usr/bin/env bash
# SRLoRA (Yang et al., 2025): PiSSA, then the least important pairs fused into W and refilled from the next
# singular directions at every switch. SmolLM2-135M learns BBC News topics: init → train → fuse → eval.
# Usage: pipelines/srlora.sh [WORK_DIR]   (default: runs/srlora); the variables below override.
# The paper's values (DeBERTa-v3-base on GLUE; `--preset srlora-glue`): RANK=8 ALPHA=8, fusion ratio 0.5,
# β 0.85, no dropout, no weight decay, 500 warmup steps, R_TARGET 16-512 by task; sized here for 2 CPU cores.
set -euo pipefail
WORK=${1:-runs/srlora}
MODEL=${MODEL:-smollm2-135m}
RANK=${RANK:-8}
ALPHA=${ALPHA:-8}
R_TARGET=${R_TARGET:-32}
FUSION=${FUSION:-0.5}
LR=${LR:-3e-4}
STEPS=${STEPS:-60}
BATCH=${BATCH:-8}
source "$(dirname "$0")/recipe.sh"

lrsurgery init "$MODEL" --method srlora --rank "$RANK" --alpha "$ALPHA" --r-target "$R_TARGET" \
  -o "$WORK/init" --overwrite
train_fuse_eval --fusion-ratio "$FUSION"
