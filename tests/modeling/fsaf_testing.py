"""Shared helpers of the modeling tests: a tiny FSAF config and synthetic inputs."""
import torch
from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

import fsaf_d2

CONFIG = "configs/fsaf_R50_FPN_1x.yaml"


def tiny_cfg(config_file=CONFIG, **overrides):
    """FSAF on a ResNet-18, BN (FrozenBN with random weights diverges), 3 classes, CPU."""
    cfg = get_cfg()
    fsaf_d2.add_fsaf_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.FSAF.NUM_CLASSES = 3
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


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


