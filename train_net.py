#!/usr/bin/env python
"""Train / evaluate FSAF with Detectron2 on CUDA, Ascend NPU or CPU.

    python train_net.py --config-file configs/fsaf_R50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/fsaf_R50_FPN_1x.yaml --num-gpus 8 MODEL.DEVICE npu
    torchrun --nproc-per-node 8 train_net.py --config-file configs/fsaf_R50_FPN_1x.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model_final.pth

``--num-gpus`` is the number of worker processes per machine (one per device; CPU processes on cpu).
The program is :mod:`fsaf_d2.train_net`, which an installed package runs as ``fsaf-train`` or
``python -m fsaf_d2.train_net``; ``setup`` and ``main`` are importable from here as before.
"""
from fsaf_d2.train_net import cli, main, setup  # noqa: F401

if __name__ == "__main__":
    cli()
