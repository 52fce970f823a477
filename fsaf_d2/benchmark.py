"""Training / inference throughput of FSAF against Detectron2's RetinaNet (and FCOS), same run, same settings.

    python -m fsaf_d2.benchmark --device cpu --batch 2 --size 320x320 --depth 50
    python -m fsaf_d2.benchmark --device cuda --batch 16 --size 800x1344 --amp fp16 --out bench.json

Every model gets the same synthetic batch (random images of one size, ``--boxes`` random COCO-like boxes
per image over 80 classes), the same backbone (depth ``--depth``, pytorch-style stride on the 3x3 conv as
in the FSAF reference; Detectron2's model-zoo RetinaNet/FCOS use the caffe style, which is a little
cheaper), FrozenBN ResNet with random weights (the last norm
of every residual block is zeroed so that random weights stay finite, as in the Detectron2 baseline),
SGD, and the same AMP setting. A training step is forward + backward + optimizer step; time is measured
with a device synchronisation after ``--warmup`` steps. Each model runs in its own subprocess, so the CPU
peak-memory figure (max RSS) is per model; on accelerators peak memory is the device allocator's.

Models: ``fsaf`` (configs/fsaf_R50_FPN_1x.yaml), ``fsaf_static`` (the same with INPUT.FIXED_SIZES and
MODEL.FSAF.MAX_GT: the static-shape path), ``fsaf_retinanet`` (the combined anchor-based + FSAF model),
``retinanet`` (Detectron2 model zoo COCO-Detection/retinanet_R_50_FPN_1x.yaml), ``fcos`` (Detectron2's
LazyConfig COCO-Detection/fcos_R_50_FPN_1x.py). ``--profile`` adds a per-phase breakdown of the FSAF
training step from the torch profiler (record_function ranges in the model).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

import torch

MODELS = ("fsaf", "fsaf_static", "fsaf_retinanet", "retinanet", "fcos")
PHASES = (
    "fsaf.preprocess",
    "fsaf.backbone",
    "fsaf.head",
    "fsaf.assignment",
    "fsaf.dense_losses",
    "fsaf.selection",
    "fsaf.reduce",
    "bench.backward",
    "bench.optimizer",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["fsaf", "retinanet"], choices=MODELS)
    p.add_argument("--batch", type=int, default=2, help="training images per step")
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--size", default="320x320", help="HxW of every image (e.g. 800x1344)")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--boxes", type=int, default=7, help="objects per image")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--infer-iters", type=int, default=10)
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--profile", action="store_true", help="per-phase breakdown of the FSAF training step")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "configs")


def build_model(name: str, args):
    """Build one benchmarked model on ``args.device`` with random weights (FrozenBN, zeroed last norms)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model as d2_build

    import fsaf_d2

    h, w = (int(v) for v in args.size.split("x"))
    if name == "fcos":
        from detectron2 import model_zoo
        from detectron2.config import instantiate

        if args.depth < 50:
            raise ValueError("the fcos row needs --depth 50 or 101 (its LazyConfig builds bottleneck blocks)")
        lazy = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py").model
        lazy.backbone.bottom_up.stages.depth = args.depth
        lazy.backbone.bottom_up.stages.stride_in_1x1 = False  # the same (pytorch-style) ResNet for every model
        lazy.num_classes = 80
        model = instantiate(lazy)
        model.to(args.device)
    else:
        cfg = get_cfg()
        fsaf_d2.add_fsaf_config(cfg)
        if name == "retinanet":
            from detectron2 import model_zoo

            cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
        else:
            cfg.merge_from_file(os.path.join(_config_dir(), "fsaf_R50_FPN_1x.yaml"))
        cfg.MODEL.WEIGHTS = ""
        cfg.MODEL.DEVICE = args.device
        cfg.MODEL.RESNETS.DEPTH = args.depth
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # the same (pytorch-style) ResNet for every model
        if args.depth < 50:
            cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        if name == "fsaf_static":
            ph, pw = (-(-h // 32) * 32, -(-w // 32) * 32)
            cfg.INPUT.FIXED_SIZES = [[ph, pw], [pw, ph]]
            cfg.MODEL.FSAF.MAX_GT = max(args.boxes, 1)
        if name == "fsaf_retinanet":
            cfg.MODEL.FSAF.ANCHOR_BASED = True
            cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)] for x in (32, 64, 128, 256, 512)]
        model = d2_build(cfg)
    for m in model.modules():  # residual blocks start as identity: random FrozenBN nets stay finite
        last = getattr(m, "conv3", None) or (getattr(m, "conv2", None) if hasattr(m, "shortcut") else None)
        norm = getattr(last, "norm", None)
        if norm is not None and hasattr(norm, "weight"):
            norm.weight.zero_()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def synthetic_batch(n: int, args, seed: int, with_targets: bool = True) -> List[Dict]:
    from detectron2.structures import Boxes, Instances

    h, w = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # uint8 CHW, as Detectron2's dataset mapper produces (the host-to-device copy is part of the step)
        d = {"image": (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8), "height": h, "width": w}
        if with_targets:
            k = args.boxes
            side = torch.exp(torch.empty(k, 2).uniform_(2.8, 6.0, generator=g)).clamp(max=min(h, w) - 2)
            x0 = torch.rand(k, generator=g) * (w - side[:, 0])
            y0 = torch.rand(k, generator=g) * (h - side[:, 1])
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], dim=1))
            inst.gt_classes = torch.randint(0, 80, (k,), generator=g)
            d["instances"] = inst
        out.append(d)
    return out


