"""FSAF inference: per-level candidate selection and class-aware NMS (docs/algorithm.md#inference); decoding is
:func:`fsaf_d2.modeling.box_coder.tblr_decode`."""
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from torch import Tensor

__all__ = ["select_level_candidates", "nms_and_topk", "merge_levels"]


def _topk_count(num: int, topk: int) -> int:
    """min(num, topk). While tracing, sizes are tensors: keep k one, so that it stays data-dependent in the graph."""
    if isinstance(num, Tensor):
        return torch.clamp(num, max=topk)
    return min(num, topk)


def select_level_candidates(
    scores: Tensor, score_thresh: float, topk: int, rule: str = "pairs"
) -> Tuple[Tensor, Tensor, Tensor]:
    """Pick the (location, class) candidates of one level of one image.

    Args:
        scores: (R_l, C) sigmoid scores.
        rule: "pairs" = keep pairs with score > thresh, then the top-k pairs (mmdetection >= 2.18,
            Detectron2's RetinaNet); "locations" = the top-k locations by their best class score, then
            their pairs with score > thresh (mmdetection < 2.18).
    Returns:
        (scores (K,), location indices (K,), class indices (K,)), sorted by decreasing score.
    """
    num_classes = scores.shape[1]
    if rule == "locations":
        _, locations = scores.max(dim=1)[0].topk(_topk_count(scores.shape[0], topk))
        scores = scores[locations]
        keep = scores > score_thresh
        flat = keep.flatten().nonzero().squeeze(1)
        kept_scores = scores.flatten()[flat]
        order = kept_scores.argsort(descending=True)
        flat = flat[order]
        return kept_scores[order], locations[flat // num_classes], flat % num_classes
    flat_scores = scores.flatten()
    keep = (flat_scores > score_thresh).nonzero().squeeze(1)
    flat_scores = flat_scores[keep]
    top_scores, order = flat_scores.topk(_topk_count(keep.shape[0], topk))
    flat = keep[order]
    return top_scores, flat // num_classes, flat % num_classes


def nms_and_topk(
    boxes: Tensor, scores: Tensor, classes: Tensor, nms_thresh: float, max_detections: int
) -> Tensor:
    """Class-aware NMS, then the best ``max_detections``; returns the kept indices (sorted by score)."""
    keep = batched_nms(boxes.float(), scores.float(), classes, nms_thresh)
    return keep[:max_detections]


def merge_levels(
    per_level: List[Tuple[Tensor, Tensor, Tensor]], nms_thresh: float, max_detections: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Concatenate (boxes, scores, classes) of all levels (and branches), NMS, top ``max_detections``."""
    boxes = torch.cat([x[0] for x in per_level])
    scores = torch.cat([x[1] for x in per_level])
    classes = torch.cat([x[2] for x in per_level])
    keep = nms_and_topk(boxes, scores, classes, nms_thresh, max_detections)
    return boxes[keep], scores[keep], classes[keep]
