#!/usr/bin/env bash
# The SmolLM2-135M per-layer quantization study of docs/results.md, on CPU: HQQ at a target average width
# (--avg-bits) with the layers ranked by each --order, scored on the first LIMIT items of LAMBADA and on held-out
# token perplexity; random order with 3 seeds as the control. Layers go to the lower of the two widths around
# the target, least important first (src/layerwise/diagnose/quantization.py).
# Usage: scripts/quantization_study.sh [MODEL] [OUT]   (env: BITS, ORDERS, SEEDS, WIDTHS, LIMIT, CAL_TOKENS,
#        PPL_SOURCES, PPL_WINDOWS)
# MODEL defaults to the SmolLM2-135M GGUF the reshape study uses (a safetensors folder of it works as well).
# Held-out perplexity is on the val split of `layerwise data build --sources PPL_SOURCES` tokenized with the
# model's tokenizer: the default, large, needs scripts/install_corpus.sh; PPL_SOURCES=shakespeare needs nothing
# but holds only a few windows. Calibration is the CLI's default, the start of the embedded Shakespeare, which
# is never in a val split.
# A step whose output already exists is skipped, so an interrupted study continues where it stopped; a plan
# that equals an earlier one (every order at a target that is itself a width, or two orders that agree) is
# scored once, and plans.tsv says which scores each model shares. Table: scripts/quantization_table.py OUT.
set -euo pipefail
PY=${PY:-.venv/bin/python}
LW=${LW:-.venv/bin/layerwise}
MODEL=${1:-$($PY -c "from layerwise.loading import smollm2_gguf; print(smollm2_gguf())")}
OUT=${2:-runs/smollm2-quant}
BITS=${BITS:-"8 6 5 4 3.5 3 2.5"}
ORDERS=${ORDERS:-"lim zd zd-inverse removal"}
SEEDS=${SEEDS:-"0 1 2"}                 # random order, one plan per seed
WIDTHS=${WIDTHS:-2,3,4,8}
LIMIT=${LIMIT:-500}                     # LAMBADA items
CAL_TOKENS=${CAL_TOKENS:-4096}          # calibration tokens for lim and removal (8 windows of 512)
PPL_SOURCES=${PPL_SOURCES:-large}
PPL_WINDOWS=${PPL_WINDOWS:-200}         # held-out windows of 512 tokens
mkdir -p "$OUT/models" "$OUT/eval"
stamp() { date -u +%H:%M:%S; }
done_or() { [ -f "$1" ] && echo "$(stamp) have $1" || "${@:2}"; }
# Scores go to eval/TASK-N/NAME (the layout scripts/reshape_table.py reads too).
score() {
  done_or "$OUT/eval/lambada-$LIMIT/$1/eval.json" \
    $LW eval "$2" --tasks lambada --limit "$LIMIT" --out "$OUT/eval/lambada-$LIMIT/$1"
  done_or "$OUT/eval/perplexity-$PPL_WINDOWS/$1/eval.json" \
    $LW eval "$2" --tasks perplexity --data "$OUT/data/val.bin" --seq-len 512 --limit "$PPL_WINDOWS" \
      --out "$OUT/eval/perplexity-$PPL_WINDOWS/$1"
}
is_width() { [[ ",$WIDTHS," == *",$1,"* ]]; }
# plans.tsv: name, target bits, order, seed, the quantize step, the name whose scores it has (itself if scored).
declare -A SCORED_AS
printf "name\ttarget\torder\tseed\tstep\tscored_as\n" > "$OUT/plans.tsv"
record() {  # NAME TARGET ORDER SEED STEP: score the model unless an earlier one had the same step
  local twin=${SCORED_AS[$5]:-}
  if [ -z "$twin" ]; then
    SCORED_AS[$5]=$1
    twin=$1
    score "$1" "$OUT/models/$1"
  else
    echo "$(stamp) $1 is $5, as $twin: scored once"
  fi
  printf "%s\t%s\t%s\t%s\t%s\t%s\n" "$1" "$2" "$3" "$4" "$5" "$twin" >> "$OUT/plans.tsv"
}
step_of() { $PY -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$1"; }

echo "$(stamp) SmolLM2-135M as safetensors (the GGUF de-quantized once; every later step reloads in a second)"
done_or "$OUT/models/full/config.json" $LW transform "$MODEL" --out "$OUT/models/full"
echo "$(stamp) held-out text ($PPL_SOURCES) in the model's tokens"
done_or "$OUT/data/val.bin" $LW data build --sources "$PPL_SOURCES" --tokenizer "$OUT/models/full" --out "$OUT/data"
score full "$OUT/models/full"
printf "%s\t%s\t%s\t%s\t%s\t%s\n" full 16 float "" "" full >> "$OUT/plans.tsv"

for bits in $BITS; do
  if is_width "$bits"; then  # every layer at that width whatever the order: one model, no calibration
    done_or "$OUT/models/uniform-$bits/config.json" \
      $LW quantize "$OUT/models/full" --bits "$bits" --out "$OUT/models/uniform-$bits"
    record "uniform-$bits" "$bits" uniform "" "quantize=$bits"
    continue
  fi
  for order in $ORDERS random; do
    for seed in $([ "$order" = random ] && echo $SEEDS || echo 0); do
      name="$order-$bits"
      [ "$order" = random ] && name="random-s$seed-$bits"
      done_or "$OUT/models/$name/quant_plan.json" \
        $LW quantize "$OUT/models/full" --avg-bits "$bits" --widths "$WIDTHS" --order "$order" --seed "$seed" \
          --tokens "$CAL_TOKENS" --out "$OUT/models/$name"
      record "$name" "$bits" "$order" "$([ "$order" = random ] && echo "$seed")" \
        "$(step_of "$OUT/models/$name/quant_plan.json")"
    done
  done
done
$PY scripts/quantization_table.py "$OUT" > "$OUT/table.md"
echo "$(stamp) done: $OUT (table: $OUT/table.md)"
