"""Anchor-based RetinaNet outputs for the combined model (paper Fig. 4: RetinaNet + FSAF on shared towers).

:class:`AnchorBasedBranch` is a Detectron2 ``RetinaNet`` without a backbone or a head of its own: the FSAF
model runs those (its head also produces the anchor-based outputs) and hands this branch the anchor-based
logits and deltas. Everything else is RetinaNet's, inherited unchanged: its anchors
(``MODEL.ANCHOR_GENERATOR``), ``Matcher`` and ``Box2BoxTransform`` (``MODEL.RETINANET.*``), and its
training hook ``forward_training`` (anchor labelling, focal + smooth-L1/GIoU losses, EMA normaliser).
Only the candidates before NMS are new, decoded for the whole batch at once: the combined model merges
them with FSAF's before its own NMS.
"""
from typing import List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from torch import Tensor, nn

from .inference import clip_boxes, gather_rows, multi_level_candidates, usable_boxes

__all__ = ["AnchorBasedBranch"]


class AnchorBasedBranch(RetinaNet):
    """RetinaNet's training targets, losses and candidate decoding on outputs computed elsewhere.

    The combined model calls :meth:`forward_training` and :meth:`candidates` with the features and the
    anchor-based head outputs of its own forward pass; this branch has no ``forward`` of its own.

    Built from a config as ``AnchorBasedBranch(cfg, feature_shapes, num_classes)``, or from explicit
    arguments (a LazyConfig): ``anchor_generator``, ``box2box_transform``, ``anchor_matcher``, ``num_classes``
    and the focal / box-loss / test settings, as :class:`~detectron2.modeling.RetinaNet` takes them.
    """

    @configurable
    def __init__(
        self,
        *,
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        anchor_matcher: Matcher,
        num_classes: int,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        smooth_l1_beta: float = 0.1,
        box_reg_loss_type: str = "smooth_l1",
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        pixel_mean: Tuple[float, ...] = (0.0, 0.0, 0.0),
        pixel_std: Tuple[float, ...] = (1.0, 1.0, 1.0),
    ):
        super().__init__(
            backbone=None,
            head=None,
            head_in_features=[],
            anchor_generator=anchor_generator,
            box2box_transform=box2box_transform,
            anchor_matcher=anchor_matcher,
            num_classes=num_classes,
            focal_loss_alpha=focal_loss_alpha,
            focal_loss_gamma=focal_loss_gamma,
            smooth_l1_beta=smooth_l1_beta,
            box_reg_loss_type=box_reg_loss_type,
            test_score_thresh=test_score_thresh,
            test_topk_candidates=test_topk_candidates,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
        )
        self.loss_normalizer = 100.0  # Detectron2's EMA start value (saved by ModelRunningScalars)

    @classmethod
    def from_config(cls, cfg, feature_shapes: List[ShapeSpec], num_classes: int):
        """Args: ``cfg`` (``MODEL.ANCHOR_GENERATOR``, ``MODEL.RETINANET``, ``MODEL.PIXEL_MEAN``/``STD``), the
        shapes of the features the outputs come from (finest first), and the FSAF head's number of classes."""
        r = cfg.MODEL.RETINANET
        return {
            "anchor_generator": build_anchor_generator(cfg, feature_shapes),
            "box2box_transform": Box2BoxTransform(weights=r.BBOX_REG_WEIGHTS),
            "anchor_matcher": Matcher(r.IOU_THRESHOLDS, r.IOU_LABELS, allow_low_quality_matches=True),
            "num_classes": num_classes,
            "focal_loss_alpha": r.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": r.FOCAL_LOSS_GAMMA,
            "smooth_l1_beta": r.SMOOTH_L1_LOSS_BETA,
            "box_reg_loss_type": r.BBOX_REG_LOSS_TYPE,
            "test_score_thresh": r.SCORE_THRESH_TEST,
            "test_topk_candidates": r.TOPK_CANDIDATES_TEST,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @torch.jit.unused
    def forward(self, batched_inputs):
        """Not a detector on its own (no backbone, no head): the combined FSAF model drives this branch."""
        raise NotImplementedError("AnchorBasedBranch runs inside the combined FSAF model only")

    def candidates(
        self,
        features: List[Tensor],
        logits: List[Tensor],
        deltas: List[Tensor],
        image_sizes: Tensor,
        min_box_size: float,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch's candidates before NMS, as :func:`fsaf_d2.modeling.inference.multi_level_candidates`
        gives them: RetinaNet's rule (threshold, then the top-k (anchor, class) pairs of every level),
        decoded by its ``Box2BoxTransform`` and clipped to ``image_sizes`` (N, 2) (height, width).

        Returns:
            boxes (N, K, 4), scores (N, K), classes (N, K), valid (N, K): valid also requires a finite box
            wider and taller than ``min_box_size`` (see :func:`fsaf_d2.modeling.inference.usable_boxes`).
        """
        pred_logits, pred_deltas = self._transpose_dense_predictions([logits, deltas], [self.num_classes, 4])
        anchors = torch.cat([a.tensor for a in self.anchor_generator(features)])
        scores, locations, classes, valid = multi_level_candidates(
            pred_logits, self.test_score_thresh, self.test_topk_candidates, "pairs"
        )
        picked = gather_rows(torch.cat(pred_deltas, dim=1), locations).float()
        boxes = self.box2box_transform.apply_deltas(picked.reshape(-1, 4), anchors[locations].reshape(-1, 4))
        boxes = clip_boxes(boxes.reshape(picked.shape), image_sizes)
        return boxes, scores, classes, valid & usable_boxes(boxes, min_box_size)
