#!/usr/bin/env bash
# COCO evaluation of a checkpoint on N devices (ModelZoo-style "train_eval_8p"); prints the box AP.
#
#   DEVICE=npu WEIGHTS=output/train_full_npu_8p/model_final.pth bash scripts/train_eval_8p.sh
#   DEVICE=cuda NUM_DEVICES=1 WEIGHTS=model.pth bash scripts/train_eval_8p.sh TEST.DETECTIONS_PER_IMAGE 100
#
# Environment: WEIGHTS (required: .pth checkpoint, or an mmdet checkpoint converted with
# tools/convert_mmdet.py), plus DEVICE [npu], NUM_DEVICES [8], CONFIG, DATA_PATH, OUTPUT_DIR
# [output/eval_<device>_<N>p], LAUNCHER, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, ASCEND_SET_ENV, PYTHON
# as in train_full_8p.sh.
set -euo pipefail
# shellcheck source=scripts/_launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
: "${WEIGHTS:?set WEIGHTS=/path/to/model_final.pth}"
OUTPUT_DIR="${OUTPUT_DIR:-output/eval_${DEVICE}_${NUM_DEVICES}p}"

OPTS=(MODEL.DEVICE "$DEVICE" MODEL.WEIGHTS "$WEIGHTS" OUTPUT_DIR "$OUTPUT_DIR")
mkdir -p "$OUTPUT_DIR"
echo "[train_eval] device=$DEVICE x $NUM_DEVICES, weights=$WEIGHTS, output=$OUTPUT_DIR"
run_train_net --eval-only --config-file "$CONFIG" "${OPTS[@]}" "$@"

echo "[train_eval] ------------------------------------------------------------ summary"
print_summary "$OUTPUT_DIR" ap --prefer-log