def _autocast(args):
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.amp)
    device_type = torch.device(args.device).type
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)


def run_worker(name: str, args) -> Dict:
    from fsaf_d2.engine import device as dev

    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    torch.manual_seed(args.seed)
    if args.device.startswith("npu"):
        dev.import_torch_npu()
    model = build_model(name, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.amp == "fp16")
    batch = synthetic_batch(args.batch, args, args.seed)

    from detectron2.utils.events import EventStorage

    storage = EventStorage(0)

    def step():
        with _autocast(args), storage:
            losses = model(batch)
        loss = sum(losses.values())
        with torch.autograd.profiler.record_function("bench.backward"):
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        with torch.autograd.profiler.record_function("bench.optimizer"):
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            scaler.step(opt)
            scaler.update()
        return loss

    for _ in range(args.warmup):
        step()
    dev.synchronize(args.device)
    dev.reset_peak_memory_stats(args.device)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        loss = step()
        dev.synchronize(args.device)
        times.append(time.perf_counter() - t0)
    train_peak = dev.max_memory_allocated(args.device)
    result = {
        "model": name,
        "train_ms_per_iter": 1000 * sum(times) / len(times),
        "train_images_per_sec": args.batch * len(times) / sum(times),
        "train_loss_finite": bool(torch.isfinite(loss).item()),
        "train_peak_mem_gib": None if train_peak is None else train_peak / 2**30,
    }

    if args.profile and name.startswith("fsaf"):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.device(args.device).type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            dev.synchronize(args.device)
        result["profile_ms_per_iter"] = _phase_breakdown(prof, 3)

    model.eval()
    infer = synthetic_batch(args.infer_batch, args, args.seed + 1, with_targets=False)
    with torch.no_grad():
        for _ in range(2):
            with _autocast(args):
                model(infer)
        dev.synchronize(args.device)
        dev.reset_peak_memory_stats(args.device)
        t0 = time.perf_counter()
        for _ in range(args.infer_iters):
            with _autocast(args):
                model(infer)
        dev.synchronize(args.device)
        dt = time.perf_counter() - t0
    infer_peak = dev.max_memory_allocated(args.device)
    result.update(
        {
            "infer_ms_per_iter": 1000 * dt / args.infer_iters,
            "infer_images_per_sec": args.infer_batch * args.infer_iters / dt,
            "infer_peak_mem_gib": None if infer_peak is None else infer_peak / 2**30,
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
    )
    return result


def _phase_breakdown(prof, steps: int) -> Dict[str, float]:
    """Milliseconds per training step spent in each record_function range (device time on accelerators)."""
    out = {}
    for evt in prof.key_averages():
        if evt.key in PHASES:
            device_us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0) or 0
            us = device_us if device_us > 0 else evt.cpu_time_total
            out[evt.key] = us / 1000.0 / steps
    return {k: out[k] for k in PHASES if k in out}


def format_table(results: List[Dict], args) -> str:
    rows = [
        f"device={args.device} batch={args.batch} size={args.size} depth=R{args.depth} amp={args.amp} "
        f"boxes/img={args.boxes} iters={args.iters} (+{args.warmup} warm-up) channels_last={args.channels_last} "
        f"torch={torch.__version__}",
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
    base = {r["model"]: r for r in results if "error" not in r}
    if "retinanet" in base:
        ref = base["retinanet"]
        for name, r in base.items():
            if name != "retinanet":
                rows.append(
                    f"{name} / retinanet: training step time x{r['train_ms_per_iter'] / ref['train_ms_per_iter']:.3f}, "
                    f"training img/s x{r['train_images_per_sec'] / ref['train_images_per_sec']:.3f}, "
                    f"inference img/s x{r['infer_images_per_sec'] / ref['infer_images_per_sec']:.3f}"
                )
    for r in results:
        if "profile_ms_per_iter" in r:
            rows.append(f"profile of {r['model']} (ms per step): " + ", ".join(
                f"{k}={v:.1f}" for k, v in r["profile_ms_per_iter"].items()))
    return "\n".join(rows)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker, args)), flush=True)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    results = []
    for name in args.models:
        cmd = [sys.executable, "-m", "fsaf_d2.benchmark", *argv, "--worker", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append({"model": name, "error": " / ".join(tail)[-300:]})
        else:
            results.append(json.loads(lines[-1][len("RESULT "):]))
        print(f"[benchmark] {name}: done", file=sys.stderr, flush=True)
    table = format_table(results, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results, "table": table}, f, indent=2)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
