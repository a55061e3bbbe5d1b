#!/usr/bin/env bash
# The main job on the built-in toy data, CPU only (about 10 minutes on 2 cores once .venv exists):
# toy COCO 2014 -> webdataset shards -> CKMM bank -> training on fold 0's base classes -> evaluation 1- and 5-shot
# on fold 0's novel classes beside the untrained model and the all-foreground prediction -> reports, figures,
# a training curve and an MLflow run under runs/demo. Extra arguments go to `jc2a demo` (see `jc2a demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec jc2a demo "$@"
