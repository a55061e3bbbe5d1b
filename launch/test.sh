#!/usr/bin/env bash
# The test command (README and .ci/run): set up .venv, lint, run the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
.venv/bin/ruff check jc2a tests
.venv/bin/python -m pytest -q "$@"
