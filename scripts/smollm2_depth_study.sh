#!/usr/bin/env bash
# The SmolLM2-135M depth study of docs/results.md, on CPU: diagnose, then evaluate the full model and the model
# without its least important layer and its least important n-layer span (both by removal_delta_loss).
# Usage: scripts/smollm2_depth_study.sh [OUT]    (env: TOKENS, N_SPAN, FULL_LIMIT, PRUNED_LIMIT)
# A step whose output already exists is skipped, so an interrupted study continues where it stopped.
set -euo pipefail
OUT=${1:-runs/smollm2}
TOKENS=${TOKENS:-4096}
N_SPAN=${N_SPAN:-4}
FULL_LIMIT=${FULL_LIMIT:-2000}     # HellaSwag items for the full model (the published-score check)
PRUNED_LIMIT=${PRUNED_LIMIT:-300}  # items per task for each pruned model (the first items of the same order)
PY=${PY:-.venv/bin/python}
LW=${LW:-.venv/bin/layerwise}
GGUF=$($PY -c "from layerwise.loading import smollm2_gguf; print(smollm2_gguf())")
mkdir -p "$OUT"
stamp() { date -u +%H:%M:%S; }

done_or() { [ -f "$1" ] && echo "$(stamp) have $1" || "${@:2}"; }

echo "$(stamp) diagnose ($TOKENS tokens)"
done_or "$OUT/diagnosis/diagnosis.json" \
  $LW diagnose "$GGUF" --tokens "$TOKENS" --seq-len 512 --batch-size 2 --n-span "$N_SPAN" --out "$OUT/diagnosis"
read -r LAYER SPAN < <($PY - "$OUT/diagnosis/diagnosis.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
n, metrics = m["n_span"], m["metrics"]
layer = min(range(m["n_layers"]), key=lambda i: metrics["removal_delta_loss"][i])
first = min(range(len(metrics["span_removal_delta_loss"])), key=lambda i: metrics["span_removal_delta_loss"][i])
print(layer, f"{first}-{first + n - 1}")
PY
)
echo "$(stamp) least important layer $LAYER, span $SPAN"

echo "$(stamp) full model: HellaSwag x $PRUNED_LIMIT and LAMBADA x $PRUNED_LIMIT (as the pruned models), then HellaSwag x $FULL_LIMIT"
done_or "$OUT/full/eval.json" $LW eval "$GGUF" --tasks hellaswag,lambada --limit "$PRUNED_LIMIT" --out "$OUT/full"
for drop in "$LAYER" "$SPAN"; do
  echo "$(stamp) without layers $drop: HellaSwag and LAMBADA x $PRUNED_LIMIT"
  done_or "$OUT/drop-$drop/eval.json" \
    $LW eval "$GGUF" --apply "drop=$drop" --tasks hellaswag,lambada --limit "$PRUNED_LIMIT" --out "$OUT/drop-$drop"
done
echo "$(stamp) full model: HellaSwag x $FULL_LIMIT (the check against the published score)"
done_or "$OUT/full-hellaswag/eval.json" $LW eval "$GGUF" --tasks hellaswag --limit "$FULL_LIMIT" --out "$OUT/full-hellaswag"
# The eval table in the report: the full model's scores next to the diagnosis.
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
full = json.loads((out / "full/eval.json").read_text())
full["tasks"]["hellaswag"] = json.loads((out / "full-hellaswag/eval.json").read_text())["tasks"]["hellaswag"]
(out / "diagnosis/eval.json").write_text(json.dumps(full, indent=1))
PY
$LW report "$OUT/diagnosis"
echo "$(stamp) done: $OUT"
