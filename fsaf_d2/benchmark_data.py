"""Throughput of fsaf_d2's training data path, from JPEG files to image batches on the training device.

    python -m fsaf_d2.benchmark_data --images 64 --size 480x640 --batch 16 --workers 0 2 --backends pil cv2
    python -m fsaf_d2.benchmark_data --device cuda --workers 4 8 12 --backends cv2 --pin-memory 0 1

(also ``python tools/benchmark_data.py`` and, installed, ``fsaf-benchmark-data``).

It writes ``--images`` synthetic COCO-like JPEGs (``--size`` HxW, smooth content plus noise, ``--boxes``
boxes each over 80 categories) and a COCO json to a temporary folder, registers them, and times the loader
that ``train_net.py`` builds (:func:`fsaf_d2.data.build_fsaf_train_loader` on the config of
:func:`fsaf_d2.engine.build_config`, by default the FSAF R50 config's augmentation: shortest edge 800,
longest at most 1333, random flip) for every combination of loader workers, resize backend
(``INPUT.RESIZE_BACKEND``) and pinned memory (``DATALOADER.PIN_MEMORY``). Each timed batch is also handed
to the device as FSAF's ``preprocess_image`` does: the uint8 images are copied (non-blocking from pinned
memory), then normalised to float there; the time includes a device synchronisation per batch.

``--decoders`` adds the JPEG decoders on their own, in ms per image over the dataset: ``pil`` (Detectron2's
``read_image``, what the loader uses), ``torchvision`` (``torchvision.io.decode_jpeg`` on the CPU) and
``torchvision-cuda`` (``decode_jpeg(..., device="cuda")`` on a batch of ``--batch`` files).

With 0 workers the figure is what one CPU core delivers; a GPU step of B images that takes T seconds needs
``B / T`` images/s from the loader to never wait.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

from fsaf_d2.benchmarking import machine_description
from fsaf_d2.config import FSAF_VALID_CHOICES
from fsaf_d2.data import build_fsaf_train_loader
from fsaf_d2.engine import build_config
from fsaf_d2.engine import device as dev
from fsaf_d2.model_zoo import get_config_file, resolve_config_file

DECODERS = ("pil", "torchvision", "torchvision-cuda")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="synthetic images in the dataset")
    p.add_argument("--size", default="480x640", help="HxW of the stored JPEGs (COCO's typical 480x640)")
    p.add_argument("--boxes", type=int, default=7, help="objects per image (COCO averages 7.3)")
    p.add_argument("--batch", type=int, default=16, help="images per batch (SOLVER.IMS_PER_BATCH)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DATALOADER.NUM_WORKERS values")
    p.add_argument(
        "--backends", nargs="+", default=["pil", "cv2"], choices=FSAF_VALID_CHOICES["INPUT.RESIZE_BACKEND"],
        help="INPUT.RESIZE_BACKEND",
    )
    p.add_argument(
        "--pin-memory", type=int, nargs="+", default=[0], choices=[0, 1],
        help="DATALOADER.PIN_MEMORY values (pinning needs an accelerator: cuda or npu)",
    )
    p.add_argument("--device", default="cpu", help="where each batch is delivered (MODEL.DEVICE)")
    p.add_argument("--decoders", nargs="*", default=[], choices=DECODERS, help="time these JPEG decoders alone")
    p.add_argument(
        "--batches", type=int, default=24,
        help="timed batches per setting; keep it well above 2 x workers, the batches the workers prefetch",
    )
    p.add_argument(
        "--warmup", type=int, default=-1,
        help="untimed batches per setting (worker start-up); -1 = 2 x workers + 1, which empties the prefetch queue",
    )
    p.add_argument(
        "--config-file", default=get_config_file("fsaf_R50_FPN_1x.yaml"),
        help="the training config: a path or a shipped config's name (default: the shipped fsaf_R50_FPN_1x.yaml)",
    )
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        args.config_file = resolve_config_file(args.config_file)
    except FileNotFoundError as e:
        p.error(f"--config-file: {e}")
    if any(args.pin_memory) and not dev.is_accelerator(dev.device_type_of(args.device)):
        p.error(f"--pin-memory 1 needs an accelerator --device (cuda or npu), not {args.device!r}")
    return args


def write_synthetic_coco(root: str, num_images: int, height: int, width: int, boxes: int, seed: int = 0) -> str:
    """``num_images`` JPEGs under ``root`` and their COCO json (returned path); 80 categories, ids 1..80."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(num_images):
        coarse = rng.uniform(0, 255, size=(max(height // 16, 2), max(width // 16, 2), 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 8, size=smooth.shape), 0, 255).astype(np.uint8)
        name = f"{i:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, name), quality=90)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        for _ in range(boxes):
            bw = float(rng.uniform(8, width / 2))
            bh = float(rng.uniform(8, height / 2))
            x0 = float(rng.uniform(0, width - bw))
            y0 = float(rng.uniform(0, height - bh))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(rng.integers(1, 81)),
                    "bbox": [x0, y0, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k, "name": f"class_{k}"} for k in range(1, 81)]
    path = os.path.join(root, "annotations.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def to_device(batch: List[Dict], device: torch.device, mean: torch.Tensor, std: torch.Tensor) -> List[torch.Tensor]:
    """The images of a batch on ``device`` as FSAF's ``preprocess_image`` makes them: copied as uint8
    (non-blocking, which overlaps from pinned memory), then normalised to float32 on the device."""
    return [(x["image"].to(device, non_blocking=True) - mean) / std for x in batch]


def time_loader(cfg, batches: int, warmup: int) -> Dict:
    """Images/s and seconds per batch of ``build_fsaf_train_loader(cfg)`` over ``batches`` batches, each batch
    delivered to ``cfg.MODEL.DEVICE`` (:func:`to_device`, synchronised)."""
    device = torch.device(cfg.MODEL.DEVICE)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(-1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(-1, 1, 1)
    loader = iter(build_fsaf_train_loader(cfg))
    for _ in range(warmup):
        to_device(next(loader), device, mean, std)
    dev.synchronize(device.type)
    waits: List[float] = []
    sizes, dtypes, pinned = [], set(), set()
    t_start = time.perf_counter()
    for _ in range(batches):
        t0 = time.perf_counter()
        batch = next(loader)
        waits.append(time.perf_counter() - t0)
        to_device(batch, device, mean, std)
        dev.synchronize(device.type)
        sizes.extend(tuple(x["image"].shape[-2:]) for x in batch)
        dtypes.update(str(x["image"].dtype) for x in batch)
        pinned.update(bool(x["image"].is_pinned()) for x in batch if device.type != "cpu")
    total = time.perf_counter() - t_start
    images = batches * cfg.SOLVER.IMS_PER_BATCH
    return {
        "images_per_sec": images / total,
        "ms_per_batch": 1000 * total / batches,
        "ms_wait_per_batch_median": 1000 * statistics.median(waits),
        "mean_output_hw": [float(np.mean([s[0] for s in sizes])), float(np.mean([s[1] for s in sizes]))],
        "loader_image_dtypes": sorted(dtypes),
        "pinned": sorted(pinned),
    }


def time_decoders(files: List[str], decoders, batch: int) -> Dict[str, float]:
    """Milliseconds per image of each JPEG decoder over ``files`` (after one untimed pass)."""
    from detectron2.data.detection_utils import read_image
    from torchvision.io import decode_jpeg, read_file

    def pil():
        for f in files:
            read_image(f, format="BGR")

    def tv_cpu():
        for f in files:
            decode_jpeg(read_file(f))

    def tv_cuda():
        data = [read_file(f) for f in files]
        for k in range(0, len(data), batch):
            decode_jpeg(data[k : k + batch], device="cuda")
        torch.cuda.synchronize()

    runs = {"pil": pil, "torchvision": tv_cpu, "torchvision-cuda": tv_cuda}
    out = {}
    for name in decoders:
        if name == "torchvision-cuda" and not torch.cuda.is_available():
            out[name] = None
            continue
        runs[name]()
        t0 = time.perf_counter()
        runs[name]()
        out[name] = 1000 * (time.perf_counter() - t0) / len(files)
    return out


def main(argv=None):
    args = parse_args(argv)
    from detectron2.data.datasets import register_coco_instances

    h, w = (int(v) for v in args.size.split("x"))
    config_file = args.config_file
    results = []
    with tempfile.TemporaryDirectory(prefix="fsaf_data_bench_") as root:
        json_file = write_synthetic_coco(root, args.images, h, w, args.boxes)
        name = f"fsaf_data_bench_{os.getpid()}"
        register_coco_instances(name, {}, json_file, root)
        decoders = time_decoders(
            sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".jpg")), args.decoders, args.batch
        )
        for backend in args.backends:
            for pin in args.pin_memory:
                for workers in args.workers:
                    opts = [
                        "MODEL.DEVICE", args.device,
                        "DATASETS.TRAIN", (name,),
                        "SOLVER.IMS_PER_BATCH", args.batch,
                        "DATALOADER.NUM_WORKERS", workers,
                        "DATALOADER.PIN_MEMORY", bool(pin),
                        "INPUT.RESIZE_BACKEND", backend,
                        "SEED", 0,
                    ]
                    cfg = build_config(config_file, opts)
                    warmup = args.warmup if args.warmup >= 0 else 2 * workers + 1
                    r = time_loader(cfg, args.batches, warmup)
                    r.update({"backend": backend, "workers": workers, "pin_memory": bool(pin)})
                    results.append(r)
                    print(
                        f"[benchmark_data] {backend} workers={workers} pin_memory={bool(pin)}: "
                        f"{r['images_per_sec']:.1f} img/s",
                        file=sys.stderr,
                    )
    table = format_table(args, results, decoders)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": machine_description(), "results": results,
                       "decoders_ms_per_image": decoders, "table": table}, f, indent=2)
    return 0


