#!/bin/bash
# Multi-node DistributedDataParallel training under SLURM: one torchrun per node, torchrun's own
# c10d rendezvous on the first node. An example: adapt partition, GPUs, paths and train.py flags.
#
#   sbatch scripts/slurm_train.sh            (2 nodes x 4 GPUs = 8 processes)
#
# --batch_size is per process: 8 processes at --batch_size 8 train 64 samples per iteration.
# --checkpoints_dir must be on a file system every node sees (rank 0 writes, all ranks read on resume).
# Resume after a time-out or preemption: resubmit with --continue_train (every rank loads the same
# latest_* checkpoint and its own random state).
#SBATCH --job-name=healthivert-ddp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-4}
DATAROOT=${DATAROOT:-/data/verse/straightened}
CHECKPOINTS=${CHECKPOINTS:-/shared/checkpoints}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS_PER_NODE ))

srun torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_node:29500" \
    train.py --dataroot "$DATAROOT" --name hv_sagittal --model healthivert \
        --dataset_mode aligned_sagittal --checkpoints_dir "$CHECKPOINTS" \
        --batch_size 8 --num_threads 4 "$@"
