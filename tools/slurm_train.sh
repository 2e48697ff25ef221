#!/usr/bin/env bash
# Train on a Slurm cluster, one task per GPU (the mmdet / mmseg convention):
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] \
#     bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args...]
#
# e.g. GPUS=16 bash tools/slurm_train.sh gpu v2m_s configs/mask_rcnn/v2m_s_1x.py work_dirs/v2m_s
# srun starts GPUS tasks; tools/train.py --launcher slurm reads the SLURM_* variables srun sets
# (rank, world size, first node as master; MASTER_PORT from the environment, default 29500).
if [ $# -lt 4 ]; then
  echo "usage: bash $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args...]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/slurm_launch.sh" "$1" "$2" train.py "$3" --work-dir="$4" "${@:5}"
