#!/usr/bin/env bash
# accelerate launch --config_file accelerate_config.yaml -m jc2a train --config configs/coco20i.yaml "$@"
# One GPU (an RTX 2080Ti is the default path), fp16, batch 4: the paper's setting. Extra arguments go to
# `jc2a train`, e.g. --config configs/fold/1.yaml data.shards=/data/shards/coco, or --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file accelerate_config.yaml -m jc2a train --config configs/coco20i.yaml "$@"
