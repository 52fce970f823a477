#!/usr/bin/env python
"""Train / evaluate FSAF from a LazyConfig (``configs/*.py``) on CUDA, Ascend NPU or CPU.

    python tools/lazyconfig_train_net.py --config-file configs/fsaf_R50_FPN_1x.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config-file configs/fsaf_R50_FPN_1x.py --num-gpus 8 train.device=npu
    python tools/lazyconfig_train_net.py --config-file configs/quickstart_R18_FPN.py train.amp.enabled=True \\
        train.amp.precision=bfloat16
    torchrun --nproc-per-node 8 tools/lazyconfig_train_net.py --config-file configs/fsaf_R50_FPN_1x.py
    python tools/lazyconfig_train_net.py --config-file ... --eval-only train.init_checkpoint=model_final.pth

(installed: ``fsaf-lazy-train ...``). Overrides are ``key=value`` (Detectron2's LazyConfig syntax);
``--config-file`` is a path or the name of a shipped config. ``--num-gpus`` is the number of worker
processes per machine (one per device; CPU processes on cpu). The work is done by
:mod:`fsaf_d2.engine.lazy`, through fsaf_d2's device layer as ``train_net.py``'s.
"""
import sys

import fsaf_d2  # noqa: F401  (registers the FSAF meta-architecture and datasets)
from fsaf_d2.engine.lazy import do_eval_only, do_train, lazy_pre_launch, lazy_setup
from fsaf_d2.train_net import launch_main, parse_args


def main(args):
    cfg = lazy_setup(args)
    if args.eval_only:
        return do_eval_only(cfg)
    return do_train(cfg, resume=args.resume)


def cli(argv=None):
    """Command-line entry point (``fsaf-lazy-train``, ``python tools/lazyconfig_train_net.py``)."""
    args = parse_args(argv)
    launch_main(main, args, lazy_pre_launch(args))


if __name__ == "__main__":
    sys.exit(cli())
