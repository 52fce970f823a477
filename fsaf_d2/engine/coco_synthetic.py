"""Synthetic COCO ground truth and detections, and timed COCOeval runs, for checking evaluation backends.

:func:`synthetic_coco_gt` draws a COCO-format dataset (boxes of small, medium and large area, a few crowd
boxes); :func:`synthetic_detections` draws detections from any dataset's boxes (jittered copies, wrong
classes, false positives, scores that rank good boxes higher on average). :func:`run_cocoeval` times
evaluate + accumulate + summarize of one backend (:mod:`fsaf_d2.engine.evaluation`). Boxes are COCO
``[x, y, w, h]`` pixels; everything is seeded numpy.
"""
import contextlib
import io
import time
from typing import Dict, List, Tuple

import numpy as np

from .evaluation import build_cocoeval

__all__ = ["synthetic_coco_gt", "synthetic_detections", "coco_from_dataset", "run_cocoeval"]


def synthetic_coco_gt(
    num_images: int, num_categories: int = 10, max_boxes: int = 15, crowd_fraction: float = 0.02, seed: int = 0
) -> Dict:
    """A COCO instances dict: ``num_images`` 640x480 images with 1..``max_boxes`` boxes each.

    Box areas are log-uniform in [6^2, 400^2] px (all three COCO size ranges), aspect ratios in [1/2, 2];
    ``area`` is the box area; ``crowd_fraction`` of the boxes have ``iscrowd`` 1.
    """
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id:06d}.jpg"})
        n = int(rng.integers(1, max_boxes + 1))
        area = np.exp(rng.uniform(np.log(6.0**2), np.log(400.0**2), n))
        aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), n))
        w = np.minimum(np.sqrt(area * aspect), width - 1)
        h = np.minimum(np.sqrt(area / aspect), height - 1)
        x = rng.uniform(0, width - w)
        y = rng.uniform(0, height - h)
        cats = rng.integers(1, num_categories + 1, n)
        crowd = rng.random(n) < crowd_fraction
        for i in range(n):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cats[i]),
                    "bbox": [float(x[i]), float(y[i]), float(w[i]), float(h[i])],
                    "area": float(w[i] * h[i]),
                    "iscrowd": int(crowd[i]),
                }
            )
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def synthetic_detections(dataset: Dict, dets_per_image: int = 100, seed: int = 0) -> List[Dict]:
    """Exactly ``dets_per_image`` COCO results per image of ``dataset`` (a COCO instances dict).

    Per ground-truth box (crowd boxes included), up to 3 copies jittered by 2-30 % of its size, 10 % with a
    wrong class, scored higher the smaller the jitter; the rest of the image's quota are false positives of
    random position, size and class with lower scores. Truncated to the quota by score.
    """
    rng = np.random.default_rng(seed)
    cat_ids = np.array(sorted(c["id"] for c in dataset["categories"]))
    boxes_of = {img["id"]: [] for img in dataset["images"]}
    for ann in dataset["annotations"]:
        boxes_of[ann["image_id"]].append(ann["bbox"] + [ann["category_id"]])
    results = []
    for img in dataset["images"]:
        gt = np.array(boxes_of[img["id"]], dtype=np.float64).reshape(-1, 5)
        copies = np.repeat(gt, rng.integers(1, 4, len(gt)), axis=0)
        sigma = rng.uniform(0.02, 0.3, len(copies))
        jitter = rng.normal(0.0, 1.0, (len(copies), 4)) * sigma[:, None]
        wh = copies[:, 2:4]
        tp = np.empty((len(copies), 6))
        tp[:, 0:2] = copies[:, 0:2] + jitter[:, 0:2] * wh
        tp[:, 2:4] = wh * np.exp(jitter[:, 2:4])
        tp[:, 4] = np.where(rng.random(len(copies)) < 0.1, rng.choice(cat_ids, len(copies)), copies[:, 4])
        tp[:, 5] = np.clip(1.0 - sigma * 2.5 + rng.normal(0.0, 0.15, len(copies)), 0.01, 1.0)
        num_fp = max(dets_per_image - len(tp), 0)
        fp = np.empty((num_fp, 6))
        size = np.exp(rng.uniform(np.log(4.0), np.log(300.0), (num_fp, 2)))
        fp[:, 0] = rng.uniform(0, img["width"] - size[:, 0].clip(max=img["width"] - 1))
        fp[:, 1] = rng.uniform(0, img["height"] - size[:, 1].clip(max=img["height"] - 1))
        fp[:, 2:4] = size
        fp[:, 4] = rng.choice(cat_ids, num_fp)
        fp[:, 5] = rng.uniform(0.0, 0.7, num_fp)
        dets = np.concatenate([tp, fp])
        dets = dets[np.argsort(-dets[:, 5], kind="stable")[:dets_per_image]]
        results.extend(
            {"image_id": img["id"], "category_id": int(d[4]), "bbox": [float(v) for v in d[:4]], "score": float(d[5])}
            for d in dets
        )
    return results


def coco_from_dataset(dataset: Dict):
    """A pycocotools ``COCO`` of an instances dict, without its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def run_cocoeval(backend: str, coco_gt, results: List[Dict], iou_type: str = "bbox") -> Tuple[np.ndarray, float]:
    """Box AP of ``results`` on ``coco_gt`` by ``backend``; returns (the 12 ``stats``, seconds).

    The seconds cover evaluate + accumulate + summarize (not ``loadRes``, which both backends share).
    Printed output is swallowed.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        cocoeval = build_cocoeval(backend, coco_gt, coco_dt, iou_type)
        start = time.perf_counter()
        cocoeval.evaluate()
        cocoeval.accumulate()
        cocoeval.summarize()
        seconds = time.perf_counter() - start
    return np.asarray(cocoeval.stats[:12], dtype=np.float64), seconds
