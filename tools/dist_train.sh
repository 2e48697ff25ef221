#!/usr/bin/env bash
# Usage: bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]
# (NNODES, NODE_RANK, MASTER_ADDR, PORT and PYTHON are read from the environment.)
exec bash "$(dirname "$0")/dist_launch.sh" "$2" "$(dirname "$0")/train.py" "$1" "${@:3}"
