#!/usr/bin/env bash
# The one command for a session with a lent GPU: every GPU figure (benchmarks/gpu_check.py) in
# under 6 minutes, written to $OUT/gpu_check (gpu_check.json, gpu_check.md). The script stops
# each section at its own time limit; `timeout` is the last resort if something hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
timeout 420 python benchmarks/gpu_check.py --out "${OUT:-/tmp}/gpu_check" "$@"
