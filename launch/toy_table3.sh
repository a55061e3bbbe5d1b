#!/usr/bin/env bash
# python -m jc2a.runs.toy_table3 --out runs/toy_table3 --seeds 0 1 2 --steps 500 "$@"
# The paper's Table 3 rows (baseline, +P2P, +P2B, +P2P+P2B, +CKMM, all) on the toy data, 3 training seeds each,
# 1-shot novel-class mIoU; the table goes into docs/RESULTS.md. About an hour on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m jc2a.runs.toy_table3 --out runs/toy_table3 --seeds 0 1 2 --steps 500 "$@"
