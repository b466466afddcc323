#!/usr/bin/env bash
# PiSSA (Meng et al., 2024): A, B from the top-r singular triplets of W, the residual kept frozen.
# SmolLM2-135M learns BBC News topics: init → train → fuse → eval (base vs fine-tuned, held-out articles).
# Usage: pipelines/pissa.sh [WORK_DIR]   (default: runs/pissa); the variables below override.
# The paper's 7B values (Llama-2-7B on MetaMathQA): RANK=128 ALPHA=128 LR=2e-5, batch 128, cosine,
# warmup 0.03, 1 epoch; sized here for 2 CPU cores.
set -euo pipefail
WORK=${1:-runs/pissa}
MODEL=${MODEL:-smollm2-135m}
RANK=${RANK:-8}
ALPHA=${ALPHA:-8}
LR=${LR:-3e-4}
STEPS=${STEPS:-60}
BATCH=${BATCH:-8}
source "$(dirname "$0")/recipe.sh"

lrsurgery init "$MODEL" --method pissa --rank "$RANK" --alpha "$ALPHA" -o "$WORK/init" --overwrite
train_fuse_eval
