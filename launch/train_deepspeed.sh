#!/usr/bin/env bash
# accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes "${GPUS:-4}" -m jc2a train --config configs/coco20i.yaml "$@"
# DeepSpeed ZeRO-2 on one node through accelerate (pip install -e '.[deepspeed]' first). Same loop, same files.
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes "${GPUS:-4}" \
  -m jc2a train --config configs/coco20i.yaml "$@"
