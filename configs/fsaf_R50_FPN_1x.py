# LazyConfig of configs/fsaf_R50_FPN_1x.yaml: FSAF R-50-FPN 1x on COCO (reference: 37.4 box AP).
#   python tools/lazyconfig_train_net.py --config-file configs/fsaf_R50_FPN_1x.py --num-gpus 8
from .common.fsaf import dataloader, lr_multiplier, model, optimizer, train

# ImageNet ResNet-50 from torchvision, converted on the fly (docs/training.md#imagenet-weights)
train.init_checkpoint = "torchvision://resnet50"
train.output_dir = "./output/fsaf_R50_FPN_1x_lazy"
