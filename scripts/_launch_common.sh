# Sourced by the ModelZoo-style scripts (train_full_8p.sh, train_performance_8p.sh, train_eval_8p.sh):
# reads the common environment (DEVICE, NUM_DEVICES, CONFIG, DATA_PATH, LAUNCHER, NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, ASCEND_SET_ENV, PYTHON, BATCH_PER_DEVICE, AMP, PRECISION) and defines
# run_train_net ARGS... which starts train_net.py with spawn or torchrun.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DEVICE="${DEVICE:-npu}"
NUM_DEVICES="${NUM_DEVICES:-8}"
CONFIG="${CONFIG:-configs/fsaf_R50_FPN_1x.yaml}"
BATCH_PER_DEVICE="${BATCH_PER_DEVICE:-2}"
if [ "$DEVICE" = "npu" ]; then AMP="${AMP:-1}"; else AMP="${AMP:-0}"; fi
PRECISION="${PRECISION:-float16}"
AMP_ON=False; [ "$AMP" = "1" ] && AMP_ON=True
LAUNCHER="${LAUNCHER:-spawn}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "${VENV:-.venv}/bin/python" ]; then PYTHON="${VENV:-.venv}/bin/python"; else PYTHON=python3; fi
fi
if [ -n "${ASCEND_SET_ENV:-}" ]; then
  # shellcheck disable=SC1090
  source "$ASCEND_SET_ENV"
fi
# DATA_PATH: the COCO folder (Ascend ModelZoo layout COCO/annotations + COCO/images/{train,val}2017) or a
# folder holding coco/ or COCO/; fsaf_d2.data.coco_layout reads it when the data is built
if [ -n "${DATA_PATH:-}" ]; then export DATA_PATH DETECTRON2_DATASETS="$DATA_PATH"; fi
unset TORCH_TRANSFER_TO_NPU  # fsaf_d2 uses its own device layer, never transfer_to_npu

# run_train_net ARGS...: train_net.py on NUM_DEVICES workers per machine (NNODES machines)
run_train_net() {
  if [ "$LAUNCHER" = "torchrun" ]; then
    "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NUM_DEVICES" \
      --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" train_net.py "$@"
  else
    local dist=(--num-gpus "$NUM_DEVICES" --num-machines "$NNODES" --machine-rank "$NODE_RANK")
    if [ "$NNODES" -gt 1 ]; then dist+=(--dist-url "tcp://$MASTER_ADDR:$MASTER_PORT"); else dist+=(--dist-url auto); fi
    "$PYTHON" train_net.py "${dist[@]}" "$@"
  fi
}

# print_summary OUTPUT_DIR [fps|ap|all] [--prefer-log]: the run's FPS / AP summary
# (python -m fsaf_d2.engine.summary), or only its FPS or its AP line
print_summary() {
  local output_dir="$1" only="${2:-all}" text
  shift $(($# < 2 ? $# : 2))
  text="$("$PYTHON" -m fsaf_d2.engine.summary "$output_dir" "$@")" || return
  case "$only" in
    fps) head -n 1 <<<"$text" ;;
    ap) tail -n 1 <<<"$text" ;;
    *) printf '%s\n' "$text" ;;
  esac
}
