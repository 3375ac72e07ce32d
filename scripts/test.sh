#!/usr/bin/env bash
# The test command: lint, type check, then the whole test suite (run from the repository root).
set -euo pipefail
ruff check src tests benchmarks examples
mypy  # src/ribbed, configured in pyproject.toml ([tool.mypy]: basic mode and the ratchet)
python -m pytest -q -p no:cacheprovider "$@"
