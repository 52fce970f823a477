#!/usr/bin/env python
"""Training / inference throughput of FSAF against Detectron2's RetinaNet (and FCOS), same run, same settings.

    python tools/benchmark.py --device cpu --batch 2 --size 320x320 --depth 50
    python tools/benchmark.py --device cuda --batch 16 --size 800x1344 --amp fp16 --out bench.json

(installed: ``fsaf-benchmark ...``; ``--config-file`` takes a path or a shipped config's name).

Every model gets the same synthetic batch (random images of one size, ``--boxes`` random COCO-like boxes
per image over 80 classes), the same backbone (depth ``--depth``, pytorch-style stride on the 3x3 conv as
in the FSAF reference; Detectron2's model-zoo RetinaNet/FCOS use the caffe style, which is a little
cheaper), FrozenBN ResNet with random weights (the last norm
of every residual block is zeroed so that random weights stay finite, as in the Detectron2 baseline),
SGD, and the same AMP setting. A training step is forward + backward + optimizer step; time is measured
with a device synchronisation after ``--warmup`` steps. Each model runs in its own subprocess, so the CPU
peak-memory figure (max RSS) is per model; on accelerators peak memory is the device allocator's.

Models: ``fsaf`` (``--config-file``, default configs/fsaf_R50_FPN_1x.yaml), ``fsaf_static`` (the same with
INPUT.FIXED_SIZES and MODEL.FSAF.MAX_GT: the static-shape path), ``fsaf_compiled`` (``fsaf_static`` with
SOLVER.COMPILE.ENABLED: the step through torch.compile, as the Trainer builds it; ``first_step_s`` reports the
first step, compilation included; ``fsaf_compiled+SOLVER.COMPILE.MODE=reduce-overhead`` picks a mode),
``fsaf_retinanet`` (the combined anchor-based
+ FSAF model), ``retinanet`` (Detectron2 model zoo COCO-Detection/retinanet_R_50_FPN_1x.yaml), ``fcos``
(Detectron2's LazyConfig COCO-Detection/fcos_R_50_FPN_1x.py). ``--profile`` adds a per-phase breakdown of the
FSAF training step from the torch profiler (record_function ranges in the model; the ResNet and the FPN are
split by module hooks). ``--memory-format`` chooses the conv layout (default: each model as shipped). Step and
inference times are medians over iterations; ``--rounds R`` repeats the model list R times in alternating
order (A B, B A, ...) and reports medians over rounds and the per-round ratios, which keeps machine drift out
of the comparison. ``--paired`` goes further: all models live in one process and their steps alternate one by
one (no profile, no per-model memory figure in that mode). A model name may carry config overrides
(``fsaf+MODEL.FSAF.FOLD_FROZEN_BN=False``), which gives before/after pairs of one change.
The configs are built as ``train_net.py`` builds them (:func:`fsaf_d2.engine.build_config`) for images of
``--size``: on npu the FSAF models therefore take the static shapes of training. The timing helpers are
:mod:`fsaf_d2.benchmarking`.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

import torch

import fsaf_d2
from fsaf_d2.benchmarking import (
    all_finite,
    combine_rounds,
    make_infer_call,
    make_train_step,
    phase_breakdown,
    top_ops,
    range_hooks,
    round_ratios,
    synthetic_batch,
    time_alternating,
)
from fsaf_d2.engine import build_config
from fsaf_d2.engine import device as dev
from fsaf_d2.engine.compile import check_compile_support, compile_static_training_step
from fsaf_d2.engine.train_loop import parse_precision
from fsaf_d2.model_zoo import get_config_file, resolve_config_file

MODELS = ("fsaf", "fsaf_static", "fsaf_compiled", "fsaf_retinanet", "retinanet", "fcos")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--config-file", default=get_config_file("fsaf_R50_FPN_1x.yaml"),
        help="config of the FSAF models (default: the shipped configs/fsaf_R50_FPN_1x.yaml)",
    )
    p.add_argument(
        "--models", nargs="+", default=["fsaf", "retinanet"], type=_model_spec,
        help=f"models among {list(MODELS)}; a model name may carry config overrides after '+', e.g. "
        "'fsaf+MODEL.FSAF.FOLD_FROZEN_BN=False' (not for fcos)",
    )
    p.add_argument(
        "--paired", action="store_true",
        help="build every model in one process and alternate their steps (A B B A ...): the most drift-proof "
        "ratio; memory figures are then those of all models together",
    )
    p.add_argument("--batch", type=int, default=2, help="training images per step")
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--size", default="320x320", help="HxW of every image (e.g. 800x1344)")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--boxes", type=int, default=7, help="objects per image")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument(
        "--rounds", type=int, default=1,
        help="run the model list this many times, alternating its order (ABBA); figures are medians over rounds",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--infer-iters", type=int, default=10)
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    p.add_argument(
        "--memory-format", default="config", choices=["config", "contiguous", "channels_last"],
        help="layout of every model's convs: 'config' = FSAF models as MODEL.FSAF.MEMORY_FORMAT (auto: "
        "channels_last on cuda and AVX-512 CPUs, contiguous on AVX2-only CPUs and npu), Detectron2's models "
        "as Detectron2 ships them (contiguous); the other two force one layout on every model",
    )
    p.add_argument("--channels-last", action="store_true", help="same as --memory-format channels_last")
    p.add_argument("--profile", action="store_true", help="per-phase breakdown of the FSAF training step")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.config_file = resolve_config_file(args.config_file)
    except FileNotFoundError as e:
        if any(spec.startswith("fsaf") for spec in args.models):
            p.error(f"--config-file: {e}")
    return args


def _model_spec(spec: str) -> str:
    base = spec.split("+")[0]
    if base not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {base!r}; choose from {list(MODELS)}")
    for item in spec.split("+")[1:]:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"override {item!r} of {spec!r} is not KEY=VALUE")
    if base == "fcos" and "+" in spec:
        raise argparse.ArgumentTypeError("fcos is built from a LazyConfig: config overrides are not supported")
    return spec


def _split_spec(spec: str):
    """'fsaf+A.B=1+C=x' -> ('fsaf', ['A.B', '1', 'C', 'x']) for CfgNode.merge_from_list."""
    base, *items = spec.split("+")
    overrides = []
    for item in items:
        key, value = item.split("=", 1)
        overrides += [key, value]
    return base, overrides


def build_model(spec: str, args):
    """Build one benchmarked model on ``args.device`` with random weights (FrozenBN, zeroed last norms)."""
    from detectron2 import model_zoo
    from detectron2.modeling import build_model as d2_build

    name, overrides = _split_spec(spec)
    h, w = _size(args)
    if name == "fcos":
        from detectron2.config import instantiate

        if args.depth < 50:
            raise ValueError("the fcos row needs --depth 50 or 101 (its LazyConfig builds bottleneck blocks)")
        lazy = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py").model
        lazy.backbone.bottom_up.stages.depth = args.depth
        lazy.backbone.bottom_up.stages.stride_in_1x1 = False  # the same (pytorch-style) ResNet for every model
        lazy.num_classes = 80
        model = instantiate(lazy)
        model.to(args.device)
        if args.memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
    else:
        if name == "retinanet":
            config_file = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml")
        else:
            config_file = args.config_file
        opts = [
            "MODEL.WEIGHTS", "",
            "MODEL.DEVICE", args.device,
            "MODEL.RESNETS.DEPTH", args.depth,
            "MODEL.RESNETS.STRIDE_IN_1X1", False,  # the same (pytorch-style) ResNet for every model
            # the resize settings of images of --size (on npu they give the default static-shape buckets)
            "INPUT.MIN_SIZE_TRAIN", (min(h, w),),
            "INPUT.MAX_SIZE_TRAIN", max(h, w),
            "INPUT.MIN_SIZE_TEST", min(h, w),
            "INPUT.MAX_SIZE_TEST", max(h, w),
        ]
        if args.depth < 50:
            opts += ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
        if name in ("fsaf_static", "fsaf_compiled"):
            ph, pw = (-(-h // 32) * 32, -(-w // 32) * 32)
            opts += ["INPUT.FIXED_SIZES", [[ph, pw], [pw, ph]], "MODEL.FSAF.MAX_GT", max(args.boxes, 1)]
        if name == "fsaf_compiled":
            opts += ["SOLVER.COMPILE.ENABLED", True]
        if name == "fsaf_retinanet":
            sizes = [[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in (32, 64, 128, 256, 512)]
            opts += ["MODEL.FSAF.ANCHOR_BASED", True, "MODEL.ANCHOR_GENERATOR.SIZES", sizes]
        if name != "retinanet" and args.memory_format != "config":
            opts += ["MODEL.FSAF.MEMORY_FORMAT", args.memory_format]
        cfg = build_config(config_file, opts + overrides)  # the model's own overrides come last
        model = d2_build(cfg)
        if name == "retinanet" and args.memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        if cfg.SOLVER.COMPILE.ENABLED:  # as the Trainer does (fsaf_d2.engine.compile)
            check_compile_support(cfg)
            compile_static_training_step(model, cfg.SOLVER.COMPILE.MODE, dev.device_type_of(args.device))
    for m in model.modules():  # residual blocks start as identity: random FrozenBN nets stay finite
        last = getattr(m, "conv3", None) or (getattr(m, "conv2", None) if hasattr(m, "shortcut") else None)
        norm = getattr(last, "norm", None)
        if norm is not None and hasattr(norm, "weight"):
            norm.weight.zero_()
    return model


def _size(args):
    """``--size`` as (H, W)."""
    h, w = (int(v) for v in args.size.split("x"))
    return h, w


def _precision(args) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp``, None without AMP."""
    return None if args.amp == "none" else parse_precision(args.amp)


