#!/usr/bin/env bash
# Create .venv and install jc2a with its test tools; quick when nothing changed. Source it or run it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=.venv/.jc2a-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing jc2a and its dependencies into .venv (first time: a few minutes, torch is large)"
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
