"""TBLR box coding of FSAF (normaliser S, channel order top, bottom, left, right).

A prediction (t, b, l, r) at a prior of centre (cx, cy) and size (w, h) means the box
``(cx - l*S*w, cy - t*S*h, cx + r*S*w, cy + b*S*h)``. With priors of side s (the level stride) the
distances are in units of S*s pixels, the paper's d / S in level pixels.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["TBLRBoxCoder", "prior_centers_and_sizes", "tblr_decode"]


def prior_centers_and_sizes(priors: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """priors (..., 4) XYXY -> (cx, cy, w, h), each (...)."""
    cx = (priors[..., 0] + priors[..., 2]) * 0.5
    cy = (priors[..., 1] + priors[..., 3]) * 0.5
    w = priors[..., 2] - priors[..., 0]
    h = priors[..., 3] - priors[..., 1]
    return cx, cy, w, h


def tblr_decode(
    deltas: Tensor, priors: Tensor, normalizer: float, max_shape: Optional[Tuple[int, int]] = None
) -> Tensor:
    """deltas (..., 4) (t, b, l, r), priors (..., 4) XYXY -> boxes (..., 4) XYXY pixels.

    ``max_shape`` = (height, width) clips the boxes to [0, W] x [0, H] (inference only; the loss decodes
    without clipping, as the reference does). A plain function so that TorchScript can compile it.
    """
    cx, cy, w, h = prior_centers_and_sizes(priors)
    x1 = cx - deltas[..., 2] * (normalizer * w)
    y1 = cy - deltas[..., 0] * (normalizer * h)
    x2 = cx + deltas[..., 3] * (normalizer * w)
    y2 = cy + deltas[..., 1] * (normalizer * h)
    if max_shape is not None:
        x1 = x1.clamp(min=0.0, max=float(max_shape[1]))
        x2 = x2.clamp(min=0.0, max=float(max_shape[1]))
        y1 = y1.clamp(min=0.0, max=float(max_shape[0]))
        y2 = y2.clamp(min=0.0, max=float(max_shape[0]))
    return torch.stack([x1, y1, x2, y2], dim=-1)


class TBLRBoxCoder:
    """Encode XYXY boxes as normalised (t, b, l, r) distances from prior centres, and decode back.

    The interface mirrors Detectron2's ``Box2BoxTransform`` (``get_deltas`` / ``apply_deltas``) so the
    coder can be used wherever Detectron2 expects one.
    """

    def __init__(self, normalizer: float = 4.0):
        self.normalizer = float(normalizer)

    def get_deltas(self, priors: Tensor, boxes: Tensor) -> Tensor:
        """priors, boxes (..., 4) XYXY pixels -> deltas (..., 4) in (t, b, l, r) order."""
        cx, cy, w, h = prior_centers_and_sizes(priors)
        s = self.normalizer
        top = (cy - boxes[..., 1]) / h / s
        bottom = (boxes[..., 3] - cy) / h / s
        left = (cx - boxes[..., 0]) / w / s
        right = (boxes[..., 2] - cx) / w / s
        return torch.stack([top, bottom, left, right], dim=-1)

    def apply_deltas(
        self, deltas: Tensor, priors: Tensor, max_shape: Optional[Tuple[int, int]] = None
    ) -> Tensor:
        """deltas (..., 4) (t, b, l, r), priors (..., 4) XYXY -> boxes (..., 4) XYXY pixels.

        ``max_shape`` = (height, width) clips the boxes to [0, W] x [0, H] (inference only; the loss
        decodes without clipping, as the reference does).
        """
        return tblr_decode(deltas, priors, self.normalizer, max_shape)
