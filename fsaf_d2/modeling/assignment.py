"""CenterRegion target assignment of FSAF, vectorised over images, priors and objects.

Every rule follows the reference (mmdetection v2.28.2 ``CenterRegionAssigner`` and
``FSAFHead._get_targets_single``); docs/algorithm.md#centerregion-assignment describes them. Shapes:

* N images, R priors (all levels concatenated, shared by the images), G ground-truth slots per image
  (padded; ``gt_valid`` marks the real ones), C classes.

Nothing here synchronises with the host: there is no Python loop over objects, no ``nonzero`` and no
boolean indexing, so the same code serves dynamic shapes and static (padded) shapes.
"""
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["scale_boxes", "centers_strictly_inside", "pairwise_iof", "AssignmentResult", "assign_center_region"]


def scale_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Scale XYXY boxes (..., 4) about their centres by ``scale`` (half-sizes multiplied by ``scale``)."""
    cx = (boxes[..., 0] + boxes[..., 2]) * 0.5
    cy = (boxes[..., 1] + boxes[..., 3]) * 0.5
    hw = (boxes[..., 2] - boxes[..., 0]) * (0.5 * scale)
    hh = (boxes[..., 3] - boxes[..., 1]) * (0.5 * scale)
    return torch.stack([cx - hw, cy - hh, cx + hw, cy + hh], dim=-1)


def centers_strictly_inside(priors: Tensor, boxes: Tensor) -> Tensor:
    """priors (R, 4), boxes (N, G, 4) -> (N, R, G) bool: prior centre strictly inside the box.

    A centre exactly on the border is outside (the reference's four strict inequalities).
    """
    cx = ((priors[:, 0] + priors[:, 2]) * 0.5)[None, :, None]
    cy = ((priors[:, 1] + priors[:, 3]) * 0.5)[None, :, None]
    b = boxes[:, None, :, :]
    return (cx > b[..., 0]) & (cx < b[..., 2]) & (cy > b[..., 1]) & (cy < b[..., 3])


def pairwise_iof(priors: Tensor, boxes: Tensor, eps: float = 1e-6) -> Tensor:
    """Intersection over the prior's area. priors (R, 4), boxes (N, G, 4) -> (N, R, G).

    No +1 pixel convention; the denominator is clamped at ``eps``.
    """
    p = priors[None, :, None, :]
    b = boxes[:, None, :, :]
    iw = (torch.minimum(p[..., 2], b[..., 2]) - torch.maximum(p[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(p[..., 3], b[..., 3]) - torch.maximum(p[..., 1], b[..., 1])).clamp(min=0)
    area = ((priors[:, 2] - priors[:, 0]) * (priors[:, 3] - priors[:, 1])).clamp(min=eps)
    return iw * ih / area[None, :, None]


@dataclass
class AssignmentResult:
    """Per-prior assignment of a batch.

    Attributes:
        gt_index: (N, R) int64, the ground-truth slot a positive prior is assigned to, -1 otherwise.
        positive: (N, R) bool, candidate positives (before online level selection).
        negative: (N, R) bool, background priors (trained as negatives on every class except the
            shadowed ones).
        shadowed_classes: (N, R, C) bool, (prior, class) pairs that are ignored: the prior lies in the
            shadow region of an object of that class, or in the core of a larger object of that class.
    """

    gt_index: Tensor
    positive: Tensor
    negative: Tensor
    shadowed_classes: Tensor


def assign_center_region(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    prior_valid: Tensor,
    num_classes: int,
    *,
    pos_scale: float = 0.2,
    neg_scale: float = 0.2,
    min_pos_iof: float = 0.01,
    gt_ignore: Tensor = None,
    ignore_gt_scale: float = 0.5,
) -> AssignmentResult:
    """Assign priors to objects with FSAF's CenterRegion rules.

    Args:
        priors: (R, 4) XYXY priors of all levels, concatenated.
        gt_boxes: (N, G, 4) XYXY ground-truth boxes, padded.
        gt_labels: (N, G) int64 class ids in [0, C) (any value in padded slots).
        gt_valid: (N, G) bool, real objects (not padding, not ignore regions).
        prior_valid: (N, R) bool, priors inside each image's own padded extent; the others are
            neither positive nor negative.
        num_classes: C.
        pos_scale / neg_scale: core and shadow region scales (reference 0.2 / 0.2).
        min_pos_iof: a prior overlaps a region if IoF(prior, region) > min_pos_iof.
        gt_ignore: optional (N, G) bool, slots that are ignore regions (crowd boxes): priors whose
            centre lies strictly inside the box shrunk by ``ignore_gt_scale`` are ignored everywhere.

    Rules (in order): a prior is a candidate positive of object g if its centre is strictly inside g
    and it overlaps g's core; the smallest object (of equal areas, the last) wins a prior claimed by
    several; the other claims become (prior, class) ignores, like the shadow-region overlaps; ignore
    regions turn priors into ignored ones; a positive whose own class is also shadowed there becomes a
    (class-ignored) background prior.
    """
    n, g = gt_boxes.shape[:2]
    gt_boxes = gt_boxes.to(priors.dtype)
    real = gt_valid[:, None, :]  # (N, 1, G)

    inside = centers_strictly_inside(priors, gt_boxes)
    in_core = inside & (pairwise_iof(priors, scale_boxes(gt_boxes, pos_scale)) > min_pos_iof) & real
    in_shadow = (pairwise_iof(priors, scale_boxes(gt_boxes, neg_scale)) > min_pos_iof) & real & ~in_core

    # the smallest object claims a prior that lies in several cores; between equal areas the highest slot, as
    # the reference's priorities (area ranks from a stable descending sort) give it
    area = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])  # (N, G)
    claim_area = torch.where(in_core, area[:, None, :], torch.full_like(area[:, None, :], float("inf")))
    gt_index = (g - 1) - claim_area.flip(2).argmin(dim=2)  # (N, R); argmin takes the first of equal minima
    positive = in_core.any(dim=2)
    owner = (gt_index[..., None] == torch.arange(g, device=gt_index.device)) & positive[..., None]
    shadow_pairs = in_shadow | (in_core & ~owner)  # (N, R, G)

    ignored = torch.zeros_like(positive)
    if gt_ignore is not None:
        crowd = gt_ignore[:, None, :] & centers_strictly_inside(priors, scale_boxes(gt_boxes, ignore_gt_scale))
        ignored = crowd.any(dim=2)
        positive = positive & ~ignored

    # (prior, class) ignores: any shadowing object of that class
    classes = torch.arange(num_classes, device=gt_labels.device)
    labels_1hot = ((gt_labels[..., None] == classes) & gt_valid[..., None]).to(priors.dtype)  # (N, G, C)
    shadowed_classes = torch.bmm(shadow_pairs.to(priors.dtype), labels_1hot) > 0  # (N, R, C)

    # same-class override: a positive shadowed on its own class becomes a background prior
    own_label = torch.gather(gt_labels, 1, gt_index)  # (N, R)
    own_shadowed = torch.gather(shadowed_classes, 2, own_label.clamp(0, num_classes - 1)[..., None])[..., 0]
    positive = positive & ~own_shadowed

    positive = positive & prior_valid
    negative = ~positive & ~ignored & prior_valid
    gt_index = torch.where(positive, gt_index, torch.full_like(gt_index, -1))
    return AssignmentResult(
        gt_index=gt_index, positive=positive, negative=negative, shadowed_classes=shadowed_classes
    )
