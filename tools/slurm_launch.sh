#!/usr/bin/env bash
# Shared body of slurm_train.sh / slurm_test.sh: srun one task per GPU running a tool of ours.
#
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] [PYTHON=python] \
#     bash tools/slurm_launch.sh PARTITION JOB_NAME TOOL.py [tool args...]
#
# The tool gets --launcher=slurm and reads the SLURM_* variables srun sets (rank, world size,
# first node as master; MASTER_PORT from the environment, default 29500).
set -x
PARTITION=$1
JOB_NAME=$2
TOOL=$3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PYTHON=${PYTHON:-python}

PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
srun -p "${PARTITION}" \
    --job-name="${JOB_NAME}" \
    --gres=gpu:"${GPUS_PER_NODE}" \
    --ntasks="${GPUS}" \
    --ntasks-per-node="${GPUS_PER_NODE}" \
    --cpus-per-task="${CPUS_PER_TASK}" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    $PYTHON -u "$(dirname "$0")/${TOOL}" "${@:4}" --launcher="slurm"
