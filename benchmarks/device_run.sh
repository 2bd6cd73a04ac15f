#!/usr/bin/env bash
# The prepared GPU call : install the carried wheels, run benchmarks/gpu.py inside the device
# tool's 10-minute command limit, and leave log.txt, results.json and results.md in $OUT (docs/gpu.md).
#
#   bash benchmarks/device_run.sh                     # on the GPU: every part, the table last
#   bash benchmarks/device_run.sh --only unet         # any gpu.py arguments pass through
#   bash benchmarks/device_run.sh --tiny              # the same on a CPU: a code-path check (a test runs it)
#
# Environment: PYTHON (python3), WHEELS (.whl: the carried wheels; empty = install nothing), OUT (where the
# results go; runs/gpu-bench without the device tool), BUDGET_S (no new row starts after it, 420),
# LIMIT_S (the whole run is stopped after it, 570).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}
OUT=${OUT:-$PWD/runs/gpu-bench}
mkdir -p "$OUT"
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  # --no-deps: each wheel is named on purpose; everything else comes from the machine's image
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ldm-wheels \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/ldm-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline \
  TOKENIZERS_PARALLELISM=false
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/log.txt"
fi
timeout --signal=INT --kill-after=10 "${LIMIT_S:-570}" "$PYTHON" benchmarks/gpu.py --out "$OUT" \
  --budget "${BUDGET_S:-420}" "$@" 2>&1 | tee -a "$OUT/log.txt"
