#!/bin/bash
# Fan a dataset out over a SLURM job array: task i of n straightens patients i, i+n, ... and then
# synthesises their vertebrae (--shard i/n: every n-th patient, starting at i). Tasks share nothing but
# the output folders; each output is written atomically and reruns skip finished items, so a failed
# or preempted task is simply resubmitted. An example: adapt partition, paths and flags.
#
#   sbatch --array=0-31 scripts/slurm_array_preprocess.sh
# (Synthesis task i reads the crops present when it starts; a patient with no crops shifts the patient
#  lists, so with few tasks per patient prefer two arrays, the second with --dependency=afterok:<first>,
#  and let check_outputs confirm. A task whose shard selects no crop stops with status 2.)
#   python -m util.check_outputs --stage straighten --dataroot "$DATAROOT"          # all tasks done?
#   python -m util.check_outputs --stage synthesis --dataroot "$DATAROOT" --output_dir "$OUT"
#   (exit status 1 lists what is missing: resubmit the array, finished items are skipped)
#SBATCH --job-name=healthivert-fanout
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --gpus=1
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail

DATAROOT=${DATAROOT:-/data/verse}             # raw/<pid>/... in, straightened/ out
CHECKPOINTS=${CHECKPOINTS:-/shared/checkpoints}
OUT=${OUT:-/shared/synthesis/hv_sagittal}
SHARD="${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK

python straighten/location_json_local.py --dataroot "$DATAROOT" --shard "$SHARD"
python straighten/straighten_mask_3d.py --dataroot "$DATAROOT" --shard "$SHARD"
python eval_3d_sagittal_twostage.py --dataroot "$DATAROOT/straightened" \
    --name hv_sagittal --checkpoints_dir "$CHECKPOINTS" --plane sagittal \
    --output_dir "$OUT" --shard "$SHARD"
