#!/usr/bin/env bash
# The GPU measurements in one command, sized to finish within 8 minutes on one H200 (or H100):
#
#   bash bench/gpu_suite.sh [OUT_DIR]          # default OUT_DIR: bench-gpu; writes OUT_DIR/gpu_suite.json
#
# 1. training throughput at 124m, batch 32 x 1024, bf16 autocast, torch.compile, fused AdamW: the
#    nanoGPT-style reference and the presets below, tokens/s, ratio to the reference, MFU, peak memory
#    (bench/throughput.py);
# 2. the AttnRes depth mix alone: our reference and fast paths and the fused-kernel packages that are
#    installed, timed and checked against the reference (bench/attnres_kernels.py);
# 3. the full trainer step vs the bare model step, with the data pipeline's share (bench/trainer.py);
# 4. `diagnose` on a SmolLM2-135M-shaped model at 65,536 tokens vs the naive approach (bench/diagnose.py;
#    random weights of SmolLM2's shape: its 513 MB of real weights do not travel to a lent machine, and the
#    timings do not depend on the values);
# 5. the CUDA-only tests (tests that skip without a GPU).
# Each part runs under its own time limit, so one slow part costs only its share and the JSON still gets
# written with what finished. It needs only the packages a PyTorch GPU image has: layerwise runs from src/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu_suite.sh needs a CUDA GPU')" || exit 2
start=$(date +%s)

part() {  # part NAME SECONDS COMMAND...: run one measurement, keep its log, note its exit code
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - start ))s into the suite)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "${PIPESTATUS[0]}" > "$out/$name.rc"
}

part throughput 240 $PY bench/throughput.py --size 124m --batch 32 --seq 1024 --warmup 4 --steps 15 --repeats 1 --compile \
  --presets pre-ln,pre-rmsnorm,lns,dyt,block-attnres,attnres --out "$out/throughput.json"
part attnres_kernels 60 $PY bench/attnres_kernels.py --json "$out/attnres_kernels.json"
part trainer 80 $PY bench/trainer.py --size 124m --preset pre-ln --batch 32 --seq 1024 --steps 30 \
  --out "$out/trainer.json"
part diagnose 90 $PY bench/diagnose.py --device cuda --tokens 65536 --model smollm2-random --json "$out/diagnose.json"
part gpu_tests 30 $PY -m pytest -q -p no:cacheprovider tests/test_attnres_fast.py -k cuda

$PY - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
suite = {"device": None, "parts": {}}
try:
    import torch
    suite["device"] = f"{torch.cuda.get_device_name()}; torch {torch.__version__}"
except Exception as err:  # the summary is still written
    suite["device"] = repr(err)
for name in ("throughput", "attnres_kernels", "trainer", "diagnose", "gpu_tests"):
    rc = out / f"{name}.rc"
    part = {"exit_code": int(rc.read_text()) if rc.exists() else None}
    result = out / f"{name}.json"
    if result.exists():
        part["result"] = json.loads(result.read_text())
    log = out / f"{name}.log"
    if log.exists():
        part["log_tail"] = log.read_text()[-2000:]
    suite["parts"][name] = part
(out / "gpu_suite.json").write_text(json.dumps(suite, indent=1))
print(f"wrote {out / 'gpu_suite.json'}")
EOF
echo "suite took $(( $(date +%s) - start ))s"
