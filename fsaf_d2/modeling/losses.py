"""FSAF losses: focal + IoU loss, online feature selection, re-weighting and normalisation.

Pure tensor functions, vectorised over images, levels, priors and objects, without host
synchronisation (no ``.item()``, ``nonzero`` or boolean indexing). docs/algorithm.md#training-loss gives the
reference behaviour they reproduce (mmdetection v2.28.2 ``FSAFHead.loss``).

Shapes: N images, R priors (levels concatenated; level l owns a contiguous range of
``level_sizes[l]`` priors), L levels, G ground-truth slots per image, C classes.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from fvcore.nn import sigmoid_focal_loss
from torch import Tensor
from torch.autograd.profiler import record_function

from .assignment import AssignmentResult, assign_center_region
from .box_coder import TBLRBoxCoder

__all__ = [
    "FSAFLossSettings",
    "iou_loss",
    "aligned_iou",
    "select_levels",
    "FSAFLossDetails",
    "fsaf_losses",
    "NO_CANDIDATE_COST",
]

# cost of an (object, level) pair without any candidate positive: such a level is never selected
NO_CANDIDATE_COST = 1e6


@dataclass(frozen=True)
class FSAFLossSettings:
    """The CenterRegion assignment and loss settings of FSAF, one small object like Detectron2's
    ``Matcher`` / ``Box2BoxTransform``: built from ``MODEL.FSAF`` by :meth:`from_config`, held by the model
    and handed to :func:`fsaf_losses`. The defaults are the reference's (and the config's).

    Attributes:
        pos_scale / neg_scale: core and shadow region scales (``POS_SCALE`` / ``NEG_SCALE``).
        min_pos_iof: a prior overlaps a region if IoF(prior, region) > this (``MIN_POS_IOF``).
        crowd_as_ignore: crowd boxes are ignore regions, not dropped (``CROWD_AS_IGNORE``).
        ignore_gt_scale: ignore regions are crowd boxes shrunk by this scale (``IGNORE_GT_SCALE``).
        focal_alpha / focal_gamma: sigmoid focal loss (``FOCAL_LOSS_ALPHA`` / ``FOCAL_LOSS_GAMMA``).
        iou_eps: IoU clamp of the -log(IoU) loss (``IOU_LOSS_EPS``).
        reg_clamp_min: regression outputs clamped to at least this inside the loss (``REG_CLAMP_MIN``).
    """

    pos_scale: float = 0.2
    neg_scale: float = 0.2
    min_pos_iof: float = 0.01
    crowd_as_ignore: bool = False
    ignore_gt_scale: float = 0.5
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    iou_eps: float = 1e-6
    reg_clamp_min: float = 1e-4

    @classmethod
    def from_config(cls, cfg) -> "FSAFLossSettings":
        f = cfg.MODEL.FSAF
        return cls(
            pos_scale=f.POS_SCALE,
            neg_scale=f.NEG_SCALE,
            min_pos_iof=f.MIN_POS_IOF,
            crowd_as_ignore=f.CROWD_AS_IGNORE,
            ignore_gt_scale=f.IGNORE_GT_SCALE,
            focal_alpha=f.FOCAL_LOSS_ALPHA,
            focal_gamma=f.FOCAL_LOSS_GAMMA,
            iou_eps=f.IOU_LOSS_EPS,
            reg_clamp_min=f.REG_CLAMP_MIN,
        )


def aligned_iou(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of aligned XYXY boxes (..., 4) -> (...), no +1 convention, union clamped at ``eps``."""
    iw = (torch.minimum(pred[..., 2], target[..., 2]) - torch.maximum(pred[..., 0], target[..., 0])).clamp(min=0)
    ih = (torch.minimum(pred[..., 3], target[..., 3]) - torch.maximum(pred[..., 1], target[..., 1])).clamp(min=0)
    inter = iw * ih
    area_p = (pred[..., 2] - pred[..., 0]) * (pred[..., 3] - pred[..., 1])
    area_t = (target[..., 2] - target[..., 0]) * (target[..., 3] - target[..., 1])
    union = (area_p + area_t - inter).clamp(min=eps)
    return inter / union


def iou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """UnitBox loss -log(max(IoU, eps)) of aligned boxes (..., 4) -> (...), unreduced."""
    return -aligned_iou(pred, target, eps).clamp(min=eps).log()


