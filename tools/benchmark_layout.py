#!/usr/bin/env python
"""Paired training-step time of one config in the channels-last and NCHW conv layouts, on this CPU.

    python tools/benchmark_layout.py                                   # the quickstart config, batch 16
    python tools/benchmark_layout.py --config-file configs/fsaf_R50_FPN_1x.yaml --batch 2 --size 320x480

Both models get the same weights and the same synthetic batch (random images with ``--boxes`` objects
each, sides ``--size`` and ``--size`` transposed alternately); their steps (forward, backward, SGD)
alternate one by one, A B B A ..., so machine drift hits both alike. Prints the CPU (model name, torch's
CPU capability: the SIMD kernels in use) next to the medians, as every CPU figure in docs/ is given.
``MODEL.FSAF.MEMORY_FORMAT auto`` picks its CPU layout from these measurements (fsaf_d2.engine.config).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import fsaf_d2  # noqa: F401  (first: registers FSAF, and Detectron2's import-time warnings stay quiet)
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from fsaf_d2.benchmarking import machine_description, training_input
from fsaf_d2.engine import build_config
from fsaf_d2.model_zoo import get_config_file

LAYOUTS = ("channels_last", "contiguous")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=get_config_file("quickstart_R18_FPN.yaml"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", default="144x144", help="HxW of the images (alternately transposed)")
    p.add_argument("--boxes", type=int, default=4)
    p.add_argument("--iters", type=int, default=12, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    h, w = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    batch = []
    for i in range(args.batch):
        ih, iw = (h, w) if i % 2 == 0 else (w, h)
        side = torch.rand(args.boxes, generator=g) * (min(ih, iw) / 2 - 12) + 12
        x0 = torch.rand(args.boxes, generator=g) * (iw - side)
        y0 = torch.rand(args.boxes, generator=g) * (ih - side)
        boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1).tolist()
        batch.append(training_input(ih, iw, boxes, [k % 2 for k in range(args.boxes)], seed=i))
    steps = {}
    for layout in LAYOUTS:
        cfg = build_config(args.config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *args.opts,
                                              "MODEL.FSAF.MEMORY_FORMAT", layout])
        cfg.defrost()
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False  # global-norm clipping is the trainer's; same for both
        torch.manual_seed(0)
        model = build_model(cfg).train()
        if steps:
            model.load_state_dict(next(iter(steps.values()))[0].state_dict())
        steps[layout] = (model, build_optimizer(cfg, model))
    times = {layout: [] for layout in LAYOUTS}
    with EventStorage(0):
        for it in range(args.warmup + args.iters):
            for layout in LAYOUTS if it % 2 == 0 else LAYOUTS[::-1]:
                model, optimizer = steps[layout]
                start = time.perf_counter()
                loss = sum(model(batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if it >= args.warmup:
                    times[layout].append(time.perf_counter() - start)
    result = {
        "cpu": machine_description()["cpu"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "config": os.path.relpath(args.config_file),
        "batch": args.batch,
        "size": args.size,
        "ms_per_step": {k: 1000 * statistics.median(v) for k, v in times.items()},
    }
    result["images_per_sec"] = {k: args.batch * 1000 / v for k, v in result["ms_per_step"].items()}
    result["channels_last_over_contiguous"] = result["ms_per_step"]["channels_last"] / result["ms_per_step"]["contiguous"]
    print(f"CPU {result['cpu']} | torch CPU capability {result['cpu_capability']} | {result['threads']} threads")
    print(f"{result['config']}, batch {args.batch}, {args.size}, median of {args.iters} alternating steps:")
    for layout in LAYOUTS:
        print(f"  {layout:14s} {result['ms_per_step'][layout]:8.1f} ms/step  {result['images_per_sec'][layout]:6.1f} img/s")
    print(f"  channels_last / contiguous step time: {result['channels_last_over_contiguous']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
