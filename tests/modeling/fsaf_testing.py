"""Shared helpers of the modeling tests: a tiny FSAF config and synthetic inputs."""
import torch
from detectron2.structures import Boxes, Instances

from helpers import make_cfg

CONFIG = "configs/fsaf_R50_FPN_1x.yaml"

#: FSAF on a ResNet-18, BN (FrozenBN with random weights diverges), 64 FPN channels, 3 classes, CPU
TINY_MODEL_OPTS = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.DEPTH", 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", 64,
    "MODEL.FSAF.NUM_CLASSES", 3,
]


def tiny_cfg(config_file=CONFIG, **overrides):
    """``config_file`` with :data:`TINY_MODEL_OPTS`, then ``overrides`` ({"A.B": value})."""
    return make_cfg(config_file, TINY_MODEL_OPTS, **overrides)


def make_input(h, w, boxes, classes, seed=0, height=None, width=None):
    g = torch.Generator().manual_seed(seed)
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return {
        "image": torch.rand(3, h, w, generator=g) * 255,
        "instances": inst,
        "height": height or h,
        "width": width or w,
    }
