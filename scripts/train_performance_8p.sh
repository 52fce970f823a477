#!/usr/bin/env bash
# Training throughput of FSAF on N devices (ModelZoo-style "train_performance_8p"): PERF_ITERS iterations,
# no evaluation, then prints FPS = images/s measured with a device synchronize after the warm-up
# iterations (SOLVER.THROUGHPUT_WARMUP_ITERS), per device (1 card) and in total (N cards).
#
#   DEVICE=npu bash scripts/train_performance_8p.sh
#   DEVICE=cuda NUM_DEVICES=1 PERF_ITERS=200 bash scripts/train_performance_8p.sh
#
# Environment: as train_full_8p.sh (DEVICE, NUM_DEVICES, CONFIG, DATA_PATH, OUTPUT_DIR, BATCH_PER_DEVICE,
# AMP, PRECISION, LAUNCHER, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, ASCEND_SET_ENV, PYTHON), plus
#   PERF_ITERS [500]        iterations to run
#   WARMUP_ITERS [20]       iterations excluded from the FPS (compilation, allocator, loader start-up)
set -euo pipefail
# shellcheck source=scripts/_launch_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
OUTPUT_DIR="${OUTPUT_DIR:-output/train_performance_${DEVICE}_${NUM_DEVICES}p}"
PERF_ITERS="${PERF_ITERS:-500}"
WARMUP_ITERS="${WARMUP_ITERS:-20}"

WORLD=$((NUM_DEVICES * NNODES))
OPTS=(
  MODEL.DEVICE "$DEVICE"
  OUTPUT_DIR "$OUTPUT_DIR"
  SOLVER.IMS_PER_BATCH $((BATCH_PER_DEVICE * WORLD))
  SOLVER.REFERENCE_WORLD_SIZE 0
  SOLVER.MAX_ITER "$PERF_ITERS"
  SOLVER.CHECKPOINT_PERIOD $((PERF_ITERS + 1))
  SOLVER.THROUGHPUT_WARMUP_ITERS "$WARMUP_ITERS"
  SOLVER.AMP.ENABLED "$AMP_ON"
  SOLVER.AMP.PRECISION "$PRECISION"
  TEST.EVAL_PERIOD 0
  DATASETS.TEST "()"
)
mkdir -p "$OUTPUT_DIR"
rm -f "$OUTPUT_DIR/throughput.json"
echo "[train_performance] device=$DEVICE x $NUM_DEVICES (nodes $NNODES), $PERF_ITERS iterations, batch $((BATCH_PER_DEVICE * WORLD)), AMP=$AMP_ON/$PRECISION"

run_train_net --config-file "$CONFIG" "${OPTS[@]}" "$@"

echo "[train_performance] ----------------------------------------------------- summary"
print_summary "$OUTPUT_DIR" fps
