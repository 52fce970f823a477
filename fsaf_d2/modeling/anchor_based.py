"""Anchor-based RetinaNet outputs for the combined model (paper Fig. 4: RetinaNet + FSAF on shared towers).

:class:`AnchorBasedBranch` is a Detectron2 ``RetinaNet`` without a backbone or a head of its own: the FSAF
model runs those (its head also produces the anchor-based outputs) and hands this branch the anchor-based
logits and deltas. Everything else is RetinaNet's, inherited unchanged: its anchors
(``MODEL.ANCHOR_GENERATOR``), ``Matcher`` and ``Box2BoxTransform`` (``MODEL.RETINANET.*``), and its
training hook ``forward_training`` (anchor labelling, focal + smooth-L1/GIoU losses, EMA normaliser).
Only the candidates before NMS are new: the combined model merges them with FSAF's before its own NMS.
"""
from typing import List, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Instances
from torch import Tensor

__all__ = ["AnchorBasedBranch"]


class AnchorBasedBranch(RetinaNet):
    """RetinaNet's training targets, losses and candidate decoding on outputs computed elsewhere.

    The combined model calls :meth:`forward_training` and :meth:`candidates` with the features and the
    anchor-based head outputs of its own forward pass; this branch has no ``forward`` of its own.

    Args:
        cfg: the config (``MODEL.ANCHOR_GENERATOR``, ``MODEL.RETINANET``, ``MODEL.PIXEL_MEAN``/``STD``).
        feature_shapes: shapes of the features the outputs come from, finest first.
        num_classes: foreground classes (the FSAF head's, ``MODEL.FSAF.NUM_CLASSES``).
    """

    def __init__(self, cfg, feature_shapes: List[ShapeSpec], num_classes: int):
        r = cfg.MODEL.RETINANET
        super().__init__(
            backbone=None,
            head=None,
            head_in_features=[],
            anchor_generator=build_anchor_generator(cfg, feature_shapes),
            box2box_transform=Box2BoxTransform(weights=r.BBOX_REG_WEIGHTS),
            anchor_matcher=Matcher(r.IOU_THRESHOLDS, r.IOU_LABELS, allow_low_quality_matches=True),
            num_classes=num_classes,
            focal_loss_alpha=r.FOCAL_LOSS_ALPHA,
            focal_loss_gamma=r.FOCAL_LOSS_GAMMA,
            smooth_l1_beta=r.SMOOTH_L1_LOSS_BETA,
            box_reg_loss_type=r.BBOX_REG_LOSS_TYPE,
            test_score_thresh=r.SCORE_THRESH_TEST,
            test_topk_candidates=r.TOPK_CANDIDATES_TEST,
            pixel_mean=cfg.MODEL.PIXEL_MEAN,
            pixel_std=cfg.MODEL.PIXEL_STD,
        )
        self.loss_normalizer = 100.0  # Detectron2's EMA start value (saved by ModelRunningScalars)

    @torch.jit.unused
    def forward(self, batched_inputs):
        """Not a detector on its own (no backbone, no head): the combined FSAF model drives this branch."""
        raise NotImplementedError("AnchorBasedBranch runs inside the combined FSAF model only")

    def candidates(
        self, features: List[Tensor], logits: List[Tensor], deltas: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """Per image, the thresholded top-k candidates of every level (boxes clipped), before NMS."""
        pred_logits, pred_deltas = self._transpose_dense_predictions([logits, deltas], [self.num_classes, 4])
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
