"""ResNet + FPN backbone of FSAF: P3-P5 from C3-C5, P6 from C5, P7 from P6 (no ReLU by default).

Only the levels the head uses (``MODEL.FSAF.IN_FEATURES``) are built: a level without a consumer would
hold parameters that never receive a gradient, which DistributedDataParallel refuses at the second
iteration.
"""
import re
from typing import List, Optional

import torch.nn.functional as F
from torch import nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet, build_resnet_backbone

__all__ = [
    "P6P7TopBlock",
    "pyramid_levels",
    "build_fsaf_resnet_fpn_backbone",
    "resnet_stages",
    "build_narrow_resnet",
    "build_fsaf_narrow_resnet_fpn_backbone",
]


#: residual blocks in res2-res5 per ResNet depth
_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class P6P7TopBlock(LastLevelP6P7):
    """Detectron2's P6/P7 block with the ReLU between P6 and P7 made optional, and P7 optional.

    The reference (mmdetection, ``relu_before_extra_convs=False``) computes P7 = conv(P6); Detectron2's
    RetinaNet computes P7 = conv(ReLU(P6)). ``num_levels`` 1 builds P6 alone. Parameter names (``p6``,
    ``p7``) are Detectron2's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_feature: str = "res5",
        relu_before_p7: bool = False,
        num_levels: int = 2,
    ):
        if num_levels not in (1, 2):
            raise ValueError(f"P6P7TopBlock builds 1 (P6) or 2 (P6, P7) levels, got {num_levels}")
        super().__init__(in_channels, out_channels, in_feature)
        self.relu_before_p7 = relu_before_p7
        self.num_levels = num_levels
        if num_levels == 1:
            del self.p7

    def forward(self, x):
        p6 = self.p6(x)
        if self.num_levels == 1:
            return [p6]
        return [p6, self.p7(F.relu(p6) if self.relu_before_p7 else p6)]


def resnet_stages(
    depth: int,
    *,
    norm: str = "BN",
    stem_out_channels: int = 64,
    res2_out_channels: Optional[int] = None,
    num_groups: int = 1,
    width_per_group: int = 64,
    stride_in_1x1: bool = True,
) -> List[List[nn.Module]]:
    """The res2-res5 stages of a ResNet / ResNeXt of any width, for ``ResNet(stem, stages, ...)``.

    Unlike Detectron2's ``ResNet.make_default_stages``, the widths are free: res2 outputs
    ``res2_out_channels`` (default 64 for ResNet-18/34, 256 from ResNet-50 on), doubling per stage; bottleneck
    blocks have ``num_groups * width_per_group`` channels in res2 (ResNeXt-101 64x4d: 64 x 4), doubling too.
    Stride 2 in the first block of res3-res5. LazyConfigs call it for the quickstart's half-width ResNet-18
    and for ResNeXt; :func:`build_narrow_resnet` for the YAML configs.
    """
    blocks = _STAGE_BLOCKS.get(depth)
    if blocks is None:
        raise ValueError(f"ResNet depth must be one of {sorted(_STAGE_BLOCKS)}, got {depth}")
    basic = depth < 50
    out_channels = res2_out_channels or (64 if basic else 256)
    bottleneck_channels = num_groups * width_per_group
    stages, in_channels = [], stem_out_channels
    for i, n in enumerate(blocks):
        kwargs = {"norm": norm}
        if not basic:
            kwargs.update(
                bottleneck_channels=bottleneck_channels, num_groups=num_groups, stride_in_1x1=stride_in_1x1
            )
        stages.append(
            ResNet.make_stage(
                BasicBlock if basic else BottleneckBlock,
                n,
                stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                **kwargs,
            )
        )
        in_channels, out_channels, bottleneck_channels = out_channels, out_channels * 2, bottleneck_channels * 2
    return stages


def build_narrow_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """A ResNet-18/34 of any width, from Detectron2's own blocks (Detectron2's builder fixes res2 at 64).

    Widths: stem ``MODEL.RESNETS.STEM_OUT_CHANNELS``, res2 ``MODEL.RESNETS.RES2_OUT_CHANNELS``, doubling per
    stage (:func:`resnet_stages`); ``MODEL.RESNETS.NORM``, ``MODEL.BACKBONE.FREEZE_AT`` and ``OUT_FEATURES`` as
    usual. Used by the CPU quickstart, where a 32-wide ResNet-18 trains four times faster than the standard one.
    """
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in (18, 34):
        raise ValueError(f"build_fsaf_narrow_resnet_fpn_backbone supports MODEL.RESNETS.DEPTH 18 or 34, got {r.DEPTH}")
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages = resnet_stages(
        r.DEPTH, norm=r.NORM, stem_out_channels=r.STEM_OUT_CHANNELS, res2_out_channels=r.RES2_OUT_CHANNELS
    )
    return ResNet(stem, stages, out_features=r.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


def _level(name: str, key: str) -> int:
    m = re.fullmatch(r"(?:p|res)([2-7])", name)
    if m is None:
        raise ValueError(f"{key}: cannot read a pyramid level from {name!r} (expected p2-p7 / res2-res5)")
    return int(m.group(1))


def pyramid_levels(cfg):
    """(FPN inputs, number of top-block levels) that produce exactly ``MODEL.FSAF.IN_FEATURES``.

    The head's levels must be consecutive. FPN inputs finer than the head's finest level are dropped
    (the coarser outputs do not depend on them); levels above the last FPN input come from the P6/P7
    top block (0, 1 or 2 of them). Raises ValueError, naming the keys, for levels it cannot build.
    """
    head = sorted(_level(f, "MODEL.FSAF.IN_FEATURES") for f in cfg.MODEL.FSAF.IN_FEATURES)
    if head != list(range(head[0], head[-1] + 1)):
        raise ValueError(
            f"MODEL.FSAF.IN_FEATURES={list(cfg.MODEL.FSAF.IN_FEATURES)} must be consecutive pyramid levels "
            "(an FPN level between two used ones would be built and never trained)"
        )
    fpn_in = [f for f in cfg.MODEL.FPN.IN_FEATURES if _level(f, "MODEL.FPN.IN_FEATURES") >= head[0]]
    top = max(_level(f, "MODEL.FPN.IN_FEATURES") for f in cfg.MODEL.FPN.IN_FEATURES)
    if not fpn_in or head[-1] < top or head[-1] > 7:
        raise ValueError(
            f"MODEL.FSAF.IN_FEATURES={list(cfg.MODEL.FSAF.IN_FEATURES)} cannot be built from "
            f"MODEL.FPN.IN_FEATURES={list(cfg.MODEL.FPN.IN_FEATURES)}: the head must use p{top} (the FPN's "
            f"coarsest input level) and may add p{top + 1}-p7 from the top block. Drop the coarser FPN "
            "inputs, or add the levels to the head."
        )
    return fpn_in, head[-1] - top


def _fsaf_fpn(cfg, bottom_up) -> FPN:
    in_features, top_levels = pyramid_levels(cfg)
    in_feature = cfg.MODEL.FSAF.TOP_BLOCK_IN_FEATURE
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block = None
    if top_levels:
        if in_feature == "p5":
            in_channels = out_channels
        else:
            in_channels = bottom_up.output_shape()[in_feature].channels
        top_block = P6P7TopBlock(
            in_channels, out_channels, in_feature, cfg.MODEL.FSAF.TOP_BLOCK_P7_RELU, num_levels=top_levels
        )
    return FPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_fsaf_narrow_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """:func:`build_narrow_resnet` + the FSAF FPN (the levels of ``MODEL.FSAF.IN_FEATURES``)."""
    return _fsaf_fpn(cfg, build_narrow_resnet(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_fsaf_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ResNet (MODEL.RESNETS.*) + FPN (MODEL.FPN.*) with FSAF's P6/P7 top block, building the
    levels of ``MODEL.FSAF.IN_FEATURES`` (:func:`pyramid_levels`).

    ``MODEL.FSAF.TOP_BLOCK_IN_FEATURE`` selects the input of P6 ("res5" as the reference, or "p5");
    ``MODEL.FSAF.TOP_BLOCK_P7_RELU`` restores Detectron2's ReLU before P7.
    """
    return _fsaf_fpn(cfg, build_resnet_backbone(cfg, input_shape))
