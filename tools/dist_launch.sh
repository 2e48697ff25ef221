#!/usr/bin/env bash
# Usage: bash tools/dist_launch.sh NUM_PROCS SCRIPT.py [args...]
# torchrun launcher shared by dist_train.sh / dist_test.sh: one process per GPU
# (nccl), or CPU processes over gloo when CUDA is absent.
NPROC=$1
SCRIPT=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}
PYTHONPATH="$(dirname "$0")/..":$PYTHONPATH \
exec $PYTHON -m torch.distributed.run \
    --nnodes=$NNODES --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
    --nproc_per_node=$NPROC --master_port=$PORT \
    "$SCRIPT" "${@:3}" --launcher pytorch
