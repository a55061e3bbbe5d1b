#!/usr/bin/env bash
# python -m jc2a.runs.toy_tables --out runs/toy_tables --jobs 2 "$@"
# The paper's Tables 3 (6 rows x 5 seeds), 4 and 6 (x 3 seeds) on the toy data in the demo's regime (frozen
# pretrained backbone), each model evaluated 1- and 5-shot; per row mean +- std and the paired difference against
# the table's reference row with its 95% interval. The tables go into docs/RESULTS.md when every run is done.
# Resumable: run it again after a stop and it continues (finished runs are read back). A few CPU-hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m jc2a.runs.toy_tables --out runs/toy_tables --jobs 2 "$@"
