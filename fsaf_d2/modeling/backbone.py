"""ResNet + FPN backbone of FSAF: P3-P5 from C3-C5, P6 from C5, P7 from P6 (no ReLU by default)."""
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet, build_resnet_backbone

__all__ = ["P6P7TopBlock", "build_fsaf_resnet_fpn_backbone", "build_narrow_resnet", "build_fsaf_narrow_resnet_fpn_backbone"]


class P6P7TopBlock(LastLevelP6P7):
    """Detectron2's P6/P7 block with the ReLU between P6 and P7 made optional.

    The reference (mmdetection, ``relu_before_extra_convs=False``) computes P7 = conv(P6); Detectron2's
    RetinaNet computes P7 = conv(ReLU(P6)). Parameter names (``p6``, ``p7``) are Detectron2's.
    """

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "res5", relu_before_p7: bool = False):
        super().__init__(in_channels, out_channels, in_feature)
        self.relu_before_p7 = relu_before_p7

    def forward(self, x):
        p6 = self.p6(x)
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return [p6, p7]


def build_narrow_resnet(cfg, input_shape: ShapeSpec) -> ResNet:
    """A ResNet-18/34 of any width, from Detectron2's own blocks (Detectron2's builder fixes res2 at 64).

    Widths: stem ``MODEL.RESNETS.STEM_OUT_CHANNELS``, res2 ``MODEL.RESNETS.RES2_OUT_CHANNELS``, doubling per
    stage; ``MODEL.RESNETS.NORM``, ``MODEL.BACKBONE.FREEZE_AT`` and ``OUT_FEATURES`` as usual. Used by the
    CPU quickstart, where a 32-wide ResNet-18 trains four times faster than the standard one.
    """
    r = cfg.MODEL.RESNETS
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}.get(r.DEPTH)
    if blocks is None:
        raise ValueError(f"build_fsaf_narrow_resnet_fpn_backbone supports MODEL.RESNETS.DEPTH 18 or 34, got {r.DEPTH}")
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages, in_channels, out_channels = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for i, n in enumerate(blocks):
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                n,
                stride_per_block=[1 if i == 0 else 2] + [1] * (n - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


def _fsaf_fpn(cfg, bottom_up) -> FPN:
    in_feature = cfg.MODEL.FSAF.TOP_BLOCK_IN_FEATURE
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    if in_feature == "p5":
        in_channels = out_channels
    else:
        in_channels = bottom_up.output_shape()[in_feature].channels
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=P6P7TopBlock(in_channels, out_channels, in_feature, cfg.MODEL.FSAF.TOP_BLOCK_P7_RELU),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_fsaf_narrow_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """:func:`build_narrow_resnet` + the FSAF FPN (P3-P7)."""
    return _fsaf_fpn(cfg, build_narrow_resnet(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_fsaf_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ResNet (MODEL.RESNETS.*) + FPN (MODEL.FPN.*) with FSAF's P6/P7 top block.

    ``MODEL.FSAF.TOP_BLOCK_IN_FEATURE`` selects the input of P6 ("res5" as the reference, or "p5");
    ``MODEL.FSAF.TOP_BLOCK_P7_RELU`` restores Detectron2's ReLU before P7.
    """
    return _fsaf_fpn(cfg, build_resnet_backbone(cfg, input_shape))
