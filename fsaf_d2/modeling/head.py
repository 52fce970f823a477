"""FSAF head: two conv towers shared across levels, one prior per location."""
import math
from typing import List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from torch import Tensor, nn

__all__ = ["FSAFHead"]


class FSAFHead(nn.Module):
    """Classification and TBLR regression outputs for every location of every level.

    Module names follow Detectron2's ``RetinaNetHead`` (``cls_subnet``, ``bbox_subnet``, ``cls_score``,
    ``bbox_pred``) so that checkpoints convert by renaming. Outputs per level: class logits
    (N, C, H, W) and non-negative (ReLU) distances (N, 4, H, W) in (t, b, l, r) order.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_convs: int = 4,
        norm: str = "",
        prior_prob: float = 0.01,
        reg_bias_init: float = 0.25,
        num_anchors_extra: int = 0,
    ):
        """
        Args:
            in_channels: channels of every input feature (FPN: 256).
            num_classes: C.
            num_convs: 3x3 convs per tower.
            norm: normalisation after each tower conv ("" = none, as the reference).
            prior_prob: classification bias init -log((1 - p) / p).
            reg_bias_init: regression bias init (reference 0.25).
            num_anchors_extra: when > 0, also build RetinaNet's anchor-based outputs
                (``ab_cls_score`` with A*C channels and ``ab_bbox_pred`` with 4A) on the same towers.
        """
        super().__init__()
        self.num_classes = num_classes

        def tower():
            layers: List[nn.Module] = []
            for _ in range(num_convs):
                layers.append(nn.Conv2d(in_channels, in_channels, 3, stride=1, padding=1))
                if norm:
                    layers.append(get_norm(norm, in_channels))
                layers.append(nn.ReLU())
            return nn.Sequential(*layers)

        self.cls_subnet = tower()
        self.bbox_subnet = tower()
        self.cls_score = nn.Conv2d(in_channels, num_classes, 3, stride=1, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, stride=1, padding=1)
        self.num_anchors_extra = num_anchors_extra
        if num_anchors_extra > 0:
            self.ab_cls_score = nn.Conv2d(in_channels, num_anchors_extra * num_classes, 3, padding=1)
            self.ab_bbox_pred = nn.Conv2d(in_channels, num_anchors_extra * 4, 3, padding=1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.constant_(m.bias, 0.0)
        cls_bias = -math.log((1 - prior_prob) / prior_prob)
        nn.init.constant_(self.cls_score.bias, cls_bias)
        nn.init.constant_(self.bbox_pred.bias, reg_bias_init)
        if num_anchors_extra > 0:
            nn.init.constant_(self.ab_cls_score.bias, cls_bias)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"FSAFHead needs the same number of channels on every level, got {sorted(channels)}")
        f = cfg.MODEL.FSAF
        num_anchors_extra = 0
        if f.ANCHOR_BASED:
            sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES
            ratios = cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS
            num_anchors_extra = len(sizes[0]) * len(ratios[0])
        return {
            "in_channels": channels.pop(),
            "num_classes": f.NUM_CLASSES,
            "num_convs": f.NUM_CONVS,
            "norm": f.HEAD_NORM,
            "prior_prob": f.PRIOR_PROB,
            "reg_bias_init": f.REG_BIAS_INIT,
            "num_anchors_extra": num_anchors_extra,
        }

    def forward(self, features: List[Tensor]) -> List[List[Tensor]]:
        """features: L tensors (N, in_channels, H_l, W_l) -> per-level outputs
        ``[cls logits (N, C, H, W), TBLR distances (N, 4, H, W)]``, followed, in the combined model, by
        RetinaNet's ``[logits (N, A*C, H, W), deltas (N, 4A, H, W)]`` computed on the same towers."""
        logits: List[Tensor] = []
        deltas: List[Tensor] = []
        ab_logits: List[Tensor] = []
        ab_deltas: List[Tensor] = []
        for feature in features:
            cls_feat = self.cls_subnet(feature)
            reg_feat = self.bbox_subnet(feature)
            logits.append(self.cls_score(cls_feat))
            deltas.append(torch.relu(self.bbox_pred(reg_feat)))
            if hasattr(self, "ab_cls_score"):  # num_anchors_extra > 0; hasattr is resolved when scripting
                ab_logits.append(self.ab_cls_score(cls_feat))
                ab_deltas.append(self.ab_bbox_pred(reg_feat))
        if self.num_anchors_extra > 0:
            return [logits, deltas, ab_logits, ab_deltas]
        return [logits, deltas]
