#!/usr/bin/env bash
# Test on a Slurm cluster, one task per GPU (the mmdet / mmseg convention):
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] \
#     bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args...]
#
# tools/test.py --launcher slurm reads the SLURM_* variables srun sets (see slurm_train.sh).
if [ $# -lt 4 ]; then
  echo "usage: bash $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args...]" >&2
  exit 2
fi
exec bash "$(dirname "$0")/slurm_launch.sh" "$1" "$2" test.py "$3" "$4" "${@:5}"
