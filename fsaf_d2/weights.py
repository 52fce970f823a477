"""``torchvision://NAME`` weights for ``MODEL.WEIGHTS``: torchvision's ImageNet ResNet/ResNeXt, converted
on first use to Detectron2 names.

``torchvision://resnet50`` resolves to torchvision's default ImageNet weights of ``resnet50``: the file
is taken from torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where torchvision itself saves it),
downloaded there if missing, converted once (``rename_torchvision_resnet_keys``) and cached next to it
as ``fsaf_d2/<file>_d2.pkl`` in the format of Detectron2's ``tools/convert-torchvision-to-d2.py``.
Offline machines: copy torchvision's file (e.g. ``resnet50-0676ba61.pth``) into that folder first.
The models must use ``MODEL.RESNETS.STRIDE_IN_1X1: False`` and the RGB torchvision mean/std, as the
fsaf_d2 configs do.
"""
import logging
import os
import pickle
from typing import Any, List

import torch
from iopath.common.file_io import PathHandler

__all__ = ["TorchvisionWeightsHandler", "register_torchvision_handler", "torchvision_weights_file"]

logger = logging.getLogger(__name__)
PREFIX = "torchvision://"


def torchvision_weights_file(name: str):
    """(path in torch's hub cache, download URL) of torchvision's default ImageNet weights of ``name``."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"MODEL.WEIGHTS '{PREFIX}{name}': torchvision has no model named {name!r} "
            "(expected e.g. resnet18, resnet34, resnet50, resnet101, resnext101_64x4d)"
        ) from e
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url)), weights.url


class TorchvisionWeightsHandler(PathHandler):
    """iopath handler turning ``torchvision://NAME`` into a local, Detectron2-named weights file."""

    def _get_supported_prefixes(self) -> List[str]:
        return [PREFIX]

    def _get_local_path(self, path: str, **kwargs: Any) -> str:
        name = path[len(PREFIX):].strip("/")
        source, url = torchvision_weights_file(name)
        cache_dir = os.path.join(os.path.dirname(source), "fsaf_d2")
        target = os.path.join(cache_dir, os.path.splitext(os.path.basename(source))[0] + "_d2.pkl")
        if os.path.isfile(target) and os.path.getmtime(target) >= os.path.getmtime(source if os.path.isfile(source) else target):
            return target
        if not os.path.isfile(source):
            logger.info(f"Downloading {url} to {source}")
            os.makedirs(os.path.dirname(source), exist_ok=True)
            try:
                torch.hub.download_url_to_file(url, source, progress=False)
            except Exception as e:  # no network, proxy, ...
                raise FileNotFoundError(
                    f"MODEL.WEIGHTS '{path}': torchvision's weights file {source} is missing and could not be "
                    f"downloaded from {url} ({type(e).__name__}: {e}). Download it on a machine with network "
                    "access and copy it there (TORCH_HOME selects the folder)."
                ) from e
        from .convert_mmdet import convert_torchvision_resnet

        converted = convert_torchvision_resnet(torch.load(source, map_location="cpu", weights_only=True))
        converted["model"] = {k: v.numpy() for k, v in converted["model"].items()}
        os.makedirs(cache_dir, exist_ok=True)
        tmp = target + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump(converted, f)
        os.replace(tmp, target)
        logger.info(f"Converted {source} to Detectron2 names: {target}")
        return target

    def _open(self, path: str, mode: str = "r", **kwargs: Any):
        return open(self._get_local_path(path), mode)


def register_torchvision_handler() -> None:
    """Register the handler with Detectron2's PathManager (idempotent)."""
    from detectron2.utils.file_io import PathManager

    if PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(TorchvisionWeightsHandler())
