#!/usr/bin/env python
"""Inference throughput of FSAF against Detectron2's RetinaNet, paired in one process, with post-processing
loaded the way a trained COCO model loads it.

    python tools/benchmark_inference.py --device cpu --batches 1 4 --size 512x768 --depth 50
    python tools/benchmark_inference.py --device cuda --batches 1 8 --size 800x1344 --amp fp16 --out inf.json

(installed: ``fsaf-benchmark-inference ...``; ``--config-file`` takes a path or a shipped config's name.)

Random weights give no score above the 0.05 threshold, so the post-processing (threshold, top-k, decoding,
NMS) would hardly run. Here every model's classifier is calibrated on each batch's images instead: its
weights are scaled so that the logits spread (standard deviation ``--logit-std``) and its bias shifted so
that ``--candidates`` (location, class) pairs per image (on average over the batch) score above 0.05 before
the per-level top-k, as for a trained COCO model. The same images, backbone (``tools/benchmark.py``'s: depth ``--depth``, FrozenBN,
pytorch-style ResNet) and settings serve both models, each in its shipped conv layout unless
``--memory-format`` says otherwise. The report gives, per batch size, the images/s of the whole model (the
median over ``--iters`` calls, alternating between the models), the time of the post-processing alone
(``forward_inference`` on stored head outputs), and the pairs above the threshold, the candidates that
reach NMS and the detections per image.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import fsaf_d2  # noqa: F401  (first: registers FSAF, and Detectron2's import-time warnings stay quiet)
from detectron2.structures import ImageList

from fsaf_d2.benchmarking import machine_description, make_infer_call, synthetic_batch, time_alternating
from fsaf_d2.model_zoo import get_config_file

try:  # python tools/benchmark_inference.py: tools/ is on sys.path
    from benchmark import _model_spec as benchmark_model_spec
    from benchmark import build_model
except ImportError:  # the installed fsaf_d2.tools
    from fsaf_d2.tools.benchmark import _model_spec as benchmark_model_spec
    from fsaf_d2.tools.benchmark import build_model

MODELS = ("fsaf", "retinanet")


def _model_spec(spec: str) -> str:
    """A tools/benchmark.py model spec whose model this tool times (a typo would otherwise build FSAF)."""
    if spec.split("+")[0] not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {spec.split('+')[0]!r}; choose from {list(MODELS)}")
    return benchmark_model_spec(spec)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--config-file", default=get_config_file("fsaf_R50_FPN_1x.yaml"))
    p.add_argument("--models", nargs="+", default=list(MODELS), type=_model_spec,
                   help="model specs, as in tools/benchmark.py: fsaf or retinanet, with +KEY=VALUE overrides")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="images per inference call")
    p.add_argument("--size", default="512x768", help="HxW of every image")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--candidates", type=int, default=3000, help="(location, class) pairs above 0.05 per image")
    p.add_argument("--logit-std", type=float, default=1.5, help="spread of the calibrated logits")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"])
    p.add_argument(
        "--memory-format", default="config", choices=["config", "channels_last", "contiguous"],
        help="conv layout of every model (config: each as shipped)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare-nms", type=int, default=0, metavar="CANDIDATES",
        help="only time NMS of the largest batch as one call per image vs one call over the batch, "
        "with this many random candidates per image",
    )
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.boxes = 7  # tools/benchmark.build_model's static-shape setting; no ground truth is used here
    return args


def _precision(args):
    return {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]


def head_outputs(model, inputs, precision, device):
    """(images, features, predictions) of ``model`` on ``inputs``: what ``forward_inference`` takes."""
    from fsaf_d2.benchmarking import autocast

    with torch.no_grad(), autocast(device, precision):
        images = model.preprocess_image(inputs)
        if hasattr(model, "features_and_predictions"):  # FSAF
            features, predictions = model.features_and_predictions(images.tensor)
        else:  # Detectron2's DenseDetector
            feats = model.backbone(images.tensor)
            features = [feats[f] for f in model.head_in_features]
            predictions = model.head(features)
    return images, features, predictions


def float32_post_processing(model):
    """Give a Detectron2 detector's ``forward_inference`` float32 head outputs. Under fp16 autocast its
    ``batched_nms`` casts the boxes to float32 but not the scores, which torchvision's ``nms`` rejects;
    FSAF's post-processing is float32 by itself."""
    run = model.forward_inference

    def forward_inference(images, features, predictions):
        return run(images, features, [[x.float() for x in per_level] for per_level in predictions])

    model.forward_inference = forward_inference
    return model


def calibrate_classifier(model, inputs, target: int, logit_std: float, device: str):
    """Scale the classifier's weights and shift its bias so that the logits on ``inputs`` have standard
    deviation ``logit_std`` and ``target`` (location, class) pairs per image score above the threshold."""
    conv = model.head.cls_score
    thresh = math.log(0.05 / 0.95)
    with torch.no_grad():
        conv.bias.zero_()
        _, _, predictions = head_outputs(model, inputs, None, device)
        logits = torch.cat([x.float().flatten() for x in predictions[0]])
        conv.weight.mul_(logit_std / max(float(logits.std()), 1e-12))
        _, _, predictions = head_outputs(model, inputs, None, device)
        logits = torch.cat([x.float().flatten() for x in predictions[0]])
        above = min(target * len(inputs), logits.numel() - 1)
        conv.bias.fill_(thresh - float(logits.kthvalue(logits.numel() - above).values))


