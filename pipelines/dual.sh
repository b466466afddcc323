#!/usr/bin/env bash
# DMC-LoRA, "dual" (Cao et al., 2025): a shared PiSSA module and a gated expert module screened by importance.
# SmolLM2-135M learns BBC News topics: init → train (screening) → fuse → eval (base vs fine-tuned).
# Usage: pipelines/dual.sh [WORK_DIR]   (default: runs/dual); the variables below override.
# The paper's 7B values (Table 1, Commonsense 170k; `--preset dmc-commonsense`): R_SHARE=4 R_EXPERT=4
# ALPHA=32 LR=2e-5, batch 64, cosine, 1 epoch, T1=0.2 T2=0.5 DELTA_T=10 ORTH=0.3 K_FINAL=3; sized here for
# 2 CPU cores (a 60-step run screens every 5 steps so the schedule is visible).
set -euo pipefail
WORK=${1:-runs/dual}
MODEL=${MODEL:-smollm2-135m}
R_SHARE=${R_SHARE:-4}
R_EXPERT=${R_EXPERT:-4}
ALPHA=${ALPHA:-8}
LR=${LR:-5e-4}
STEPS=${STEPS:-60}
BATCH=${BATCH:-8}
T1=${T1:-0.2}
T2=${T2:-0.5}
DELTA_T=${DELTA_T:-5}
ORTH=${ORTH:-0.3}
K_FINAL=${K_FINAL:-3}
source "$(dirname "$0")/recipe.sh"

lrsurgery init "$MODEL" --method dual --r-share "$R_SHARE" --r-expert "$R_EXPERT" --alpha "$ALPHA" \
  -o "$WORK/init" --overwrite
train_fuse_eval --t1 "$T1" --t2 "$T2" --delta-t "$DELTA_T" --orth-weight "$ORTH" --k-final "$K_FINAL"
