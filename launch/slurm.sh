#!/usr/bin/env bash
# srun accelerate launch --config_file configs/accelerate/multinode.yaml --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) --machine_rank $SLURM_PROCID --main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT -m jc2a train --config configs/coco20i.yaml --resume auto "$@"
# N nodes x G GPUs under SLURM: submit with `sbatch --nodes 2 --ntasks-per-node 1 --gpus-per-node 4 launch/slurm.sh`.
# One task per node; accelerate starts the G processes of its node. The first node of the allocation is the
# rendezvous (MASTER_ADDR); shards, checkpoints and the run folder must be on a file system every node sees.
# Preemption: SLURM sends SIGUSR1 two minutes before the end (--signal) and SIGTERM when it preempts; jc2a then
# finishes its step, writes a checkpoint and exits with status 75 (and writes $JC2A_PREEMPTED_FILE, as accelerate's
# launcher may not pass the status on). This script then requeues the job (`scontrol requeue`), which resumes
# from that checkpoint (`--resume auto`: the first start of a job has none and starts afresh).
#SBATCH --job-name=jc2a
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --requeue
#SBATCH --signal=USR1@120
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-4}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
JC2A_PREEMPTED_FILE="$PWD/.jc2a-preempted-${SLURM_JOB_ID:-local}"
rm -f "$JC2A_PREEMPTED_FILE"
export GPUS_PER_NODE MASTER_ADDR MASTER_PORT JC2A_PREEMPTED_FILE
# single quotes: $SLURM_PROCID is expanded by each task on its own node, not here
status=0
srun bash -c 'accelerate launch --config_file configs/accelerate/multinode.yaml \
  --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank "$SLURM_PROCID" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  -m jc2a train --config configs/coco20i.yaml --resume auto "$@"' _ "$@" || status=$?
if [ "$status" -eq 75 ] || [ -f "$JC2A_PREEMPTED_FILE" ]; then
  rm -f "$JC2A_PREEMPTED_FILE"
  echo "jc2a: preempted after a checkpoint; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
