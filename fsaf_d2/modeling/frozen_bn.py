"""Convolution + FrozenBatchNorm2d as one convolution (``MODEL.FSAF.FOLD_FROZEN_BN``).

A frozen batch norm is the fixed per-channel affine map ``y = x * scale + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``. Following a
convolution, it equals the convolution with weights ``W * scale`` (per output channel) and bias ``shift``.
Detectron2's ``Conv2d`` applies it as two extra passes over every activation (and one more in the
backward pass) from res3 on; the folded form scales the (much smaller) weight tensor instead and lets the
convolution add the bias. Parameters, buffers and checkpoint keys are unchanged (the norm module stays
a child and holds its statistics); gradients reach the convolution weights through the scaling. The
result differs from the unfolded one by float rounding only.
"""
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import Tensor, nn

__all__ = ["FrozenBNFoldedConv2d", "fold_frozen_batchnorm"]


class FrozenBNFoldedConv2d(Conv2d):
    """Detectron2 ``Conv2d`` whose ``norm`` is a ``FrozenBatchNorm2d``, computed as one convolution."""

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        shift = norm.bias - norm.running_mean * scale
        bias = self.bias  # a local, so that TorchScript refines Optional[Tensor]
        if bias is not None:
            shift = shift + bias * scale
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        x = F.conv2d(x, weight, shift, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x


def fold_frozen_batchnorm(module: nn.Module) -> int:
    """Switch every Detectron2 ``Conv2d`` followed by a ``FrozenBatchNorm2d`` inside ``module`` to the
    folded computation (in place: same parameter objects, same state-dict keys). Returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d):
            m.__class__ = FrozenBNFoldedConv2d
            count += 1
    return count
