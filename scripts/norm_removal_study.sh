#!/usr/bin/env bash
# The LayerNorm-removal study of docs/results.md, on CPU: a GPT-2-shaped Pre-LN layerwise model (LayerNorm,
# learned positions, tanh-GELU MLP, biases, tied head; 6 layers, d 256) pretrained on the large corpus, then
# fine-tuned for the same steps twice: with every norm removed (`layerwise remove-norms`, Baroni schedule
# scaled to the run) and vanilla with the same optimiser settings (lr 6e-4 -> 3e-4 cosine, warmup 20/300,
# weight decay 0.01). All three are scored on held-out token CE and diagnosed on the same held-out text.
# Usage: scripts/norm_removal_study.sh [OUT]   (env: DATA, BASE_TOKENS, FT_TOKENS, THREADS, WINDOWS)
# DATA is `layerwise data build --sources large --out data/large --vocab-size 16384` (scripts/install_corpus.sh).
# Every run resumes (--resume auto: a finished run returns at once), so an interrupted study continues where it
# stopped; the two fine-tunes run side by side (THREADS each). BASE may name an existing base run folder.
set -euo pipefail
OUT=${1:-runs/norm-removal}
BASE=${BASE:-$OUT/base}
DATA=${DATA:-data/large}
BASE_TOKENS=${BASE_TOKENS:-3M}
FT_TOKENS=${FT_TOKENS:-600K}   # 146 steps of 16 x 256 tokens (Baroni: 300 steps of 2^19 tokens)
THREADS=${THREADS:-1}
WINDOWS=${WINDOWS:-400}        # held-out windows of 256 tokens (the val split holds 583)
PY=${PY:-.venv/bin/python}
LW=${LW:-.venv/bin/layerwise}
SHAPE=(--seq-len 256 --set model.d_model=256 --set model.n_layers=6 --set model.n_heads=8
       --set model.position_embedding=learned --set model.mlp=gelu_tanh --set model.bias=true
       --set model.max_seq_len=256)
mkdir -p "$OUT"
stamp() { date -u +%H:%M:%S; }
done_or() { [ -f "$1" ] && echo "$(stamp) have $1" || "${@:2}"; }

echo "$(stamp) base: pre-ln, GPT-2 shaped, $BASE_TOKENS tokens"
$LW train --preset pre-ln --size tiny --data "$DATA" --max-tokens "$BASE_TOKENS" "${SHAPE[@]}" \
  --set threads="$THREADS" --resume auto --out "$BASE"

echo "$(stamp) fine-tunes: remove-norms and vanilla, $FT_TOKENS tokens each, side by side"
$LW remove-norms "$BASE" --data "$DATA" --max-tokens "$FT_TOKENS" --seq-len 256 --set threads="$THREADS" \
  --resume auto --out "$OUT/noln" > "$OUT/noln.log" 2>&1 &
without_norms=$!
$LW train --init-from "$BASE" --data "$DATA" --max-tokens "$FT_TOKENS" --seq-len 256 --lr 6e-4 \
  --set min_lr_ratio=0.5 --set warmup=0.0667 --set weight_decay=0.01 --set threads="$THREADS" \
  --resume auto --out "$OUT/vanilla" > "$OUT/vanilla.log" 2>&1 &
vanilla=$!
status=0
wait "$without_norms" || status=$?
wait "$vanilla" || status=$?
[ "$status" -eq 0 ] || { echo "a fine-tune failed: see $OUT/noln.log, $OUT/vanilla.log" >&2; exit "$status"; }

for name in base vanilla noln; do
  model="$OUT/$name"
  [ "$name" = base ] && model="$BASE"
  [ "$name" = noln ] && model="$OUT/noln/model"
  done_or "$OUT/eval/$name/eval.json" $LW eval "$model" --tasks perplexity --data "$DATA/val.bin" --seq-len 256 \
    --limit "$WINDOWS" --out "$OUT/eval/$name"
  done_or "$OUT/diagnose/$name/diagnosis.json" $LW diagnose "$model" --data "$DATA/val.bin" --tokens 16384 \
    --seq-len 256 --out "$OUT/diagnose/$name"
done
$PY scripts/norm_removal_table.py "$OUT" | tee "$OUT/table.md"