def select_levels(
    prior_cost: Tensor, gt_index: Tensor, prior_level: Tensor, num_levels: int, num_gt: int
):
    """Online feature selection: the level with the lowest mean cost for each object.

    Args:
        prior_cost: (N, R) detached per-prior cost (classification loss summed over classes + IoU loss).
        gt_index: (N, R) object slot of each candidate positive, -1 elsewhere.
        prior_level: (R,) level of each prior.
    Returns:
        cost: (N, L, G) mean cost over each object's candidate positives at each level,
            ``NO_CANDIDATE_COST`` where the object has none there.
        selected: (N, G) int64, argmin of ``cost`` over levels.
    """
    n = prior_cost.shape[0]
    is_pos = gt_index >= 0
    slot = prior_level[None, :] * num_gt + gt_index.clamp(min=0)  # (N, R) in [0, L*G)
    cost_sum = prior_cost.new_zeros(n, num_levels * num_gt)
    count = prior_cost.new_zeros(n, num_levels * num_gt)
    cost_sum.scatter_add_(1, slot, prior_cost * is_pos)
    count.scatter_add_(1, slot, is_pos.to(prior_cost.dtype))
    mean = cost_sum / count.clamp(min=1)
    cost = torch.where(count > 0, mean, torch.full_like(mean, NO_CANDIDATE_COST)).view(n, num_levels, num_gt)
    selected = cost.argmin(dim=1)
    return cost, selected


def _dense_losses(
    cls_logits, reg_deltas, priors, label_targets, label_weights, box_targets, positive, box_coder,
    settings: FSAFLossSettings,
):
    """Weighted focal loss (N, R, C) and IoU loss of the candidate positives (N, R), unreduced."""
    n, r = positive.shape
    focal = sigmoid_focal_loss(
        cls_logits, label_targets, alpha=settings.focal_alpha, gamma=settings.focal_gamma, reduction="none"
    )
    focal = focal * label_weights
    # only the candidate positives are decoded, as in the reference: elsewhere a constant stands in, so that a
    # non-finite distance there (a diverged fp16 head) cannot turn the gradient into 0 * inf = NaN
    deltas = torch.where(positive[..., None], reg_deltas, 1.0)
    pred_boxes = box_coder.apply_deltas(deltas.clamp(min=settings.reg_clamp_min), priors[None].expand(n, r, 4))
    reg = iou_loss(pred_boxes, box_targets, settings.iou_eps) * positive
    return focal, reg


@dataclass
class FSAFLossDetails:
    """Everything the FSAF loss computes, for tests and parity checks.

    Attributes:
        loss_cls_per_level / loss_reg_per_level: (L,) summed losses of each level, before normalisation.
        normalizer: () the divisor (number of final positives, or of negatives if there are none).
        num_pos: () final positives after level selection.
        assignment: the :class:`AssignmentResult`.
        label_weights: (N, R, C) classification weights before level selection.
        cost: (N, L, G) selection cost; selected_level: (N, G).
        final_positive: (N, R) bool, positives after level selection.
        cls_weights: (N, R, C) classification weights after level selection.
    """

    loss_cls_per_level: Tensor
    loss_reg_per_level: Tensor
    normalizer: Tensor
    num_pos: Tensor
    assignment: AssignmentResult
    label_weights: Tensor
    cost: Tensor
    selected_level: Tensor
    final_positive: Tensor
    cls_weights: Tensor


