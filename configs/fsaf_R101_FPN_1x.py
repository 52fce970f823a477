# LazyConfig of configs/fsaf_R101_FPN_1x.yaml: FSAF R-101-FPN 1x on COCO (reference: 39.3 box AP).
from .common.fsaf import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "torchvision://resnet101"
train.output_dir = "./output/fsaf_R101_FPN_1x_lazy"
