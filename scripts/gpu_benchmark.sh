#!/usr/bin/env bash
# One-GPU check and benchmark for a machine without network (e.g. the lent H100/H200):
#   1. installs Detectron2 and its pure-Python dependencies offline from wheels in $WHL (default .whl/,
#      fetched beforehand with shared/baselines/d2_gpu/fetch_wheels.sh .whl on a machine with PyPI);
#   2. runs python -m fsaf_d2.benchmark: FSAF vs Detectron2's RetinaNet (+ static FSAF, the combined
#      model, FCOS) at batch 16, 800x1344, AMP fp16, with and without channels-last, and a profile;
#   3. a short real training run through train_net.py (1-GPU launch, AMP fp16) on the quickstart data.
# Results go to $OUT (default ./gpu_out). Usage: bash scripts/gpu_benchmark.sh [extra benchmark args]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PY:-python3}
WHL=${WHL:-$ROOT/.whl}
SITE=${SITE:-/tmp/fsaf_site}
OUT=${OUT:-$ROOT/gpu_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if ! "$PY" -c "import detectron2" >/dev/null 2>&1; then
  rm -rf "$SITE" && mkdir -p "$SITE"
  deps=()
  for w in "$WHL"/*.whl; do case "$(basename "$w")" in sal_detectron2-*|setuptools-*) ;; *) deps+=("$w") ;; esac; done
  "$PY" -c "import pkg_resources" >/dev/null 2>&1 || deps+=("$WHL"/setuptools-*.whl)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${deps[@]}" || exit 3
  # the sal-detectron2 wheel is tagged cp310; its code is pure Python: unzip detectron2/ without the .so
  "$PY" - "$SITE" "$WHL"/sal_detectron2-*.whl <<'PYEOF' || exit 3
import sys, zipfile
site, whl = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    z.extractall(site, members=[n for n in z.namelist() if n.startswith("detectron2/") and not n.endswith(".so")])
PYEOF
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, detectron2, fsaf_d2; print('torch', torch.__version__, '| detectron2', detectron2.__version__, '| fsaf_d2', fsaf_d2.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')" || exit 3
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

SIZE=${SIZE:-800x1344}
BATCH=${BATCH:-16}
MODELS=${MODELS:-fsaf retinanet fsaf_static fsaf_retinanet fcos}
for tag in ${LAYOUTS:-nchw cl}; do
  CL=$([ "$tag" = cl ] && echo --channels-last)
  echo "=== benchmark ($tag)"
  "$PY" -m fsaf_d2.benchmark --device "$DEVICE" --batch "$BATCH" --size "$SIZE" --amp fp16 --iters "${ITERS:-30}" \
    --warmup "${WARMUP:-10}" --infer-iters 20 --models $MODELS --profile $CL --out "$OUT/bench_$tag.json" "$@"
done

if [ -z "${SKIP_TRAIN:-}" ]; then
  echo "=== train_net.py: 1-GPU launch, AMP fp16, quickstart data"
  export FSAF_D2_DATASETS=/tmp/fsaf_quickstart
  "$PY" -m fsaf_d2.data.quickstart --if-missing --no-progress --num-train 256 --num-val 32
  "$PY" train_net.py --num-gpus 1 --config-file configs/quickstart_R18_FPN.yaml MODEL.DEVICE "$DEVICE" \
    SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION float16 SOLVER.MAX_ITER 60 SOLVER.STEPS "(50,)" \
    DATALOADER.NUM_WORKERS 4 OUTPUT_DIR "$OUT/train_amp" 2>&1 | tail -40
fi
ls -la "$OUT"
