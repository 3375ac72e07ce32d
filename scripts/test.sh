#!/usr/bin/env bash
# The test command: lint, type check, then the whole test suite (run from the repository root).
set -euo pipefail
ruff check src tests benchmarks examples
mypy  # src/ribbed, configured in pyproject.toml ([tool.mypy]: basic mode and the ratchet)
# --durations: every run names its 20 slowest tests (issue 14 asks for the whole suite under 5 min on 2 cores)
python -m pytest -q -p no:cacheprovider --durations=20 "$@"
