#!/usr/bin/env python
"""Train / evaluate FSAF with Detectron2 on CUDA, Ascend NPU or CPU.

    python train_net.py --config-file configs/fsaf_R50_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/fsaf_R50_FPN_1x.yaml --num-gpus 8 MODEL.DEVICE npu
    torchrun --nproc-per-node 8 train_net.py --config-file configs/fsaf_R50_FPN_1x.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS /path/to/model_final.pth

``--num-gpus`` is the number of worker processes per machine (one per device; CPU processes on cpu).
"""
from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import fsaf_d2  # noqa: F401  (registers the FSAF meta-architecture and datasets)
from fsaf_d2.engine import Trainer, launch, pre_launch
from fsaf_d2.engine import setup as fsaf_setup


def setup(args):
    """Config from ``--config-file`` + opts, logging, device preparation (every worker)."""
    return fsaf_setup(args)


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device_type=pre_launch(args),
    )
