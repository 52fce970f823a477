"""Pretrained weights from other code bases in fsaf_d2 / Detectron2 names.

* :mod:`fsaf_d2.weights.torchvision`: torchvision's ImageNet ResNets, and the ``torchvision://NAME`` path
  handler of ``MODEL.WEIGHTS`` (registered by ``import fsaf_d2``);
* :mod:`fsaf_d2.weights.mmdet`: mmdetection FSAF checkpoints (command line: ``tools/convert_mmdet.py``).
"""
from .errors import ConversionError  # noqa: F401
from .torchvision import register_torchvision_handler, torchvision_weights_file  # noqa: F401