def fsaf_losses(
    cls_logits: Tensor,
    reg_deltas: Tensor,
    priors: Tensor,
    level_sizes: List[int],
    prior_level: Tensor,
    prior_valid: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_valid: Tensor,
    *,
    gt_ignore: Optional[Tensor] = None,
    box_coder: TBLRBoxCoder,
    settings: FSAFLossSettings = FSAFLossSettings(),
    normalizer_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    return_details: bool = False,
):
    """FSAF training loss of a batch.

    Args:
        cls_logits: (N, R, C) classification logits.
        reg_deltas: (N, R, 4) TBLR regression outputs (after the head's ReLU).
        priors: (R, 4) XYXY priors, levels concatenated in ``level_sizes`` order.
        level_sizes: number of priors of each level (Python ints).
        prior_level: (R,) int64 level of each prior (callers cache it per input size).
        prior_valid: (N, R) bool, priors inside each image's own padded extent.
        gt_boxes, gt_labels, gt_valid, gt_ignore: padded ground truth, see
            :func:`assign_center_region`.
        box_coder: decodes ``reg_deltas`` at the priors.
        settings: assignment and loss settings (default: the reference's).
    Returns:
        dict with ``loss_fsaf_cls`` and ``loss_fsaf_reg`` (scalars, normalised, summed over levels),
        plus the :class:`FSAFLossDetails` when ``return_details``. Everything runs in fp32.
        ``normalizer_fn(num_pos, num_neg)`` replaces the reference normaliser (number of final
        positives, or of negatives when there are none), e.g. by an EMA.
    """
    cls_logits = cls_logits.float()
    reg_deltas = reg_deltas.float()
    priors = priors.float()
    gt_boxes = gt_boxes.float()
    n, r, c = cls_logits.shape
    num_levels = len(level_sizes)
    num_gt = gt_boxes.shape[1]

    with torch.no_grad(), record_function("fsaf.assignment"):
        assignment = assign_center_region(
            priors,
            gt_boxes,
            gt_labels,
            gt_valid,
            prior_valid,
            c,
            pos_scale=settings.pos_scale,
            neg_scale=settings.neg_scale,
            min_pos_iof=settings.min_pos_iof,
            gt_ignore=gt_ignore,
            ignore_gt_scale=settings.ignore_gt_scale,
        )
        positive = assignment.positive
        gt_index = assignment.gt_index
        safe_index = gt_index.clamp(min=0)
        labels = torch.gather(gt_labels, 1, safe_index)  # (N, R), meaningful at positives
        classes = torch.arange(c, device=labels.device)
        label_targets = ((labels[..., None] == classes) & positive[..., None]).float()  # (N, R, C)
        label_weights = ((positive | assignment.negative)[..., None] & ~assignment.shadowed_classes).float()
        box_targets = torch.gather(gt_boxes, 1, safe_index[..., None].expand(n, r, 4))  # (N, R, 4)

    # dense per-element losses, computed once
    with record_function("fsaf.dense_losses"):
        focal, reg = _dense_losses(
            cls_logits, reg_deltas, priors, label_targets, label_weights, box_targets, positive, box_coder, settings
        )

    # online feature selection on the detached cost
    with torch.no_grad(), record_function("fsaf.selection"):
        prior_cost = focal.detach().sum(dim=2) + reg.detach()
        cost, selected = select_levels(prior_cost, gt_index, prior_level, num_levels, num_gt)
        selected_for_prior = torch.gather(selected, 1, safe_index)  # (N, R)
        keep = positive & (selected_for_prior == prior_level[None, :])
        dropped = positive & ~keep
        # a dropped candidate is ignored for its own class only, and gets no box loss
        cls_weights = 1.0 - label_targets * dropped[..., None]
        num_pos = keep.sum().float()
        num_neg = (assignment.negative.sum(dim=1).clamp(min=1)).sum().float()
        if normalizer_fn is None:
            normalizer = torch.where(num_pos > 0, num_pos, num_neg)
        else:
            normalizer = normalizer_fn(num_pos, num_neg)

    with record_function("fsaf.reduce"):
        cls_per_prior = (focal * cls_weights).sum(dim=2)  # (N, R)
        reg_per_prior = reg * keep
        cls_per_level = torch.stack([x.sum() for x in cls_per_prior.split(level_sizes, dim=1)])
        reg_per_level = torch.stack([x.sum() for x in reg_per_prior.split(level_sizes, dim=1)])
    losses: Dict[str, Tensor] = {
        "loss_fsaf_cls": cls_per_level.sum() / normalizer,
        "loss_fsaf_reg": reg_per_level.sum() / normalizer,
    }
    if not return_details:
        return losses
    details = FSAFLossDetails(
        loss_cls_per_level=cls_per_level.detach(),
        loss_reg_per_level=reg_per_level.detach(),
        normalizer=normalizer,
        num_pos=num_pos,
        assignment=assignment,
        label_weights=label_weights,
        cost=cost,
        selected_level=selected,
        final_positive=keep,
        cls_weights=label_weights * cls_weights,
    )
    return losses, details
