#!/usr/bin/env bash
# LoRA (Hu et al., 2021), the baseline: A Kaiming-uniform, B = 0. SmolLM2-135M learns BBC News topics:
#   init → train → fuse → eval (base vs fine-tuned, held-out articles).
# Usage: pipelines/lora.sh [WORK_DIR]   (default: runs/lora); the variables below override.
# The 7B comparisons of the papers (TLoRA Table 9, Llama-2-7B commonsense): RANK=32 ALPHA=32 LR=1e-4,
# batch 32, linear schedule, 1 epoch; sized here for 2 CPU cores.
set -euo pipefail
WORK=${1:-runs/lora}
MODEL=${MODEL:-smollm2-135m}
RANK=${RANK:-8}
ALPHA=${ALPHA:-16}
LR=${LR:-5e-4}
STEPS=${STEPS:-60}
BATCH=${BATCH:-8}
source "$(dirname "$0")/recipe.sh"

lrsurgery init "$MODEL" --method lora --rank "$RANK" --alpha "$ALPHA" -o "$WORK/init" --overwrite
train_fuse_eval
