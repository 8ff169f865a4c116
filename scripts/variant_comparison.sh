#!/usr/bin/env bash
# The seeds' depth variants side by side (docs/results.md, issue 14): tiny size on the ~46 MB corpus, 3 seeds,
# equal tokens (250k each: 123 steps x 8 x 256), CPU. About 75 runs of ~1 min on 2 quiet cores.
# Needs the corpus: scripts/install_corpus.sh, then
#   layerwise data build --sources large --out data/large --vocab-size 16384
# The running-statistics norms (UN, PowerNorm) get their own comparison because their released warm-ups
# (4000 and 10000 steps) are longer than these runs: there the warm-up is a quarter of the run, and the
# override, set for every preset of that command, is read by those two norms only. pre-rmsnorm is in both;
# its runs are the same in both (same seeds, same batches).
set -euo pipefail
DATA=${DATA:-data/large}
OUT=${OUT:-runs/variants}
COMMON=(--seeds 0,1,2 --size tiny --data "$DATA" --max-tokens 250k --batch-size 8 --seq-len 256 --lr 2e-3)
layerwise compare "${COMMON[@]}" --out "$OUT/all" --presets \
    pre-rmsnorm,lns,peri-ln,mix-ln,dyt,seednorm,bhyt,block-attnres,delta-block-attnres,satformer,bhyt-beta,bhyt-eta,bhyt-residual-aware,ssrmsnorm,iwd,hg,delta-block-attnres-released,satformer-softmax,satformer-softmax-sigmoid
layerwise compare "${COMMON[@]}" --out "$OUT/running-statistics" --presets pre-rmsnorm,prepbn,un,powernorm \
    --set model.un_warmup_steps=0.25 --set model.powernorm_warmup_steps=0.25
