#!/usr/bin/env bash
# Full FSAF training + COCO evaluation on N devices of one machine (ModelZoo-style "train_full_8p").
# Prints the training FPS and the box AP at the end.
#
#   DEVICE=npu bash scripts/train_full_8p.sh                      # 8 Ascend NPUs, AMP fp16
#   DEVICE=cuda NUM_DEVICES=4 bash scripts/train_full_8p.sh       # 4 GPUs
#   DATA_PATH=/data/datasets bash scripts/train_full_8p.sh SOLVER.MAX_ITER 1000   # extra KEY VALUE opts
#
# Environment (defaults in brackets):
#   DEVICE [npu]            cuda | npu | cpu  (MODEL.DEVICE)
#   NUM_DEVICES [8]         worker processes (= devices) per machine
#   CONFIG [configs/fsaf_R50_FPN_1x.yaml]
#   DATA_PATH               the COCO folder (COCO/annotations + COCO/images/{train,val}2017, the Ascend
#                           ModelZoo layout) or a folder holding coco/ or COCO/ (also DETECTRON2_DATASETS)
#   OUTPUT_DIR [output/train_full_<device>_<N>p]
#   BATCH_PER_DEVICE [2]    images per device; the config's schedule is for its SOLVER.IMS_PER_BATCH (16 =
#                           8 x 2) images and is rescaled linearly (batch, learning rate, iterations) to
#                           NUM_DEVICES x NNODES x BATCH_PER_DEVICE (Detectron2's SOLVER.REFERENCE_WORLD_SIZE)
#   AMP [1 on npu, else 0]  PRECISION [float16]   SOLVER.AMP.ENABLED / SOLVER.AMP.PRECISION
#   LAUNCHER [spawn]        spawn (train_net.py --num-gpus N) or torchrun
#   NNODES [1] NODE_RANK [0] MASTER_ADDR MASTER_PORT [29500]   multi-machine jobs
#   ASCEND_SET_ENV          path of CANN's set_env.sh to source first (npu)
#   PYTHON [$VENV/bin/python (VENV default .venv) if present, else python3]
set -euo pipefail
# shellcheck source=scripts/_launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
OUTPUT_DIR="${OUTPUT_DIR:-output/train_full_${DEVICE}_${NUM_DEVICES}p}"

# the config's schedule is for its batch: it is the schedule of CONFIG_BATCH / BATCH_PER_DEVICE workers, which
# Detectron2 rescales linearly to the real number of workers
CONFIG_BATCH="$("$PYTHON" -c 'import sys; from fsaf_d2.engine import build_config
print(build_config(sys.argv[1]).SOLVER.IMS_PER_BATCH)' "$CONFIG" 2>/dev/null | tail -1)"
if ! [ "$CONFIG_BATCH" -gt 0 ] 2>/dev/null || [ $((CONFIG_BATCH % BATCH_PER_DEVICE)) -ne 0 ]; then
  echo "[train_full] BATCH_PER_DEVICE=$BATCH_PER_DEVICE must divide the batch of $CONFIG (SOLVER.IMS_PER_BATCH" \
    "${CONFIG_BATCH:-unreadable}) for the linear rescaling: choose a divisor of it" >&2
  exit 2
fi
OPTS=(
  MODEL.DEVICE "$DEVICE"
  OUTPUT_DIR "$OUTPUT_DIR"
  SOLVER.REFERENCE_WORLD_SIZE $((CONFIG_BATCH / BATCH_PER_DEVICE))
  SOLVER.AMP.ENABLED "$AMP_ON"
  SOLVER.AMP.PRECISION "$PRECISION"
)
mkdir -p "$OUTPUT_DIR"
echo "[train_full] device=$DEVICE x $NUM_DEVICES (nodes $NNODES), config=$CONFIG, output=$OUTPUT_DIR, AMP=$AMP_ON/$PRECISION"

run_train_net --config-file "$CONFIG" "${OPTS[@]}" "$@"

echo "[train_full] ------------------------------------------------------------ summary"
print_summary "$OUTPUT_DIR"