def candidate_counts(model, predictions, num_images: int) -> Dict[str, float]:
    """Per image (mean): pairs above the score threshold, and candidates reaching NMS (per-level top-k)."""
    thresh = getattr(model, "test_score_thresh", 0.05)
    topk = model.test_topk_candidates
    above, candidates = 0, 0
    for level in predictions[0]:
        counts = (level.float().sigmoid() > thresh).flatten(1).sum(1)
        above += int(counts.sum())
        candidates += int(counts.clamp(max=topk).sum())
    return {"pairs_above_thresh_per_image": above / num_images, "nms_candidates_per_image": candidates / num_images}


def run(args) -> List[Dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = tuple(int(v) for v in args.size.split("x"))
    models = {name: build_model(name, args).eval() for name in args.models}
    for model in models.values():
        if not hasattr(model, "features_and_predictions"):
            float32_post_processing(model)
    precision = _precision(args)
    results = []
    for batch in args.batches:
        inputs = synthetic_batch(batch, size, args.boxes, args.seed + batch, with_targets=False)
        for model in models.values():  # on these very images: random backbones respond to each image
            calibrate_classifier(model, inputs, args.candidates, args.logit_std, args.device)
        calls = {name: make_infer_call(models[name], inputs, args.device, precision) for name in models}
        time_alternating(calls, args.warmup, args.device)
        times, outputs = time_alternating(calls, args.iters, args.device)
        stored = {name: head_outputs(models[name], inputs, precision, args.device) for name in models}
        counts = {name: candidate_counts(models[name], stored[name][2], batch) for name in models}

        def post(name):
            model, (images, features, _) = models[name], stored[name]
            return lambda predictions: model.forward_inference(
                ImageList(images.tensor, images.image_sizes), features, predictions
            )

        def fresh_predictions(name):
            # Detectron2's RetinaNet applies the sigmoid in place (sigmoid_), which reaches the stored logits
            # whenever its (N, HWA, K) transpose is a view of them (channels-last): every call gets a copy
            return lambda: [[x.clone() for x in per_level] for per_level in stored[name][2]]

        post_calls = {name: post(name) for name in models}
        fresh = {name: fresh_predictions(name) for name in models}
        time_alternating(post_calls, args.warmup, args.device, prepare=fresh)
        post_times, _ = time_alternating(post_calls, args.iters, args.device, prepare=fresh)
        for name in models:
            t = statistics.median(times[name])
            dets = [len(o["instances"]) for o in outputs[name][-1]]
            results.append(
                {
                    "model": name,
                    "batch": batch,
                    "ms_per_call": 1000 * t,
                    "ms_all": [round(1000 * x, 2) for x in times[name]],
                    "images_per_sec": batch / t,
                    "postprocess_ms_per_call": 1000 * statistics.median(post_times[name]),
                    "detections_per_image": sum(dets) / len(dets),
                    **counts[name],
                }
            )
    return results


def compare_nms_calls(num_images: int, candidates: int, num_classes: int, iters: int, seed: int) -> Dict:
    """NMS of a batch as one call per image (what FSAF does) or as one call over the batch, images kept apart
    like classes by coordinate offsets (the single call then compares candidates of different images too,
    and splitting its output by image needs the image ids on the host). Random boxes of 4-124 px in
    700x700; returns the median ms of each and whether they keep the same detections."""
    from fsaf_d2.modeling.inference import class_aware_nms

    g = torch.Generator().manual_seed(seed)
    boxes, scores, classes = [], [], []
    for _ in range(num_images):
        xy = torch.rand(candidates, 2, generator=g) * 700
        boxes.append(torch.cat([xy, xy + torch.rand(candidates, 2, generator=g) * 120 + 4], 1))
        scores.append(torch.rand(candidates, generator=g))
        classes.append(torch.randint(0, num_classes, (candidates,), generator=g))

    def per_image():
        return [class_aware_nms(b, s, c, 0.5)[:100] for b, s, c in zip(boxes, scores, classes)]

    def one_call():
        ids = torch.cat([c + i * num_classes for i, c in enumerate(classes)])
        keep = class_aware_nms(torch.cat(boxes), torch.cat(scores), ids, 0.5)
        image = keep // candidates
        return [keep[image == i][:100] - i * candidates for i in range(num_images)]

    out = {}
    for fn in (per_image, one_call):
        fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[f"{fn.__name__}_ms"] = 1000 * statistics.median(times)
    out["same_detections"] = all(torch.equal(a, b) for a, b in zip(per_image(), one_call()))
    out.update(images=num_images, candidates_per_image=candidates, classes=num_classes)
    return out


def format_table(results: List[Dict], args) -> str:
    lines = [
        f"inference, {args.device}, {args.size}, R-{args.depth}, amp {args.amp}, layout {args.memory_format}",
        "| model | batch | img/s | ms/call | post-processing ms/call | pairs > 0.05 / img | NMS candidates / img "
        "| detections / img | img/s vs retinanet |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["batch"]: r for r in results if r["model"] == "retinanet"}
    for r in results:
        ratio = r["images_per_sec"] / base[r["batch"]]["images_per_sec"] if r["batch"] in base else float("nan")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['images_per_sec']:.3f} | {r['ms_per_call']:.1f} | "
            f"{r['postprocess_ms_per_call']:.1f} | {r['pairs_above_thresh_per_image']:.0f} | "
            f"{r['nms_candidates_per_image']:.0f} | {r['detections_per_image']:.0f} | x{ratio:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare_nms:
        if args.threads:
            torch.set_num_threads(args.threads)
        results = compare_nms_calls(max(args.batches), args.compare_nms, 80, args.iters, args.seed)
        print(json.dumps(results))
    else:
        results = run(args)
        print(format_table(results, args))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": machine_description(), "results": results}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
