#!/usr/bin/env bash
# Training throughput (FPS) of FSAF on ONE device; same options as train_performance_8p.sh.
#   DEVICE=npu bash scripts/train_performance_1p.sh
set -euo pipefail
NUM_DEVICES="${NUM_DEVICES:-1}" OUTPUT_DIR="${OUTPUT_DIR:-output/train_performance_${DEVICE:-npu}_1p}" \
  exec bash "$(dirname "${BASH_SOURCE[0]}")/train_performance_8p.sh" "$@"
