# LazyConfig of configs/fsaf_retinanet_R101_FPN_1x.yaml: the combined RetinaNet + FSAF model on ResNet-101.
from .fsaf_retinanet_R50_FPN_1x import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.stages.depth = 101
train.init_checkpoint = "torchvision://resnet101"
train.output_dir = "./output/fsaf_retinanet_R101_FPN_1x_lazy"
