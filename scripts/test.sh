#!/usr/bin/env bash
# The test command: lint, then the whole test suite (run from the repository root).
set -euo pipefail
ruff check src tests benchmarks examples
python -m pytest -q -p no:cacheprovider "$@"
