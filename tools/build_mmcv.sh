#!/usr/bin/env bash
# Build an mmcv 2.1.0 wheel from its PyPI sdist with the given Python's own pip/setuptools/torch.
#
#   [MMCV_WITH_OPS=1] [MAX_JOBS=2] bash tools/build_mmcv.sh PYTHON OUT_DIR
#
# Prints the built wheel's path as its last line. Used by tools/setup_env.sh (with the compiled
# ops) and by tests/packaging/test_mmcv_source_build.py (MMCV_WITH_OPS=0: mmcv's pure-Python
# wheel, named mmcv_lite, ~1 min),
# so the pip/setuptools interplay below is checked on every test run.
#
# Why --no-build-isolation on BOTH steps: mmcv 2.1.0's setup.py imports pkg_resources. An
# isolated build env gets the newest setuptools (>= 81 has no pkg_resources), and `pip download`
# of an sdist already runs that setup.py to prepare metadata. Without isolation both steps use the
# interpreter's pinned setuptools<81 (and its torch, which the ops build needs anyway).
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: [MMCV_WITH_OPS=0|1] bash $0 PYTHON OUT_DIR" >&2
  exit 2
fi
PY=$(command -v "$1")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute: the build runs in another dir
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
WITH_OPS=${MMCV_WITH_OPS:-1}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[build_mmcv] downloading the mmcv 2.1.0 sdist (MMCV_WITH_OPS=$WITH_OPS)" >&2
# The metadata step runs with the ops on whatever is asked: with MMCV_WITH_OPS=0 mmcv's setup.py
# names the project mmcv-lite, which pip download then rejects as not being mmcv.
MMCV_WITH_OPS=1 "$PY" -m pip download -q --no-deps --no-binary=:all: \
  --no-build-isolation mmcv==2.1.0 -d "$tmp" >&2
tar -xzf "$tmp"/mmcv-2.1.0.tar.gz -C "$tmp"
# torch >= 2.6 headers need C++20; mmcv 2.1.0's setup.py forces -std=c++17.
sed -i 's/-std=c++17/-std=c++20/g' "$tmp/mmcv-2.1.0/setup.py"
echo "[build_mmcv] building the wheel into $OUT" >&2
(cd "$tmp/mmcv-2.1.0" && MMCV_WITH_OPS=$WITH_OPS MAX_JOBS=${MAX_JOBS:-2} \
  "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$tmp/dist" >&2)
# MMCV_WITH_OPS=0 builds the same sources as the pure-Python project mmcv-lite.
whl=$(ls "$tmp"/dist/mmcv*-2.1.0-*.whl)
mv -f "$whl" "$OUT/"
echo "$OUT/$(basename "$whl")"
