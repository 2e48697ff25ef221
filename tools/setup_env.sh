#!/usr/bin/env bash
# One-command set-up of a CPU development environment in .venv (Python 3.11).
#
#   bash tools/setup_env.sh            # runtime + tests
#   WITH_VIDEO=1 bash tools/setup_env.sh   # also mmaction2 (video configs)
#   WITH_DEPLOY=1 bash tools/setup_env.sh  # also onnx / onnxruntime / onnxscript (export)
#
# Re-running is quick and idempotent.  mmcv 2.1.0 has no wheel on PyPI; a wheel is
# taken from pip's standard PIP_FIND_LINKS when one there fits this torch, otherwise
# it is built from the sdist (about an hour on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip 'setuptools>=77.0.3,<81' wheel

echo "[setup] torch / torchvision / mmengine"
$PIP install -q torch==2.14.1 torchvision==0.29.1 mmengine==0.10.7 \
  numpy pycocotools ftfy regex ninja psutil

if ! $VENV/bin/python -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  echo "[setup] mmcv 2.1.0: looking for a prebuilt wheel in PIP_FIND_LINKS=${PIP_FIND_LINKS:-<unset>}"
  if ! $PIP install -q --no-deps --only-binary=mmcv mmcv==2.1.0 2>/dev/null; then
    echo "[setup] NOTE: no prebuilt mmcv 2.1.0 wheel fits; building it from the sdist with ops."
    echo "[setup] NOTE: a first build takes about an hour on 2 cores. Put the wheel it leaves in"
    echo "[setup]       .wheelhouse/ into a folder and point PIP_FIND_LINKS at it to reuse it."
    tmp=$(mktemp -d)
    $PIP download -q --no-deps --no-binary=:all: mmcv==2.1.0 -d "$tmp"
    tar -xzf "$tmp"/mmcv-2.1.0.tar.gz -C "$tmp"
    # torch >= 2.6 headers need C++20, mmcv 2.1.0's setup.py forces -std=c++17.
    sed -i 's/-std=c++17/-std=c++20/g' "$tmp/mmcv-2.1.0/setup.py"
    mkdir -p .wheelhouse
    (cd "$tmp/mmcv-2.1.0" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
      "$OLDPWD/$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps . -w "$OLDPWD/.wheelhouse")
    $PIP install -q --no-deps .wheelhouse/mmcv-2.1.0-*.whl
    rm -rf "$tmp"
  fi
  # mmcv's own dependencies (addict, yapf, ...), without letting pip touch mmcv itself.
  $PIP install -q addict packaging Pillow pyyaml yapf opencv-python
fi

echo "[setup] mmdet / mmseg / mmpretrain"
$PIP install -q mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 \
  -r requirements/tests.txt
if [ "${WITH_VIDEO:-0}" = "1" ]; then
  $PIP install -q -r requirements/video.txt
fi
if [ "${WITH_DEPLOY:-0}" = "1" ]; then
  $PIP install -q -r requirements/deploy.txt
fi
# transformers breaks `import mmpretrain.models` with this torch; never keep it.
$PIP uninstall -q -y transformers 2>/dev/null || true

echo "[setup] mmssm (editable)"
$PIP install -q --no-deps --no-build-isolation -e .
$VENV/bin/python -c "import mmssm, mmdet.models, mmseg.models, mmpretrain.models; print('[setup] ok: mmssm', mmssm.__version__)"
