#!/usr/bin/env bash
# Usage: bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args...]
# (NNODES, NODE_RANK, MASTER_ADDR, PORT and PYTHON are read from the environment.)
exec bash "$(dirname "$0")/dist_launch.sh" "$3" "$(dirname "$0")/test.py" "$1" "$2" "${@:4}"
