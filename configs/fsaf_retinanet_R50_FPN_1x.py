# LazyConfig of configs/fsaf_retinanet_R50_FPN_1x.yaml: the paper's combined model (Fig. 4): RetinaNet's
# anchor-based outputs and FSAF's anchor-free outputs on the same towers; loss = RetinaNet loss
# + 0.5 * (FSAF cls + FSAF box); inference merges both branches' candidates before one NMS.
from detectron2.config import LazyCall as L
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher

from fsaf_d2.modeling import AnchorBasedBranch

from .fsaf_R50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.head.num_anchors_extra = 9  # 3 scales x 3 aspect ratios per location
model.anchor_based = L(AnchorBasedBranch)(
    anchor_generator=L(DefaultAnchorGenerator)(
        # x, x * 2^(1/3), x * 2^(2/3) for x = 32 .. 512, to the 4 decimals of the YAML config
        sizes=[
            [32, 40.3175, 50.7968],
            [64, 80.6349, 101.5937],
            [128, 161.2699, 203.1873],
            [256, 322.5398, 406.3747],
            [512, 645.0796, 812.7493],
        ],
        aspect_ratios=[0.5, 1.0, 2.0],
        strides=[8, 16, 32, 64, 128],
        offset=0.0,
    ),
    box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
    anchor_matcher=L(Matcher)(thresholds=[0.4, 0.5], labels=[0, -1, 1], allow_low_quality_matches=True),
    num_classes="${..num_classes}",
    focal_loss_alpha=0.25,
    focal_loss_gamma=2.0,
    smooth_l1_beta=0.1,
    box_reg_loss_type="smooth_l1",
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    pixel_mean="${..pixel_mean}",
    pixel_std="${..pixel_std}",
)
model.af_loss_weight = 0.5
train.output_dir = "./output/fsaf_retinanet_R50_FPN_1x_lazy"
