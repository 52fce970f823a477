#!/usr/bin/env bash
# One-GPU check and benchmark for a machine without network (e.g. one H100 or H200):
#   1. installs Detectron2 and its pure-Python dependencies offline from wheels in $WHL (default .whl/,
#      filled beforehand on a machine with PyPI, see docs/benchmarks.md#bringing-the-wheels-to-a-machine-without-network);
#   2. runs python tools/benchmark.py: FSAF vs Detectron2's RetinaNet (+ static FSAF, the compiled static
#      step SOLVER.COMPILE, the combined model, FCOS) at batch 16, 800x1344, AMP fp16, each model as shipped
#      and all in NCHW, with a profile; before/after pairs of channels-last and FrozenBN folding, and of the
#      compile modes (--paired); python -m fsaf_d2.benchmark_data (the training data path's images/s per
#      worker count, resize backend and pinned memory, delivered to the GPU, and the JPEG decoders alone);
#      and tools/benchmark_inference.py (FSAF vs RetinaNet inference, batch 1 and 8, post-processing loaded);
#   3. short real training runs through train_net.py (1-GPU launch, AMP fp16) on the quickstart data,
#      eager and with SOLVER.COMPILE.
# Results go to $OUT (default ./gpu_out). Usage: bash scripts/gpu_benchmark.sh [extra benchmark args]
# A failing section does not stop the later ones (a short lease should measure what it can); the script
# names the failed sections at the end and exits 1 if there was any (3: the set-up failed).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PY:-python3}
WHL=${WHL:-$ROOT/.whl}
SITE=${SITE:-/tmp/fsaf_site}
OUT=${OUT:-$ROOT/gpu_out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
failed=()
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
AMP=${AMP:-fp16}   # the benchmarks' autocast dtype (a CPU dry run of this script is faster with bf16)
BATCH=${BATCH:-16}
MODELS=${MODELS:-fsaf retinanet fsaf_static fsaf_compiled fsaf_retinanet fcos}
# LAYOUTS: "config" = every model as shipped (FSAF: MODEL.FSAF.MEMORY_FORMAT auto = channels_last on cuda;
# Detectron2's models: contiguous), "contiguous" / "channels_last" = that layout for every model
for layout in ${LAYOUTS:-config contiguous}; do
  echo "=== benchmark (memory format: $layout)"
  "$PY" tools/benchmark.py --device "$DEVICE" --batch "$BATCH" --size "$SIZE" --amp "$AMP" --iters "${ITERS:-30}" \
    --warmup "${WARMUP:-10}" --infer-iters 20 --models $MODELS --rounds "${ROUNDS:-1}" --profile \
    --memory-format "$layout" --out "$OUT/bench_$layout.json" "$@" || failed+=("benchmark ($layout)")
done
if [ -z "${SKIP_PAIRED:-}" ]; then
  # before/after pairs of the layout and FrozenBN folding, in one process, steps alternating
  echo "=== paired: FSAF as shipped vs NCHW vs FrozenBN not folded"
  "$PY" tools/benchmark.py --device "$DEVICE" --batch "$BATCH" --size "$SIZE" --amp "$AMP" --paired \
    --iters "${ITERS:-30}" --warmup "${WARMUP:-10}" --infer-iters 20 \
    --models fsaf "fsaf+MODEL.FSAF.MEMORY_FORMAT=contiguous" "fsaf+MODEL.FSAF.FOLD_FROZEN_BN=False" \
    --out "$OUT/bench_paired_changes.json" "$@" || failed+=("paired changes")
fi
if [ -z "${SKIP_COMPILE:-}" ]; then
  # the compiled static step per mode against the eager steps and RetinaNet, in one process, steps alternating;
  # COMPILE_MODES="default reduce-overhead max-autotune" adds Inductor's autotuning (a long first compile)
  compiled=()
  for mode in ${COMPILE_MODES:-default reduce-overhead}; do compiled+=("fsaf_compiled+SOLVER.COMPILE.MODE=$mode"); done
  echo "=== paired: FSAF eager (dynamic, static) vs compiled static step per mode vs RetinaNet"
  "$PY" tools/benchmark.py --device "$DEVICE" --batch "$BATCH" --size "$SIZE" --amp "$AMP" --paired \
    --iters "${ITERS:-30}" --warmup "${WARMUP:-10}" --infer-iters 5 \
    --models fsaf fsaf_static "${compiled[@]}" retinanet --out "$OUT/bench_paired_compile.json" "$@" \
    || failed+=("paired compile")
fi
if [ -z "${SKIP_INFER:-}" ]; then
  # inference with post-processing loaded like a trained COCO model (5000 pairs above 0.05 per image); FSAF in
  # NCHW too, so that FSAF against RetinaNet in one layout is in the same run as the as-shipped pairing
  echo "=== inference: FSAF vs RetinaNet, batch 1 and 8, $AMP, calibrated classifiers"
  "$PY" tools/benchmark_inference.py --device "$DEVICE" --batches 1 8 --size "$SIZE" --amp "$AMP" \
    --iters "${INFER_ITERS:-20}" --warmup 5 --candidates 5000 \
    --models fsaf "fsaf+MODEL.FSAF.MEMORY_FORMAT=contiguous" "fsaf+MODEL.FSAF.FOLD_FROZEN_BN=False" retinanet \
    --out "$OUT/inference.json" || failed+=("inference")
fi
if [ -z "${SKIP_DATA:-}" ]; then
  echo "=== data path (COCO-like 480x640 JPEGs resized to 800x1333, batch $BATCH, delivered to $DEVICE)"
  PIN="0"
  case "$DEVICE" in cuda*|npu*) PIN="0 1" ;; esac
  "$PY" -m fsaf_d2.benchmark_data --device "$DEVICE" --images 64 --batch "$BATCH" --workers ${DATA_WORKERS:-0 4 8 12} \
    --backends pil cv2 --pin-memory $PIN --decoders pil torchvision torchvision-cuda --batches "${DATA_BATCHES:-40}" \
    --out "$OUT/data_loader.json" || failed+=("data path")
