# LazyConfig of configs/fsaf_X101_64x4d_FPN_1x.yaml: FSAF ResNeXt-101 64x4d-FPN 1x on COCO (reference: 42.4 box AP).
from detectron2.config import LazyCall as L

from fsaf_d2.modeling import resnet_stages

from .common.fsaf import dataloader, lr_multiplier, model, optimizer, train

# Detectron2's make_default_stages has no grouped convolutions: fsaf_d2's stage builder, 64 groups x 4 channels
model.backbone.bottom_up.stages = L(resnet_stages)(
    depth=101, num_groups=64, width_per_group=4, stride_in_1x1=False, norm="FrozenBN"
)
train.init_checkpoint = "torchvision://resnext101_64x4d"
train.output_dir = "./output/fsaf_X101_64x4d_FPN_1x_lazy"
