"""torchvision's ImageNet ResNet/ResNeXt weights in Detectron2 names, and the ``torchvision://NAME`` weights
of ``MODEL.WEIGHTS``, converted on first use.

:func:`convert_torchvision_resnet` renames a torchvision state dict as Detectron2's
``tools/convert-torchvision-to-d2.py`` does.

``torchvision://resnet50`` resolves to torchvision's ``IMAGENET1K_V1`` weights of ``resnet50`` (those of the
reference, :func:`torchvision_weights_file`; ``torchvision://resnet50.imagenet1k_v2`` for others): the file
is taken from torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where torchvision itself saves it),
downloaded there if missing, converted once (``rename_torchvision_resnet_keys``) and cached next to it
as ``fsaf_d2/<file>_d2.pkl`` in the format of Detectron2's ``tools/convert-torchvision-to-d2.py``.
Offline machines: copy torchvision's file (e.g. ``resnet50-0676ba61.pth``) into that folder first.
The models must use ``MODEL.RESNETS.STRIDE_IN_1X1: False`` and the RGB torchvision mean/std, as the
fsaf_d2 configs do.
"""
import collections
import logging
import os
import pickle
import re
from typing import Any, List

import torch
from iopath.common.file_io import PathHandler

from ..utils.io import atomic_write
from .errors import BN_FIELDS, ConversionError

__all__ = [
    "rename_torchvision_resnet_keys",
    "convert_torchvision_resnet",
    "TorchvisionWeightsHandler",
    "register_torchvision_handler",
    "torchvision_weights_file",
]

logger = logging.getLogger(__name__)
PREFIX = "torchvision://"


_RE_TV_LAYER = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")


def rename_torchvision_resnet_keys(state_dict):
    """torchvision ImageNet ResNet / ResNeXt names -> Detectron2 ResNet names (no ``backbone.bottom_up.``).

    ``conv1.weight`` -> ``stem.conv1.weight``, ``bn1.X`` -> ``stem.conv1.norm.X``,
    ``layer{i}.{k}.conv{n}.weight`` -> ``res{i+1}.{k}.conv{n}.weight``, ``bn{n}`` -> ``conv{n}.norm``,
    ``downsample.0`` -> ``shortcut``, ``downsample.1`` -> ``shortcut.norm``: the names Detectron2's
    ``tools/convert-torchvision-to-d2.py`` produces. ``fc.*`` (the classifier) and
    ``num_batches_tracked`` are dropped; any other key raises :class:`ConversionError`.
    """
    out = collections.OrderedDict()
    unmapped = []
    for k, v in state_dict.items():
        if k.endswith("num_batches_tracked") or k.startswith("fc."):
            continue
        if k == "conv1.weight":
            out["stem.conv1.weight"] = v
            continue
        m = re.match(r"^bn1\.(\w+)$", k)
        if m and m.group(1) in BN_FIELDS:
            out[f"stem.conv1.norm.{m.group(1)}"] = v
            continue
        m = _RE_TV_LAYER.match(k)
        if m:
            i, b, rest = m.groups()
            prefix = f"res{int(i) + 1}.{b}."
            mm = re.match(r"^conv([1-3])\.weight$", rest)
            if mm:
                out[prefix + rest] = v
                continue
            mm = re.match(r"^bn([1-3])\.(\w+)$", rest)
            if mm and mm.group(2) in BN_FIELDS:
                out[prefix + f"conv{mm.group(1)}.norm.{mm.group(2)}"] = v
                continue
            if rest == "downsample.0.weight":
                out[prefix + "shortcut.weight"] = v
                continue
            mm = re.match(r"^downsample\.1\.(\w+)$", rest)
            if mm and mm.group(1) in BN_FIELDS:
                out[prefix + f"shortcut.norm.{mm.group(1)}"] = v
                continue
        unmapped.append(k)
    if unmapped:
        raise ConversionError(f"torchvision ResNet keys without a Detectron2 name: {unmapped}")
    return out


def convert_torchvision_resnet(state_dict):
    """Convert a torchvision ImageNet ResNet/ResNeXt state dict to a Detectron2 checkpoint dict.

    Returns ``{"model": renamed_state_dict, "__author__": "torchvision", "matching_heuristics": True}``,
    the format of Detectron2's ``tools/convert-torchvision-to-d2.py``: the names carry no
    ``backbone.bottom_up.`` prefix, and Detectron2's checkpointer matches them to the model by suffix.
    The model must use ``MODEL.RESNETS.STRIDE_IN_1X1: False`` and the RGB torchvision mean/std.
    A dict holding ``state_dict`` or ``model`` is unwrapped first.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], collections.abc.Mapping):
        state_dict = state_dict["state_dict"]
    elif "model" in state_dict and isinstance(state_dict["model"], collections.abc.Mapping):
        state_dict = state_dict["model"]
    return {
        "model": rename_torchvision_resnet_keys(state_dict),
        "__author__": "torchvision",
        "matching_heuristics": True,
    }


def torchvision_weights_file(name: str):
    """(path in torch's hub cache, download URL) of torchvision's ImageNet weights ``name``.

    ``name`` is a torchvision model name, optionally with a weights tag after a dot. A bare name takes the
    ``IMAGENET1K_V1`` weights where torchvision has them (``resnet50`` -> ``resnet50-0676ba61.pth``), else
    its default: the file mmdetection's ``torchvision://resnet50`` loads and the reference models were
    trained from (torchvision's default for ResNet-50/101 is the later ``IMAGENET1K_V2`` recipe).
    ``resnet50.imagenet1k_v2`` or ``resnet50.default`` choose other weights.
    """
    import torchvision

    model, _, tag = name.partition(".")
    try:
        weights = torchvision.models.get_model_weights(model)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"MODEL.WEIGHTS '{PREFIX}{name}': torchvision has no model named {model!r} "
            "(expected e.g. resnet18, resnet34, resnet50, resnet101, resnext101_64x4d)"
        ) from e
    tags = {w.name.lower(): w for w in weights}
    tags["default"] = weights.DEFAULT
    if not tag:
        chosen = tags.get("imagenet1k_v1", weights.DEFAULT)
    elif tag.lower() in tags:
        chosen = tags[tag.lower()]
    else:
        raise ValueError(
            f"MODEL.WEIGHTS '{PREFIX}{name}': torchvision's {model} has no weights {tag!r}; "
            f"available: {', '.join(sorted(tags))}"
        )
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(chosen.url)), chosen.url


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
        converted = convert_torchvision_resnet(torch.load(source, map_location="cpu", weights_only=True))
        converted["model"] = {k: v.numpy() for k, v in converted["model"].items()}
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write(target, lambda f: pickle.dump(converted, f))
        logger.info(f"Converted {source} to Detectron2 names: {target}")
        return target

    def _open(self, path: str, mode: str = "r", **kwargs: Any):
        return open(self._get_local_path(path), mode)


def register_torchvision_handler() -> None:
    """Register the handler with Detectron2's PathManager (idempotent)."""
    from detectron2.utils.file_io import PathManager

    if PREFIX not in PathManager._path_handlers:
        PathManager.register_handler(TorchvisionWeightsHandler())
