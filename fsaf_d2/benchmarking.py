"""Timing of training steps and inference calls, for comparing models in one run (``tools/benchmark.py``).

Synthetic batches (:func:`synthetic_batch`), closures of one training step / inference call
(:func:`make_train_step`, :func:`make_infer_call`), a timing loop that alternates between models so that
machine drift hits all of them alike (:func:`time_alternating`), the per-phase breakdown of a profile
(:func:`phase_breakdown`, the ``record_function`` ranges in :data:`PHASES`) and the combination of repeated
rounds (:func:`combine_rounds`, :func:`round_ratios`). Times are seconds, sizes (H, W) pixels.
"""
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from .engine import device as dev

__all__ = [
    "TINY_MODEL_OPTS",
    "PHASES",
    "synthetic_batch",
    "training_input",
    "autocast",
    "make_train_step",
    "make_infer_call",
    "time_alternating",
    "all_finite",
    "range_hooks",
    "phase_breakdown",
    "top_ops",
    "round_ratios",
    "combine_rounds",
    "machine_description",
]

#: profiler ranges of an FSAF training step: the model's own ("fsaf.*") and those of the benchmark ("bench.*")
#: config opts of a small FSAF for CPU checks: ResNet-18 with BN (FrozenBN with random weights diverges),
#: 64 FPN channels, 3 classes, random weights, CPU (used by tools/compile_report.py and the tests)
TINY_MODEL_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", 64,
    "MODEL.FSAF.NUM_CLASSES", 3,
]
PHASES = (
    "fsaf.preprocess",
    "fsaf.backbone",
    "bench.resnet",
    "bench.fpn",
    "fsaf.head",
    "fsaf.assignment",
    "fsaf.dense_losses",
    "fsaf.selection",
    "fsaf.reduce",
    "bench.backward",
    "bench.optimizer",
)



def synthetic_batch(n: int, size: Tuple[int, int], boxes: int, seed: int, with_targets: bool = True) -> List[Dict]:
    """``n`` random images of ``size`` (H, W), each with ``boxes`` random COCO-like boxes over 80 classes."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # uint8 CHW, as Detectron2's dataset mapper produces (the host-to-device copy is part of the step)
        d = {"image": (torch.rand(3, h, w, generator=g) * 255).to(torch.uint8), "height": h, "width": w}
        if with_targets:
            k = boxes
            side = torch.exp(torch.empty(k, 2).uniform_(2.8, 6.0, generator=g)).clamp(max=min(h, w) - 2)
            x0 = torch.rand(k, generator=g) * (w - side[:, 0])
            y0 = torch.rand(k, generator=g) * (h - side[:, 1])
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], dim=1))
            inst.gt_classes = torch.randint(0, 80, (k,), generator=g)
            d["instances"] = inst
        out.append(d)
    return out


def training_input(height: int, width: int, boxes, classes, seed: int = 0) -> Dict:
    """One training input in Detectron2's format: a random float image (3, H, W) in [0, 255) and the given
    ground truth (``boxes`` (K, 4) XYXY pixels, ``classes`` (K,) ids); "height" / "width" are the image's."""
    g = torch.Generator().manual_seed(seed)
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    image = torch.rand(3, height, width, generator=g) * 255
    return {"image": image, "instances": inst, "height": height, "width": width}


def autocast(device: str, precision: Optional[torch.dtype]):
    """``torch.autocast`` on the type of ``device`` to ``precision``; disabled when ``precision`` is None."""
    return torch.autocast(torch.device(device).type, dtype=precision, enabled=precision is not None)


def make_train_step(model, batch, device: str, precision: Optional[torch.dtype] = None):
    """A closure running one training step (forward, backward, clip, SGD) of ``model`` on ``batch``.

    ``precision``: the autocast dtype (float16 adds a gradient scaler), or None for float32.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == torch.float16)
    storage = EventStorage(0)

    def step():
        with autocast(device, precision), storage:
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

    return step


def make_infer_call(model, inputs, device: str, precision: Optional[torch.dtype] = None):
    """A closure running ``model`` in evaluation mode on ``inputs`` (no grad, autocast to ``precision``)."""
    model.eval()

    def call():
        with torch.no_grad(), autocast(device, precision):
            return model(inputs)

    return call


def time_alternating(
    calls: Dict[str, Callable], iters: int, device: str, prepare: Optional[Dict[str, Callable]] = None
):
    """Call every function ``iters`` times, the order of the functions reversed every iteration, each call
    timed up to a device synchronisation. Returns ({name: [seconds]}, {name: [return values]}).

    ``prepare``: {name: function} whose result is the argument of that call, made (and synchronised) before
    the call's clock starts, e.g. a fresh copy of inputs that the call changes in place."""
    names = list(calls)
    times: Dict[str, List[float]] = {name: [] for name in names}
    outputs: Dict[str, list] = {name: [] for name in names}
    for i in range(iters):
        for name in names if i % 2 == 0 else reversed(names):
            args = ()
            if prepare is not None:
                args = (prepare[name](),)
                dev.synchronize(device)
            t0 = time.perf_counter()
            out = calls[name](*args)
            dev.synchronize(device)
            times[name].append(time.perf_counter() - t0)
            outputs[name].append(out)
    return times, outputs


