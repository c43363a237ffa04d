#!/usr/bin/env bash
# The GPU check of issue 17 (bench/gpu_check.py says what it runs and why): one command for a lent GPU machine.
#   scripts/gpu-check.sh [--cpu] [--budget SECONDS] [--parts lora,qlora,loftq,ddp,vllm] [--json-out PATH]
# There python3 is the image's (torch with CUDA); the packages it lacks travel in .gpu-site/, built beforehand by
# scripts/gpu-site.sh where PyPI is reachable and carried with the working tree (device tool: carry [".gpu-site"]).
# --cpu: the smoke mode, runnable anywhere (tests/unit/test_gpu_check.py runs it). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=""  # built for the lent image's Python 3.12: on another Python its compiled packages would not load
if [ -d .gpu-site ] && "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    SITE=":$PWD/.gpu-site"
fi
export PYTHONPATH="$PWD$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" -m bench.gpu_check "$@"
