#!/usr/bin/env bash
# accelerate launch --config_file configs/accelerate/ddp_1node.yaml --num_processes "${GPUS:-4}" -m jc2a train --config configs/coco20i.yaml "$@"
# One node, GPUS (default 4) GPUs, DDP over NCCL. train.batch_size is per process (4 x GPUS episodes a step);
# every process draws its own episodes from every shard, and the CKMM bank is built once, split over them.
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --config_file configs/accelerate/ddp_1node.yaml --num_processes "${GPUS:-4}" \
  -m jc2a train --config configs/coco20i.yaml "$@"
