"""Anchor-based RetinaNet outputs for the combined model (paper Fig. 4: RetinaNet + FSAF on shared towers).

The branch reuses Detectron2's RetinaNet pieces unchanged: its anchors (``MODEL.ANCHOR_GENERATOR``),
``Matcher`` and ``Box2BoxTransform`` (``MODEL.RETINANET.*``), and RetinaNet's own ``label_anchors``,
``losses`` (focal + smooth-L1/GIoU, EMA normaliser) and per-level decoding, bound to this object so the
behaviour is exactly Detectron2's.
"""
from typing import List, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Instances
from torch import Tensor, nn

__all__ = ["AnchorBasedBranch"]


class AnchorBasedBranch(nn.Module):
    """Training targets, losses and candidate decoding of RetinaNet's anchor-based outputs."""

    # Detectron2's implementation, used as-is
    label_anchors = RetinaNet.label_anchors
    losses = RetinaNet.losses
    _ema_update = DenseDetector._ema_update
    _transpose_dense_predictions = DenseDetector._transpose_dense_predictions
    _decode_per_level_predictions = DenseDetector._decode_per_level_predictions
    _decode_multi_level_predictions = DenseDetector._decode_multi_level_predictions

    def __init__(self, cfg, feature_shapes: List[ShapeSpec], num_classes: int):
        super().__init__()
        r = cfg.MODEL.RETINANET
        self.anchor_generator = build_anchor_generator(cfg, feature_shapes)
        self.num_anchors = self.anchor_generator.num_cell_anchors[0]
        self.box2box_transform = Box2BoxTransform(weights=r.BBOX_REG_WEIGHTS)
        self.anchor_matcher = Matcher(r.IOU_THRESHOLDS, r.IOU_LABELS, allow_low_quality_matches=True)
        self.num_classes = num_classes
        self.focal_loss_alpha = r.FOCAL_LOSS_ALPHA
        self.focal_loss_gamma = r.FOCAL_LOSS_GAMMA
        self.smooth_l1_beta = r.SMOOTH_L1_LOSS_BETA
        self.box_reg_loss_type = r.BBOX_REG_LOSS_TYPE
        self.test_score_thresh = r.SCORE_THRESH_TEST
        self.test_topk_candidates = r.TOPK_CANDIDATES_TEST
        self.loss_normalizer = 100.0  # Detectron2's EMA start value
        self.loss_normalizer_momentum = 0.9

    def training_losses(self, features: List[Tensor], logits: List[Tensor], deltas: List[Tensor], gt_instances):
        """Detectron2 RetinaNet's losses ``loss_cls`` / ``loss_box_reg`` for (N, A*C, H, W) / (N, 4A, H, W) outputs."""
        pred_logits, pred_deltas = self._transpose([logits, deltas])
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances)
        return self.losses(anchors, pred_logits, gt_labels, pred_deltas, gt_boxes)

    def _transpose(self, predictions: List[List[Tensor]]) -> List[List[Tensor]]:
        return self._transpose_dense_predictions(predictions, [self.num_classes, 4])

    def candidates(
        self, features: List[Tensor], logits: List[Tensor], deltas: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """Per image, the thresholded top-k candidates of every level (boxes clipped), before NMS."""
        pred_logits, pred_deltas = self._transpose([logits, deltas])
        anchors = self.anchor_generator(features)
        out: List[Instances] = []
        for i, image_size in enumerate(image_sizes):
            pred = self._decode_multi_level_predictions(
                anchors,
                [x[i].sigmoid() for x in pred_logits],
                [x[i] for x in pred_deltas],
                self.test_score_thresh,
                self.test_topk_candidates,
                image_size,
            )
            pred.pred_boxes.clip(image_size)
            out.append(pred)
        return out