def format_table(args, results: List[Dict], decoders: Dict[str, float]) -> str:
    m = machine_description()
    rows = [
        f"data loader: {args.images} JPEGs {args.size}, {args.boxes} boxes/img, batch {args.batch}, "
        f"{args.batches} timed batches (after warm-up), config {os.path.basename(args.config_file)}, "
        f"delivered to {args.device}; CPU {m['cpu']} ({m['cpu_count']} cores, torch CPU capability "
        f"{m['cpu_capability']}){'; GPU ' + m['cuda_device'] if m['cuda_device'] else ''}",
        "| resize backend | workers | pinned | images/s | ms per batch | loader wait ms (median) | mean output HxW | dtype |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        hw = r["mean_output_hw"]
        rows.append(
            f"| {r['backend']} | {r['workers']} | {r['pin_memory']} | {r['images_per_sec']:.1f} | "
            f"{r['ms_per_batch']:.0f} | {r['ms_wait_per_batch_median']:.0f} | {hw[0]:.0f}x{hw[1]:.0f} | "
            f"{'/'.join(r['loader_image_dtypes'])} |"
        )
    for name, ms in decoders.items():
        rows.append(f"decoder {name}: " + ("not available (no cuda)" if ms is None else f"{ms:.2f} ms per image"))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
