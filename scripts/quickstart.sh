#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, generate the bundled quickstart dataset if missing,
# train FSAF on it from scratch on the CPU, evaluate with COCOEvaluator (the AP table is printed),
# and draw the detections of a few validation images into output/quickstart/demo/.
# Extra arguments are KEY VALUE config overrides, e.g.  bash scripts/quickstart.sh SOLVER.MAX_ITER 200
# (the output folder is the environment variable OUTPUT_DIR, default output/quickstart)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # tools/*.py import this checkout's fsaf_d2
PY="${VENV:-$ROOT/.venv}/bin/python"  # the environment setup_env.sh made (VENV)
CONFIG=configs/quickstart_R18_FPN.yaml
OUT="${OUTPUT_DIR:-output/quickstart}"   # OUTPUT_DIR=... bash scripts/quickstart.sh writes elsewhere
"$PY" -m fsaf_d2.data.quickstart --if-missing
"$PY" train_net.py --config-file "$CONFIG" OUTPUT_DIR "$OUT" "$@"
DATA="$("$PY" -c 'import fsaf_d2.data.datasets as d; print(d.registered_quickstart_root())')"
"$PY" tools/demo.py --config-file "$CONFIG" --input "$DATA"/val/00000{1,2,3,4}.jpg --output "$OUT/demo" \
  --confidence-threshold 0.4 MODEL.WEIGHTS "$OUT/model_final.pth" "$@"
echo "[quickstart] ------------------------------------------------------------ summary"
"$PY" -m fsaf_d2.engine.summary "$OUT"
"$PY" -c 'from fsaf_d2.benchmarking import machine_description as m
print("[quickstart] CPU: %(cpu)s, %(cpu_count)s cores, torch CPU capability %(cpu_capability)s" % m())'
echo "[quickstart] detections drawn in $OUT/demo/ ($(ls "$OUT/demo" | paste -sd ' ' -))"
echo "[quickstart] full AP table above; training log in $OUT/log.txt; whole job $((SECONDS / 60)) min $((SECONDS % 60)) s"