def all_finite(losses) -> bool:
    """Whether every (0-dim) loss is finite."""
    return all(bool(torch.isfinite(x).item()) for x in losses)


def range_hooks(module, name: str):
    """Wrap every forward of ``module`` in a profiler range ``name`` (hooks; the model code is untouched)."""
    if module is None:
        return []
    open_ranges = []

    def enter(_module, _inputs):
        rng = torch.autograd.profiler.record_function(name)
        rng.__enter__()
        open_ranges.append(rng)

    def leave(_module, _inputs, _outputs):
        open_ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def phase_breakdown(prof, steps: int) -> Dict[str, float]:
    """Milliseconds per training step spent in each record_function range (device time on accelerators).

    "bench.resnet" is the ResNet (``backbone.bottom_up``) inside "fsaf.backbone"; "bench.fpn" is the rest of
    the backbone range (lateral and output convs, top block).
    """
    out = {}
    for evt in prof.key_averages():
        if evt.key in PHASES:
            device_us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0) or 0
            us = device_us if device_us > 0 else evt.cpu_time_total
            out[evt.key] = us / 1000.0 / steps
    if "fsaf.backbone" in out and "bench.resnet" in out:
        out["bench.fpn"] = out["fsaf.backbone"] - out["bench.resnet"]
    return {k: out[k] for k in PHASES if k in out}


def top_ops(prof, steps: int, n: int = 10) -> Dict[str, float]:
    """The ``n`` operators and kernels with the most self time, in milliseconds per training step (device
    time on accelerators). Inside a compiled step the model's record_function ranges are gone: this is its
    profile (Inductor's fused kernels, convolutions, the CUDA graph replay)."""
    rows = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0) or 0
        us = device_us if device_us > 0 else evt.self_cpu_time_total
        if evt.key not in PHASES and not evt.key.startswith("ProfilerStep"):
            rows.append((us, evt.key))
    rows.sort(reverse=True)
    return {key[:80]: us / 1000.0 / steps for us, key in rows[:n]}


def round_ratios(rounds: List[List[Dict]], name: str, base: str = "retinanet") -> List[float]:
    """Training-step time of ``name`` over ``base`` in each round (the two ran back to back)."""
    out = []
    for per_model in rounds:
        by = {r["model"]: r for r in per_model if "error" not in r}
        if name in by and base in by:
            out.append(by[name]["train_ms_per_iter"] / by[base]["train_ms_per_iter"])
    return out


_MEDIAN_KEYS = ("train_ms_per_iter", "train_images_per_sec", "infer_ms_per_iter", "infer_images_per_sec")


def combine_rounds(rounds: List[List[Dict]]) -> List[Dict]:
    """One result per model: the first round's record, with the timing figures replaced by their median
    over rounds (a model that failed in any round is reported with its error)."""
    combined = []
    for per_model in zip(*rounds):
        failed = [r for r in per_model if "error" in r]
        if failed:
            combined.append(failed[0])
            continue
        r = dict(per_model[0])
        for key in _MEDIAN_KEYS:
            r[key] = statistics.median(x[key] for x in per_model)
        r["rounds"] = len(per_model)
        for key in ("train_peak_mem_gib", "infer_peak_mem_gib", "max_rss_gib"):
            values = [x[key] for x in per_model if x.get(key) is not None]
            r[key] = max(values) if values else None
        r["train_loss_finite"] = all(x["train_loss_finite"] for x in per_model)
        combined.append(r)
    return combined


def machine_description() -> Dict[str, object]:
    """What a CPU figure depends on: the CPU model and its vector extensions as the kernels see them
    (``torch.backends.cpu.get_cpu_capability()``, which ``ATEN_CPU_CAPABILITY`` can lower), cores, torch."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if flags and model != "unknown":
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512f": "avx512f" in flags,
        "avx2": "avx2" in flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
