"""Batched dense-detector post-processing (docs/algorithm.md#inference): per-level candidate selection over
the whole batch, filtering of unusable boxes, and per-image class-aware NMS after a single host sync.

Every function takes the batch at once, (N, ...) tensors, and works for FSAF's TBLR boxes and for the
combined model's anchor-based boxes alike; the decoding itself is the caller's
(:func:`fsaf_d2.modeling.box_coder.tblr_decode`, RetinaNet's ``Box2BoxTransform``).
"""
from typing import List, Tuple

import torch
from torch import Tensor
from torch.autograd.profiler import record_function
from torchvision.ops import nms

__all__ = [
    "topk_candidates",
    "multi_level_candidates",
    "gather_rows",
    "clip_boxes",
    "usable_boxes",
    "class_aware_nms",
    "detections_per_image",
]


def _topk_count(num: int, topk: int) -> int:
    """min(num, topk). While tracing, sizes are tensors: keep k one, so that it stays data-dependent in the graph."""
    if isinstance(num, Tensor):
        return torch.clamp(num, max=topk)
    return min(num, topk)


def topk_candidates(
    logits: Tensor, score_thresh: float, topk: int, rule: str = "pairs"
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (location, class) candidates of one level for every image of the batch, at a fixed count.

    Args:
        logits: (N, R, C) class logits of the level's R locations.
        score_thresh: a candidate needs sigmoid(logit) > score_thresh.
        topk: per image and level, "pairs" = the top-k (location, class) pairs by score among those above
            the threshold (mmdetection >= 2.18, Detectron2's RetinaNet); "locations" = the top-k locations
            by their best class score, then their pairs above the threshold (mmdetection < 2.18).
    Returns:
        scores (N, K) float32 sigmoid scores, locations (N, K) and classes (N, K) int64 indices, and
        valid (N, K) bool: the candidate exists (score above the threshold, finite logit). K is
        min(topk, R*C) for "pairs" and min(topk, R)*C for "locations", whatever the data: no host sync.
    """
    num_images, num_locations, num_classes = logits.shape
    if rule == "locations":
        _, locations = logits.max(dim=2)[0].topk(_topk_count(num_locations, topk), dim=1)  # (N, k)
        picked = logits.gather(1, locations.unsqueeze(2).expand(-1, -1, num_classes)).flatten(1)  # (N, k*C)
        locations = locations.repeat_interleave(num_classes, dim=1)
        classes = torch.arange(num_classes, device=logits.device).repeat(picked.shape[1] // num_classes)
        classes = classes.unsqueeze(0).expand(num_images, -1)
    else:
        # sigmoid is monotonic: the top-k logits are the top-k scores, and only those k get a sigmoid
        picked, flat = logits.flatten(1).topk(_topk_count(num_locations * num_classes, topk), dim=1)
        locations = flat // num_classes
        classes = flat % num_classes
    scores = picked.float().sigmoid()
    valid = (scores > score_thresh) & torch.isfinite(picked)
    return scores, locations, classes, valid


def multi_level_candidates(
    logits: List[Tensor], score_thresh: float, topk: int, rule: str = "pairs"
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`topk_candidates` of every level, concatenated: locations index the levels' locations
    concatenated in order (level offsets added), so one gather decodes all levels at once.

    Args:
        logits: per level, (N, R_l, C).
    Returns:
        scores, locations, classes, valid: (N, K) each, K the sum of the levels' candidate counts.
    """
    scores: List[Tensor] = []
    locations: List[Tensor] = []
    classes: List[Tensor] = []
    valid: List[Tensor] = []
    offset = 0
    for level_logits in logits:
        s, loc, cls, ok = topk_candidates(level_logits, score_thresh, topk, rule)
        scores.append(s)
        locations.append(loc + offset)
        classes.append(cls)
        valid.append(ok)
        offset += level_logits.shape[1]
    return torch.cat(scores, 1), torch.cat(locations, 1), torch.cat(classes, 1), torch.cat(valid, 1)


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """values (N, R, D), index (N, K) -> (N, K, D): the rows ``index`` of every image."""
    return values.gather(1, index.unsqueeze(2).expand(-1, -1, values.shape[2]))


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """boxes (N, K, 4) XYXY, image_sizes (N, 2) (height, width) -> boxes clipped to [0, W] x [0, H].

    Non-finite coordinates stay non-finite (NaN stays NaN, +-inf are not clipped into the image), so that
    :func:`usable_boxes` can still tell them apart.
    """
    limits = image_sizes.to(boxes.dtype).flip(1).repeat(1, 2).unsqueeze(1)  # (N, 1, 4): W, H, W, H
    clipped = torch.minimum(boxes.clamp(min=0.0), limits)
    return torch.where(torch.isfinite(boxes), clipped, boxes)


def usable_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """boxes (..., 4) XYXY -> (...) bool: finite, and (for ``min_size >= 0``) wider and taller than
    ``min_size`` pixels. mmdetection >= 3.0 drops the others before NMS (its ``min_bbox_size``, 0 for
    FSAF: zero-width and zero-height boxes go); ``min_size < 0`` keeps every finite box, as mmdetection 2.x."""
    ok = torch.isfinite(boxes).all(dim=-1)
    if min_size >= 0:
        ok = ok & (boxes[..., 2] - boxes[..., 0] > min_size) & (boxes[..., 3] - boxes[..., 1] > min_size)
    return ok


def class_aware_nms(boxes: Tensor, scores: Tensor, classes: Tensor, nms_thresh: float) -> Tensor:
    """NMS among boxes of the same class, in float32: (M, 4), (M,), (M,) -> kept indices, by decreasing score.

    Classes are kept apart by shifting each class's boxes by class * (max coordinate + 1), the offset
    torchvision's and mmdetection's batched NMS use, so one ``nms`` call (no loop over classes, no sync)
    does it. The boxes must be clipped (coordinates >= 0); M may be 0.
    """
    boxes = boxes.float()
    max_coordinate = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()  # 0 when there is no box
    offsets = classes.to(boxes.dtype) * (max_coordinate + 1.0)
    return nms(boxes + offsets.unsqueeze(1), scores.float(), nms_thresh)


def _valid_counts(valid: Tensor) -> List[int]:
    """valid (N, K) bool -> per image, the number of valid candidates: the batch's one host sync."""
    with record_function("fsaf::host_sync"):
        counts: List[int] = valid.sum(dim=1).tolist()
    return counts


def detections_per_image(
    boxes: Tensor, scores: Tensor, classes: Tensor, valid: Tensor, nms_thresh: float, max_detections: int
) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Per image, class-aware NMS of its valid candidates and the best ``max_detections``.

    Args:
        boxes (N, K, 4), scores (N, K), classes (N, K), valid (N, K): the batch's candidates.
    Returns:
        per image (boxes (D, 4), scores (D,), classes (D,)), sorted by decreasing score, D <= max_detections.

    One host sync for the batch (the valid counts), except while tracing, where each image's valid candidates
    are found by ``nonzero`` so that the exported graph stays data-dependent. Each image then gets its own
    ``nms`` call: torchvision's NMS has no batch dimension, so a single call over the batch (images kept apart
    by offsets) would compare every pair of candidates of different images too (N times the work) and need
    a second sync to split its result by image.
    """
    candidates: List[Tuple[Tensor, Tensor, Tensor]] = []
    if torch.jit.is_tracing():
        for i in range(scores.shape[0]):
            keep = valid[i].nonzero().squeeze(1)
            candidates.append((boxes[i][keep], scores[i][keep], classes[i][keep]))
    else:
        # the valid candidates first, by decreasing score (invalid ones get -1, below any sigmoid score);
        # stable, so that tied candidates keep their order whatever invalid ones the batch holds
        ranked, order = torch.where(valid, scores, torch.full_like(scores, -1.0)).sort(
            dim=1, descending=True, stable=True
        )
        boxes = gather_rows(boxes, order)
        classes = classes.gather(1, order)
        counts = _valid_counts(valid)
        for i in range(scores.shape[0]):
            candidates.append((boxes[i, : counts[i]], ranked[i, : counts[i]], classes[i, : counts[i]]))
    out: List[Tuple[Tensor, Tensor, Tensor]] = []
    for b, s, c in candidates:
        kept = class_aware_nms(b, s, c, nms_thresh)[:max_detections]
        out.append((b[kept], s[kept], c[kept]))
    return out
