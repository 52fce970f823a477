# LazyConfig of configs/quickstart_R18_FPN.yaml: FSAF trained from scratch on the generated quickstart shapes
# dataset (python -m fsaf_d2.data.quickstart), on the CPU: half-width ResNet-18 with trainable BN, images at
# their native 128 px (evaluated at 144 px), AdamW (docs/quickstart.md#how-the-recipe-was-chosen).
#   python tools/lazyconfig_train_net.py --config-file configs/quickstart_R18_FPN.py
from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.model_zoo import get_config
from detectron2.modeling import FPN
from detectron2.modeling.backbone import BasicStem, ResNet
from fvcore.common.param_scheduler import MultiStepParamScheduler

from fsaf_d2.modeling import resnet_stages

from .common.fsaf import dataloader, lr_multiplier, model, optimizer, train

# ---------------------------------------------------------------------------------------------- model
model.backbone = L(FPN)(
    bottom_up=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=32, norm="BN"),
        # a ResNet-18 at half width (4x fewer FLOPs), nothing frozen
        stages=L(resnet_stages)(depth=18, norm="BN", stem_out_channels=32, res2_out_channels=32),
        out_features=["res3", "res4", "res5"],
        freeze_at=0,
    ),
    in_features=["res3", "res4", "res5"],
    out_channels=64,
    top_block=None,  # objects are 16-64 px: the strides 8-32 of P3-P5, no P6/P7
)
model.head_in_features = ["p3", "p4", "p5"]
model.num_classes = 5
model.head.norm = "GN"
model.head.num_convs = 2  # lighter towers: twice the iterations in the same time
model.loss_settings.pos_scale = 0.3  # positives: the central 30 % of a box; no ignore band
model.loss_settings.neg_scale = 0.3

# ---------------------------------------------------------------------------------------------- data
dataloader.train.dataset.names = "fsaf_quickstart_train"
dataloader.train.mapper.augmentations = [L(T.RandomFlip)(horizontal=True)]  # native size, no resize
dataloader.train.num_workers = 0  # 2 cores: mapping in the training process
dataloader.test.dataset.names = "fsaf_quickstart_val"
# evaluated enlarged 128 -> 144 px (INPUT.MIN_SIZE_TEST 144 of the YAML)
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=144, max_size=1333, sample_style="choice")
]
dataloader.test.num_workers = 0

# ---------------------------------------------------------------------------------------------- solver
optimizer = get_config("common/optim.py").AdamW
optimizer.lr = 0.008
optimizer.betas = (0.9, 0.99)  # a shorter second-moment memory for a 1000-step run
optimizer.weight_decay = 0.05  # AdamW's decoupled decay; none on norm layers

lr_multiplier.scheduler = L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[800, 950, 1000])
lr_multiplier.warmup_length = 100 / 1000

# ---------------------------------------------------------------------------------------------- training
train.max_iter = 1000
train.checkpointer.period = 500
train.device = "cpu"
train.seed = 0
train.init_checkpoint = ""
train.output_dir = "./output/quickstart_lazy"
