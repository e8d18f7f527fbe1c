#!/usr/bin/env bash
# The pipeline at paper model size on this machine's GPU(s): see bench/gpu_check.py (--help).
#   bash bench/gpu_check.sh              # paper size (NFNet-l0, 224 px), <= 5 minutes on one modern GPU
#   bash bench/gpu_check.sh --size ci    # a reduced size that runs in seconds on a CPU (the test suite runs it)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
exec "$PYTHON" -m bench.gpu_check "$@"
