"""Train / evaluate FSAF from a YAML config on CUDA, Ascend NPU or CPU: the program behind ``train_net.py``.

From a clone, ``python train_net.py ...``; from an installed package (``pip install .`` or the wheel),
``fsaf-train ...`` or ``python -m fsaf_d2.train_net ...``, with the same arguments:

    fsaf-train --config-file configs/fsaf_R50_FPN_1x.yaml --num-gpus 8
    fsaf-train --config-file fsaf_R50_FPN_1x.yaml --num-gpus 8 MODEL.DEVICE npu
    torchrun --nproc-per-node 8 -m fsaf_d2.train_net --config-file configs/fsaf_R50_FPN_1x.yaml
    fsaf-train --config-file ... --eval-only MODEL.WEIGHTS /path/to/model_final.pth

``--config-file`` is a path, or the name of a config shipped in the package (``fsaf_R50_FPN_1x.yaml`` or
``configs/fsaf_R50_FPN_1x.yaml``: :func:`fsaf_d2.model_zoo.resolve_config_file`). ``--num-gpus`` is the number
of worker processes per machine (one per device; CPU processes on cpu).
"""
import sys

from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

import fsaf_d2  # noqa: F401  (registers the FSAF meta-architecture and datasets)
from fsaf_d2.engine import Trainer, launch, pre_launch
from fsaf_d2.engine import setup as fsaf_setup
from fsaf_d2.model_zoo import resolve_config_file

__all__ = ["setup", "main", "parse_args", "launch_main", "cli"]


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


def parse_args(argv=None):
    """Detectron2's command line (``--config-file``, ``--num-gpus``, ``--resume``, ``--eval-only``, opts), with
    ``--config-file`` resolved by :func:`resolve_config_file`."""
    args = default_argument_parser().parse_args(argv)
    args.config_file = resolve_config_file(args.config_file)  # a path, or a shipped config's name
    print("Command Line Args:", args)
    return args


def launch_main(main_func, args, device_type: str):
    """``main_func(args)`` in ``args.num_gpus`` workers of ``device_type`` per machine (or in this torchrun worker)."""
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device_type=device_type,
    )


def cli(argv=None):
    """Command-line entry point (``fsaf-train``, ``python -m fsaf_d2.train_net``, ``python train_net.py``)."""
    args = parse_args(argv)
    launch_main(main, args, pre_launch(args))


if __name__ == "__main__":
    sys.exit(cli())
