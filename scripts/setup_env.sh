#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv: torch, Detectron2 and fsaf_d2.
# Idempotent: a second run only checks what is installed and returns in a few seconds.
#
#   bash scripts/setup_env.sh            # creates .venv next to this repository's setup.py
#   VENV=/path/to/venv bash scripts/setup_env.sh
#   PYTHON=python3.11 bash scripts/setup_env.sh
#
# Detectron2 has no official PyPI release. If the interpreter already imports an upstream Detectron2
# (e.g. installed from its git repository), that install is kept. Otherwise sal-detectron2 0.7.2
# (upstream main a59f0563 as pure Python) is installed with pip's --target trick, see docs/install.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

TORCH_SPEC="torch==2.14.1"
TORCHVISION_SPEC="torchvision==0.29.1"
D2_DEPS=(
  "setuptools>=77.0.3,<81" "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" "pycocotools>=2.0.2"
  "faster-coco-eval>=1.6"
  "omegaconf>=2.1,<2.4" "hydra-core>=1.1" "yacs>=0.1.8" "termcolor>=1.1" tabulate cloudpickle
  "tqdm>4.29.0" tensorboard matplotlib packaging "Pillow>=7.1" "opencv-python-headless" "pytest" "pytest-timeout"
  "onnx>=1.16" "onnxruntime>=1.17" "submitit>=1.5"
)
D2_WHEEL="sal-detectron2==0.7.2"
STAMP="$VENV/.fsaf_d2_env_stamp"
STAMP_VALUE="$TORCH_SPEC $TORCHVISION_SPEC ${D2_DEPS[*]} $D2_WHEEL v4"

log() { printf '[setup_env] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_VALUE" ] \
   && "$PY" -c "import torch, torchvision, detectron2, fsaf_d2" >/dev/null 2>&1; then
  if ! "$PY" -c "import fsaf_d2.tools" >/dev/null 2>&1; then
    # an editable install made before tools/ was mapped to fsaf_d2.tools: its console scripts are stale
    log "re-installing fsaf_d2 in editable mode (console scripts of tools/)"
    "${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
  fi
  log "environment up to date ($VENV)"
  exit 0
fi

if ! "$PY" -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0]) == ('2.14.1', '0.29.1') else 1)" >/dev/null 2>&1; then
  log "installing $TORCH_SPEC $TORCHVISION_SPEC (about a minute, several GB)"
  "${PIP[@]}" install "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi

log "installing Detectron2's dependencies (and faster-coco-eval, opencv, onnx/onnxruntime, pytest, submitit)"
"${PIP[@]}" install "${D2_DEPS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"$PY" -c "import fvcore, iopath, pycocotools, faster_coco_eval, cv2, onnxruntime, pytest, submitit" || { log "dependency install failed"; exit 1; }

if "$PY" -c "import detectron2, sys; sys.exit(0 if hasattr(__import__('detectron2.utils.comm', fromlist=['x']), 'create_local_process_group') else 1)" >/dev/null 2>&1 \
   && ! "$PY" -m pip show -q sal-detectron2 >/dev/null 2>&1; then
  log "an upstream Detectron2 is already installed: keeping it"
else
  SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  log "installing $D2_WHEEL into $SITE (pure Python, --target trick)"
  "${PIP[@]}" install --no-deps --only-binary=:all: --python-version 3.10 --upgrade --target "$SITE" "$D2_WHEEL"
  # the wheel's _C is built for CPython 3.10 and never loads on 3.11; it is dead weight
  rm -f "$SITE"/detectron2/_C.cpython-310-*.so
fi

log "installing fsaf_d2 in editable mode"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"

"$PY" -c "import detectron2, fsaf_d2, torch; print('[setup_env] torch', torch.__version__, '| detectron2', detectron2.__version__, '| fsaf_d2', fsaf_d2.__version__)"
echo "$STAMP_VALUE" > "$STAMP"
