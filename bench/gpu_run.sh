#!/usr/bin/env bash
# The real-shape benchmark as one prepared command for a lent GPU machine (docs/PERFORMANCE.md).
#
#   bash bench/gpu_run.sh                      # BLIP-2 and LLaVA shapes, bf16, --quick, on cuda
#   bash bench/gpu_run.sh --shapes blip2       # any bench_editing.py arguments replace the defaults
#
# The machine brings its own python3 with a CUDA torch. Wheels in .whl/ (pinned versions the
# machine lacks, e.g. transformers==5.24.0; see docs/PERFORMANCE.md) are installed to /tmp/site
# first. JSON lines and the log go to $OUT when it is set (the device tool's result folder), else
# to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
out=${OUT:-bench/results}
mkdir -p "$out"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_machine.txt"
fi
"$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ $# -eq 0 ]; then
  set -- --shapes blip2,llava --device cuda --quick
fi
"$python" bench/bench_editing.py "$@" --out "$out/gpu.jsonl" 2>&1 | tee "$out/gpu.log"
