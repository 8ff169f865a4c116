#!/usr/bin/env bash
# The SmolLM2-135M reshape study of docs/results.md, on CPU: layers removed by each pruning strategy, a short
# heal, and a layer program that repeats the middle layers (tied and materialised), all scored on the same
# first LIMIT items of LAMBADA and HellaSwag.
# Usage: scripts/smollm2_reshape_study.sh [OUT]   (env: LIMIT, REMOVE, CAL_TOKENS, HEAL_TOKENS, PROGRAM, TASKS)
# A step whose output already exists is skipped, so an interrupted study continues where it stopped.
set -euo pipefail
OUT=${1:-runs/smollm2-reshape}
LIMIT=${LIMIT:-500}
REMOVE=${REMOVE:-"2 4 6 8"}
CAL_TOKENS=${CAL_TOKENS:-1024}           # calibration tokens for the strategies (2 windows of 512 of the embedded Shakespeare)
HEAL_TOKENS=${HEAL_TOKENS:-32768}        # tokens of continued training for the healed 4-layer model
PROGRAM=${PROGRAM:-"0-17,12-17,18-29"}   # layers 12-17 run twice: 36 positions from 30 layers
TASKS=${TASKS:-lambada,hellaswag}
PY=${PY:-.venv/bin/python}
LW=${LW:-.venv/bin/layerwise}
GGUF=$($PY -c "from layerwise.loading import smollm2_gguf; print(smollm2_gguf())")
mkdir -p "$OUT/models" "$OUT/eval"
stamp() { date -u +%H:%M:%S; }
done_or() { [ -f "$1" ] && echo "$(stamp) have $1" || "${@:2}"; }
# Scores go to eval/TASKS-LIMIT/NAME, so a second pass with other tasks or items adds to the first.
score() {
  local dir="$OUT/eval/${TASKS//,/+}-$LIMIT/$1"
  done_or "$dir/eval.json" $LW eval "$2" --tasks "$TASKS" --limit "$LIMIT" --out "$dir" "${@:3}"
}
# The first N layers a plan removed, in the order it chose them (greedy rounds; removal by cost).
first_removed() {
  $PY - "$1" "$2" <<'PY'
import json, sys
plan, n = json.load(open(sys.argv[1])), int(sys.argv[2])
if plan["strategy"] == "greedy":
    order = [layer for r in plan["rounds"] for layer in r["removed"]]
else:  # removal: one round, candidates are single layers with their removal_delta_loss
    order = [c["layers"][0] for c in sorted(plan["rounds"][0]["candidates"], key=lambda c: c["value"])]
print(",".join(map(str, sorted(order[:n]))))
PY
}
MAX_N=$(echo $REMOVE | tr ' ' '\n' | sort -n | tail -1)

echo "$(stamp) SmolLM2-135M as safetensors (the GGUF de-quantized once; every later step reloads in a second)"
done_or "$OUT/models/full/config.json" $LW transform "$GGUF" --out "$OUT/models/full"
score full "$OUT/models/full"

# Greedy and removal choices are nested (N layers = the first N of the largest plan), so each is measured once.
for strategy in removal greedy; do
  done_or "$OUT/models/$strategy-$MAX_N/prune_plan.json" \
    $LW prune "$OUT/models/full" --remove "$MAX_N" --strategy "$strategy" --tokens "$CAL_TOKENS" --out "$OUT/models/$strategy-$MAX_N"
  for n in $REMOVE; do
    if [ "$n" != "$MAX_N" ]; then
      done_or "$OUT/models/$strategy-$n/config.json" \
        $LW prune "$OUT/models/full" --drop "$(first_removed "$OUT/models/$strategy-$MAX_N/prune_plan.json" "$n")" --out "$OUT/models/$strategy-$n"
    fi
    score "$strategy-$n" "$OUT/models/$strategy-$n"
  done
done
for n in $REMOVE; do  # Gromov's spans differ with n: one pass each
  done_or "$OUT/models/angular-$n/prune_plan.json" \
    $LW prune "$OUT/models/full" --remove "$n" --strategy angular --tokens "$CAL_TOKENS" --out "$OUT/models/angular-$n"
  score "angular-$n" "$OUT/models/angular-$n"
done

echo "$(stamp) heal the greedy 4-layer model: $HEAL_TOKENS tokens of the embedded Shakespeare"
done_or "$OUT/heal-greedy-4/metrics.jsonl" \
  $LW train --init-from "$OUT/models/greedy-4" --max-tokens "$HEAL_TOKENS" --batch-size 8 --seq-len 256 --lr 1e-4 \
    --schedule constant --set warmup=0 --out "$OUT/heal-greedy-4"
score greedy-4-healed "$OUT/heal-greedy-4"

echo "$(stamp) layer program $PROGRAM: materialised (saved) and tied (in memory)"
done_or "$OUT/models/program/config.json" $LW transform "$OUT/models/full" --apply "layers=$PROGRAM" --out "$OUT/models/program"
score program "$OUT/models/program"
score program-tied "$OUT/models/full" --apply "layers=$PROGRAM:tie"
echo "$(stamp) done: $OUT"
