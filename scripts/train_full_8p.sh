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
#   BATCH_PER_DEVICE [2]    images per device; the config's schedule is for 8 x 2 = 16 images and is
#                           rescaled linearly for other totals (Detectron2's SOLVER.REFERENCE_WORLD_SIZE)
#   AMP [1 on npu, else 0]  PRECISION [float16]   SOLVER.AMP.ENABLED / SOLVER.AMP.PRECISION
#   LAUNCHER [spawn]        spawn (train_net.py --num-gpus N) or torchrun
#   NNODES [1] NODE_RANK [0] MASTER_ADDR MASTER_PORT [29500]   multi-machine jobs
#   ASCEND_SET_ENV          path of CANN's set_env.sh to source first (npu)
#   PYTHON [$VENV/bin/python (VENV default .venv) if present, else python3]
set -euo pipefail
# shellcheck source=scripts/_launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
OUTPUT_DIR="${OUTPUT_DIR:-output/train_full_${DEVICE}_${NUM_DEVICES}p}"

OPTS=(
  MODEL.DEVICE "$DEVICE"
  OUTPUT_DIR "$OUTPUT_DIR"
  SOLVER.REFERENCE_WORLD_SIZE 8
  SOLVER.IMS_PER_BATCH $((BATCH_PER_DEVICE * 8))
  SOLVER.AMP.ENABLED "$AMP_ON"
  SOLVER.AMP.PRECISION "$PRECISION"
)
# the config's schedule is defined for 8 devices x BATCH_PER_DEVICE; auto-scaled to the real world size
mkdir -p "$OUTPUT_DIR"
echo "[train_full] device=$DEVICE x $NUM_DEVICES (nodes $NNODES), config=$CONFIG, output=$OUTPUT_DIR, AMP=$AMP_ON/$PRECISION"

run_train_net --config-file "$CONFIG" "${OPTS[@]}" "$@"

echo "[train_full] ------------------------------------------------------------ summary"
print_summary "$OUTPUT_DIR"
