#!/usr/bin/env bash
# srun accelerate launch --config_file configs/accelerate/multinode.yaml --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) --machine_rank $SLURM_PROCID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT -m jc2a train --config configs/coco20i.yaml "$@"
# N nodes x G GPUs under SLURM: submit with `sbatch --nodes 2 --ntasks-per-node 1 --gpus-per-node 4 launch/slurm.sh`.
# One task per node; accelerate starts the G processes of its node. The first node of the allocation is the
# rendezvous (MASTER_ADDR); shards, checkpoints and the run folder must be on a file system every node sees.
#SBATCH --job-name=jc2a
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-4}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export GPUS_PER_NODE MASTER_ADDR MASTER_PORT
# single quotes: $SLURM_PROCID is expanded by each task on its own node, not here
srun bash -c 'accelerate launch --config_file configs/accelerate/multinode.yaml \
  --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank "$SLURM_PROCID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  -m jc2a train --config configs/coco20i.yaml "$@"' _ "$@"
