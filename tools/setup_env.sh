#!/usr/bin/env bash
# One-command set-up of a CPU development environment in .venv (Python 3.11).
#
#   bash tools/setup_env.sh                # runtime + tests + mmaction2 (video) + onnx (export)
#   WITH_VIDEO=0 bash tools/setup_env.sh   # without mmaction2 (the video tests then skip)
#   WITH_DEPLOY=0 bash tools/setup_env.sh  # without onnx / onnxruntime / onnxscript (deploy tests skip)
#   VENV=/tmp/venv bash tools/setup_env.sh # another venv location
#
# Re-running is quick and idempotent.  mmcv 2.1.0 has no wheel on PyPI; a wheel is
# taken from pip's standard PIP_FIND_LINKS (or .wheelhouse/) when one there fits this
# torch, otherwise tools/build_mmcv.sh builds it from the sdist (~20 min on 2 idle cores).
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

# mmcv's own dependencies (addict, yapf, ...), without letting pip touch mmcv itself.
$PIP install -q addict packaging Pillow pyyaml yapf opencv-python
have_mmcv_ops() {
  $VENV/bin/python -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null
}
if ! have_mmcv_ops; then
  echo "[setup] mmcv 2.1.0: looking for a prebuilt wheel in PIP_FIND_LINKS=${PIP_FIND_LINKS:-<unset>} and .wheelhouse/"
  $PIP install -q --no-deps --only-binary=mmcv --find-links .wheelhouse mmcv==2.1.0 2>/dev/null || true
  if ! have_mmcv_ops; then  # none found, or one built for another torch
    echo "[setup] NOTE: no prebuilt mmcv 2.1.0 wheel fits; building it from the sdist with ops."
    echo "[setup] NOTE: a first build takes about 20 minutes on 2 idle cores. The wheel it leaves in"
    echo "[setup]       .wheelhouse/ is reused by later set-ups (or point PIP_FIND_LINKS at it)."
    whl=$(MMCV_WITH_OPS=1 bash tools/build_mmcv.sh "$VENV/bin/python" .wheelhouse | tail -1)
    $PIP install -q --no-deps --force-reinstall "$whl"
    have_mmcv_ops || { echo "[setup] ERROR: the mmcv wheel built from source does not import its ops" >&2; exit 1; }
  fi
fi

echo "[setup] mmdet / mmseg / mmpretrain"
$PIP install -q mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 \
  -r requirements/tests.txt
if [ "${WITH_VIDEO:-1}" = "1" ]; then
  $PIP install -q -r requirements/video.txt
fi
if [ "${WITH_DEPLOY:-1}" = "1" ]; then
  $PIP install -q -r requirements/deploy.txt
fi
# transformers breaks `import mmpretrain.models` with this torch; never keep it.
$PIP uninstall -q -y transformers 2>/dev/null || true

echo "[setup] mmssm (editable)"
$PIP install -q --no-deps --no-build-isolation -e .
$VENV/bin/python -c "import mmssm, mmdet.models, mmseg.models, mmpretrain.models; print('[setup] ok: mmssm', mmssm.__version__)"
