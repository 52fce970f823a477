#!/usr/bin/env bash
# Full FSAF training + evaluation on ONE device (same options as train_full_8p.sh). The 8 x 2-image
# schedule of the config is rescaled linearly to 1 device (batch 2, LR / 8, 8x the iterations).
#   DEVICE=npu bash scripts/train_full_1p.sh
set -euo pipefail
NUM_DEVICES="${NUM_DEVICES:-1}" OUTPUT_DIR="${OUTPUT_DIR:-output/train_full_${DEVICE:-npu}_1p}" \
  exec bash "$(dirname "${BASH_SOURCE[0]}")/train_full_8p.sh" "$@"
