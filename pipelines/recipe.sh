# Shared by the method recipes (lora.sh, pissa.sh, tlora.sh, dual.sh, srlora.sh), sourced after they set
# WORK, MODEL, LR, STEPS, BATCH: the BBC News data, the training flags, and train → fuse → eval.
export HF_HUB_OFFLINE=1
SEQ_LEN=${SEQ_LEN:-128}
WARMUP=${WARMUP:-0.1}
DATA=${DATA:-runs/data/bbc-news}
export BBC_DATA="$DATA"
TEMPLATES=(--prompt-template $'Article: {text:.400}\nTopic:' --response-template ' {label}')
recipe_start=$(date +%s)
[ -f "$DATA/test.jsonl" ] || lrsurgery assets bbc-news -o "$DATA"

# train the init artifact in $WORK/init (extra flags: the method's training options), merge it into a
# standard model and score base and fine-tuned on the held-out articles
train_fuse_eval() {
  lrsurgery train "$WORK/init" --data "$DATA/train.jsonl" "${TEMPLATES[@]}" --seq-len "$SEQ_LEN" \
    --batch-size "$BATCH" --max-steps "$STEPS" --lr "$LR" --warmup-ratio "$WARMUP" --seed 0 \
    --eval-data "$DATA/test.jsonl" "$@" -o "$WORK/run" --overwrite
  lrsurgery fuse "$WORK/run" -o "$WORK/merged" --overwrite
  lrsurgery eval "$MODEL" "$WORK/merged" --task "$(dirname "${BASH_SOURCE[0]}")/../examples/tasks/bbc_topic.yaml" \
    -o "$WORK/results.json" --overwrite
  python - "$WORK/results.json" "$MODEL" "$WORK/merged" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
base, tuned = (results[m]["bbc_topic"]["acc"] for m in sys.argv[2:4])
print(f"held-out BBC topic accuracy: base {base:.3f} -> fine-tuned {tuned:.3f}")
PY
  echo "$(basename "$0") finished in $(( $(date +%s) - recipe_start ))s; merged model in $WORK/merged"
}