fi

if [ -z "${SKIP_TRAIN:-}" ]; then
  # float16 AMP on accelerators; the CPU dry run of this script trains with bfloat16 (CPU autocast refuses fp16)
  AMP_PRECISION=float16
  case "$DEVICE" in cpu*) AMP_PRECISION=bfloat16 ;; esac
  echo "=== train_net.py: 1-GPU launch, AMP $AMP_PRECISION, quickstart data"
  export FSAF_D2_DATASETS=/tmp/fsaf_quickstart
  "$PY" -m fsaf_d2.data.quickstart --if-missing --no-progress --num-train 256 --num-val 32 || failed+=("quickstart data")
  "$PY" train_net.py --num-gpus 1 --config-file configs/quickstart_R18_FPN.yaml MODEL.DEVICE "$DEVICE" \
    SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION $AMP_PRECISION SOLVER.MAX_ITER 60 SOLVER.STEPS "(50,)" \
    DATALOADER.NUM_WORKERS 4 OUTPUT_DIR "$OUT/train_amp" 2>&1 | tail -40 || failed+=("train_net.py eager")
  echo "=== train_net.py: the same with SOLVER.COMPILE (static shapes: the quickstart's native 128 px)"
  "$PY" train_net.py --num-gpus 1 --config-file configs/quickstart_R18_FPN.yaml MODEL.DEVICE "$DEVICE" \
    SOLVER.AMP.ENABLED True SOLVER.AMP.PRECISION $AMP_PRECISION SOLVER.MAX_ITER 60 SOLVER.STEPS "(50,)" \
    DATALOADER.NUM_WORKERS 4 INPUT.FIXED_SIZES "[[128, 128]]" MODEL.FSAF.MAX_GT 32 \
    SOLVER.COMPILE.ENABLED True SOLVER.COMPILE.MODE "${TRAIN_COMPILE_MODE:-reduce-overhead}" \
    OUTPUT_DIR "$OUT/train_amp_compiled" 2>&1 | tail -40 || failed+=("train_net.py compiled")
fi
ls -la "$OUT"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED sections: %s\n' "$(IFS=,; echo "${failed[*]}")" >&2
  exit 1
fi
echo "all sections passed"
