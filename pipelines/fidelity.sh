#!/usr/bin/env bash
# Method-fidelity ablation on SmolLM2-135M + BBC News topics (SFT), equal budget, steps, data order per seed:
#   TLoRA with its covariance raw vs centered × its per-module scale by the paper's Eq. 7 vs the released
#   code's rule (one calibration, one init per variant), and dual with the screened-out experts' gates
#   zeroed (Eq. 17) vs masked straight-through (one init per seed). Held-out loss mean ± std over seeds.
# Usage: pipelines/fidelity.sh [WORK_DIR]   (default: runs/fidelity); SEEDS, STEPS, RANK, LR, BATCH, SEQ_LEN,
# R_SHARE, R_EXPERT, DELTA_T override. The paper-sized values: TLoRA r = α = 32-128 on Llama-2-7B (Tables
# 8-10); DMC-LoRA Table 1 (`lrsurgery presets`).
set -euo pipefail
WORK=${1:-runs/fidelity}
MODEL=${MODEL:-smollm2-135m}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-40}
RANK=${RANK:-8}
LR=${LR:-5e-4}
BATCH=${BATCH:-8}
SEQ_LEN=${SEQ_LEN:-128}
R_SHARE=${R_SHARE:-4}
R_EXPERT=${R_EXPERT:-8}
DELTA_T=${DELTA_T:-4}
export HF_HUB_OFFLINE=1
DATA="$WORK/data"
here=$(dirname "$0")
start=$(date +%s)
TEMPLATES=(--prompt-template $'Article: {text:.400}\nTopic:' --response-template ' {label}')
TRAIN=(--data "$DATA/train.jsonl" "${TEMPLATES[@]}" --seq-len "$SEQ_LEN" --batch-size "$BATCH"
  --max-steps "$STEPS" --lr "$LR" --warmup-ratio 0.1 --eval-data "$DATA/test.jsonl")

[ -d "$DATA" ] || lrsurgery assets bbc-news -o "$DATA"
# TLoRA's calibration: 32 samples (Table 13), covariances with per-sequence sums and sensitivities
[ -d "$WORK/stats" ] || lrsurgery calibrate "$MODEL" --data "$DATA/train.jsonl" "${TEMPLATES[@]}" \
  --samples 32 --seq-len "$SEQ_LEN" -o "$WORK/stats"

for covariance in raw centered; do
  for rule in paper released; do
    v="tlora-$covariance-$rule"
    [ -d "$WORK/init-$v" ] || lrsurgery init "$MODEL" --method tlora --stats "$WORK/stats" --rank "$RANK" \
      --alpha "$RANK" --covariance "$covariance" --alpha-rule "$rule" -o "$WORK/init-$v"
    for seed in $SEEDS; do
      [ -d "$WORK/run-$v-$seed" ] || lrsurgery train "$WORK/init-$v" "${TRAIN[@]}" --seed "$seed" \
        -o "$WORK/run-$v-$seed"
    done
  done
done
for seed in $SEEDS; do
  [ -d "$WORK/init-dual-$seed" ] || lrsurgery init "$MODEL" --method dual --r-share "$R_SHARE" \
    --r-expert "$R_EXPERT" --seed "$seed" -o "$WORK/init-dual-$seed"
  for masking in zero straight-through; do
    [ -d "$WORK/run-dual-$masking-$seed" ] || lrsurgery train "$WORK/init-dual-$seed" "${TRAIN[@]}" \
      --seed "$seed" --t1 0.15 --t2 0.5 --delta-t "$DELTA_T" --masking "$masking" -o "$WORK/run-dual-$masking-$seed"
  done
done
python "$here/seed_table.py" "$WORK" tlora-raw-paper tlora-raw-released tlora-centered-paper \
  tlora-centered-released dual-zero dual-straight-through --seeds $SEEDS
echo "fidelity pipeline finished in $(( $(date +%s) - start ))s"
