#!/bin/bash
# Segment a folder of tomograms (TCF, .npy, .tif) on a Slurm cluster: one array task per GPU.
#
#   sbatch --array=0-7 deploy/slurm-segment.sh /data/tomograms /data/labels
#
# Each task runs `deepis segment ... ` on its shard: deepis reads SLURM_ARRAY_TASK_ID and
# SLURM_ARRAY_TASK_COUNT (and SLURM_ARRAY_TASK_MIN, so --array=1-8 works too) and takes input i
# of the sorted list when i mod COUNT == its index. Outputs are complete or absent (temporary file
# + rename); a re-submission (the same command) skips every input whose labels and provenance
# sidecar are already there, so after a node failure only the missing inputs are redone.
# Failed inputs are listed in OUT/failed-<task>.txt; the task then exits with status 3.
#SBATCH --job-name=deepis-segment
#SBATCH --gpus-per-task=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=deepis-%A_%a.log
set -euo pipefail

IN=${1:?usage: sbatch --array=0-N deploy/slurm-segment.sh INPUT_DIR OUT_DIR [WEIGHTS]}
OUT=${2:?usage: sbatch --array=0-N deploy/slurm-segment.sh INPUT_DIR OUT_DIR [WEIGHTS]}
WEIGHTS=${3:-${DEEPIS_WEIGHTS:-weights/deepis-synth-w16.safetensors}}
DEEPIS=${DEEPIS:-deepis}   # the binary: target/release/deepis, or on PATH

# --backend cuda: fail rather than fall back to the CPU when the allocated GPU is not usable.
exec "$DEEPIS" segment --weights "$WEIGHTS" "$IN" -o "$OUT" --backend cuda --keep-going --format tif