def _batches(args):
    """The training batch and the inference inputs of every model: same images, same seeds."""
    train = synthetic_batch(args.batch, _size(args), args.boxes, args.seed)
    infer = synthetic_batch(args.infer_batch, _size(args), args.boxes, args.seed + 1, with_targets=False)
    return train, infer


def _prepare_device(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    torch.manual_seed(args.seed)
    if args.device.startswith("npu"):
        dev.import_torch_npu()


def run_paired(args) -> List[Dict]:
    """Every model in this process; training steps and inference calls alternate between the models
    (order reversed every iteration), so that machine drift hits all of them alike."""
    _prepare_device(args)
    names = list(args.models)
    models = {name: build_model(name, args) for name in names}
    batch, infer = _batches(args)
    steps = {name: make_train_step(models[name], batch, args.device, _precision(args)) for name in names}
    time_alternating(steps, args.warmup, args.device)
    times, losses = time_alternating(steps, args.iters, args.device)
    calls = {name: make_infer_call(models[name], infer, args.device, _precision(args)) for name in names}
    time_alternating(calls, 2, args.device)
    infer_times, _ = time_alternating(calls, args.infer_iters, args.device)
    results = []
    for name in names:
        train, inf = statistics.median(times[name]), statistics.median(infer_times[name])
        results.append(
            {
                "model": name,
                "train_ms_per_iter": 1000 * train,
                "train_ms_all": [round(1000 * t, 2) for t in times[name]],
                "train_images_per_sec": args.batch / train,
                "train_loss_finite": all_finite(losses[name]),
                "train_peak_mem_gib": None,
                "infer_ms_per_iter": 1000 * inf,
                "infer_images_per_sec": args.infer_batch / inf,
                "infer_peak_mem_gib": None,
                "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
    return results


def run_worker(name: str, args) -> Dict:
    _prepare_device(args)
    model = build_model(name, args)
    batch, infer = _batches(args)
    step = make_train_step(model, batch, args.device, _precision(args))

    first, _ = time_alternating({name: step}, 1, args.device)  # compilation, cuDNN autotuning, allocator growth
    time_alternating({name: step}, max(args.warmup - 1, 0), args.device)
    dev.reset_peak_memory_stats(args.device)
    times, losses = time_alternating({name: step}, args.iters, args.device)
    times = times[name]
    train_peak = dev.max_memory_allocated(args.device)
    median = statistics.median(times)
    result = {
        "model": name,
        "train_ms_per_iter": 1000 * median,
        "train_ms_per_iter_mean": 1000 * sum(times) / len(times),
        "train_ms_all": [round(1000 * t, 2) for t in times],
        "train_images_per_sec": args.batch / median,
        "train_loss_finite": all_finite(losses[name][-1:]),
        "train_peak_mem_gib": None if train_peak is None else train_peak / 2**30,
        "first_step_s": first[name][0],
    }

    if args.profile and name.startswith("fsaf"):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.device(args.device).type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        handles = range_hooks(getattr(model.backbone, "bottom_up", None), "bench.resnet")
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            dev.synchronize(args.device)
        for h in handles:
            h.remove()
        result["profile_ms_per_iter"] = phase_breakdown(prof, 3)
        result["profile_top_ops_ms_per_iter"] = top_ops(prof, 3)

    call = make_infer_call(model, infer, args.device, _precision(args))
    time_alternating({name: call}, 2, args.device)
    dev.reset_peak_memory_stats(args.device)
    infer_times, _ = time_alternating({name: call}, args.infer_iters, args.device)
    infer_peak = dev.max_memory_allocated(args.device)
    infer_median = statistics.median(infer_times[name])
    result.update(
        {
            "infer_ms_per_iter": 1000 * infer_median,
            "infer_images_per_sec": args.infer_batch / infer_median,
            "infer_peak_mem_gib": None if infer_peak is None else infer_peak / 2**30,
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
    )
    return result


def format_table(results: List[Dict], args, rounds: Optional[List[List[Dict]]] = None) -> str:
    rows = [
        f"device={args.device} batch={args.batch} size={args.size} depth=R{args.depth} amp={args.amp} "
        f"boxes/img={args.boxes} iters={args.iters} (+{args.warmup} warm-up) rounds={args.rounds} paired={args.paired} "
        f"memory_format={args.memory_format} torch={torch.__version__}; times are medians",
        "| model | train img/s | train ms/iter | train peak GiB | infer img/s (batch %d) | max RSS GiB | loss finite |"
        % args.infer_batch,
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | error: {r['error']} | | | | | |")
            continue
        peak = "-" if r["train_peak_mem_gib"] is None else f"{r['train_peak_mem_gib']:.2f}"
        rows.append(
            f"| {r['model']} | {r['train_images_per_sec']:.2f} | {r['train_ms_per_iter']:.1f} | {peak} | "
            f"{r['infer_images_per_sec']:.2f} | {r['max_rss_gib']:.2f} | {r['train_loss_finite']} |"
        )
    ok = {r["model"]: r for r in results if "error" not in r}
    base = "retinanet" if "retinanet" in ok else (results[0]["model"] if results else None)
    if base in ok:
        ref = ok[base]
        for name, r in ok.items():
            if name != base:
                line = (
                    f"{name} / {base}: training step time x{r['train_ms_per_iter'] / ref['train_ms_per_iter']:.3f}, "
                    f"training img/s x{r['train_images_per_sec'] / ref['train_images_per_sec']:.3f}, "
                    f"inference img/s x{r['infer_images_per_sec'] / ref['infer_images_per_sec']:.3f}"
                )
                per_round = round_ratios(rounds or [], name, base)
                if len(per_round) > 1:
                    line += (
                        f"; step time ratio per round {' '.join(f'{x:.3f}' for x in per_round)} "
                        f"(median {statistics.median(per_round):.3f})"
                    )
                rows.append(line)
    for r in results:
        if r.get("first_step_s") is not None and "compiled" in r["model"]:
            rows.append(f"first training step of {r['model']} (torch.compile included): {r['first_step_s']:.1f} s")
    for r in results:
        if "profile_ms_per_iter" in r:
            rows.append(f"profile of {r['model']} (ms per step): " + ", ".join(
                f"{k}={v:.1f}" for k, v in r["profile_ms_per_iter"].items()))
        if r.get("profile_top_ops_ms_per_iter"):
            rows.append(f"top self times of {r['model']} (ms per step): " + ", ".join(
                f"{k}={v:.1f}" for k, v in r["profile_top_ops_ms_per_iter"].items()))
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    if args.channels_last:
        args.memory_format = "channels_last"
    if args.worker == "paired":
        print("RESULT " + json.dumps(run_paired(args)), flush=True)
        return 0
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker, args)), flush=True)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.paired:
        return _main_paired(args, argv)
    rounds = []
    for k in range(max(args.rounds, 1)):
        order = list(args.models) if k % 2 == 0 else list(reversed(args.models))
        runs = {}
        for name in order:
            worker_argv = list(argv)
            if k > 0 and "--profile" in worker_argv:  # profile once, in the first round
                worker_argv.remove("--profile")
            runs[name] = _run_in_subprocess(name, worker_argv)
            print(f"[benchmark] round {k + 1}/{args.rounds} {name}: done", file=sys.stderr, flush=True)
        rounds.append([runs[name] for name in args.models])
    return _report(args, rounds)


def _report(args, rounds: List[List[Dict]]) -> int:
    """Print the table of the rounds' medians and write the JSON; exit status 1 if any model failed."""
    results = combine_rounds(rounds)
    table = format_table(results, args, rounds)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"args": vars(args), "torch": torch.__version__, "results": results, "rounds": rounds, "table": table},
                f,
                indent=2,
            )
    return 0 if all("error" not in r for r in results) else 1


def _main_paired(args, argv: List[str]) -> int:
    rounds = []
    for k in range(max(args.rounds, 1)):
        out = _run_in_subprocess("paired", argv)
        if "error" in out:
            rounds.append([{"model": name, "error": out["error"]} for name in args.models])
        else:
            rounds.append(out)
        print(f"[benchmark] paired round {k + 1}/{args.rounds}: done", file=sys.stderr, flush=True)
    return _report(args, rounds)


def _run_in_subprocess(name: str, argv: List[str]):
    # this file again, importing the fsaf_d2 that this process imported
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name]
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(fsaf_d2.__file__)))
    path = [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(path)))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"model": name, "error": " / ".join(tail)[-300:]}
    return json.loads(lines[-1][len("RESULT "):])


if __name__ == "__main__":
    sys.exit(main())
