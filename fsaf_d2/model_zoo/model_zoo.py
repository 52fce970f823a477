"""The model zoo: the configs shipped with fsaf_d2 and mmdetection's released FSAF weights, converted on use.

The configs are the repository's ``configs/`` folder. A built wheel ships it inside the package as
``fsaf_d2/model_zoo/configs`` (setup.py maps that package folder to ``configs/``, as it maps ``fsaf_d2.tools``
to ``tools/``); a clone or an editable install reads ``configs/`` next to the package. There is one copy.

Trained weights are mmdetection's released FSAF checkpoints (docs/parity.md): downloaded once into the cache
(``$FSAF_D2_CACHE``, default ``<torch hub dir>/fsaf_d2``), converted by :mod:`fsaf_d2.weights.mmdet` and
kept there as ``<name>_fsaf_d2.pth``.
"""
import logging
import os
import re
from typing import List, Optional
from urllib.error import URLError

import torch
from torch.hub import download_url_to_file

__all__ = [
    "TrainedWeightsUnavailable",
    "config_dir",
    "list_configs",
    "get_config_file",
    "resolve_config_file",
    "get_checkpoint_url",
    "trained_checkpoint",
    "get_config",
    "get",
]

logger = logging.getLogger(__name__)

#: where mmdetection publishes its FSAF checkpoints
MMDET_DOWNLOAD_ROOT = "https://download.openmmlab.com/mmdetection/v2.0/fsaf/"

#: config name (without .yaml / .py) -> mmdetection's released checkpoint, relative to MMDET_DOWNLOAD_ROOT
RELEASED_CHECKPOINTS = {
    "fsaf_R50_FPN_1x": "fsaf_r50_fpn_1x_coco/fsaf_r50_fpn_1x_coco-94ccc51f.pth",
    "fsaf_R101_FPN_1x": "fsaf_r101_fpn_1x_coco/fsaf_r101_fpn_1x_coco-9e71098f.pth",
    "fsaf_X101_64x4d_FPN_1x": "fsaf_x101_64x4d_fpn_1x_coco/fsaf_x101_64x4d_fpn_1x_coco-e3f6e6fd.pth",
}


class TrainedWeightsUnavailable(RuntimeError):
    """The released weights of a config cannot be had here (none released, or the download failed)."""


def config_dir() -> str:
    """The folder of the shipped configs: inside the installed package, or ``configs/`` of a clone."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (
        os.path.join(here, "configs"),  # wheel / pip install .
        os.path.join(os.path.dirname(os.path.dirname(here)), "configs"),  # clone, editable install
    ):
        if os.path.isfile(os.path.join(candidate, "Base-FSAF.yaml")):
            return candidate
    raise FileNotFoundError(
        f"fsaf_d2's configs are neither in the package ({os.path.join(here, 'configs')}) nor next to it: this "
        "installation is incomplete. Reinstall fsaf_d2 (pip install . from the repository, or the wheel)."
    )


def list_configs() -> List[str]:
    """Names of the shipped configs one trains with (YAML and LazyConfig; bases excluded), sorted."""
    names = os.listdir(config_dir())
    return sorted(n for n in names if n.endswith((".yaml", ".py")) and not n.startswith(("Base-", "_")))


def get_config_file(config_path: str) -> str:
    """The path of a shipped config, e.g. ``get_config_file("fsaf_R50_FPN_1x.yaml")``."""
    path = os.path.join(config_dir(), config_path)
    if not os.path.isfile(path):
        raise RuntimeError(f"{config_path} is not a config shipped with fsaf_d2; available: {list_configs()}")
    return path


def resolve_config_file(path: str) -> str:
    """``path`` if it is a file, else the shipped config it names: ``fsaf_R50_FPN_1x.yaml`` or
    ``configs/fsaf_R50_FPN_1x.yaml`` (as the README writes it) run from any directory and from an installed
    package. Raises ``FileNotFoundError`` naming the shipped configs when it is neither."""
    if not path or os.path.isfile(path):
        return path
    name = path[len("configs/"):] if path.startswith("configs/") else path
    shipped = os.path.join(config_dir(), name)
    if os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(
        f"Config file {path!r} does not exist (current directory {os.getcwd()}), and fsaf_d2 ships no config of "
        f"that name; shipped: {list_configs()}"
    )


def _stem(config_path: str) -> str:
    return os.path.splitext(os.path.basename(config_path))[0]


def get_checkpoint_url(config_path: str) -> str:
    """The URL of mmdetection's released checkpoint for a shipped config (converted on use by :func:`get`)."""
    release = RELEASED_CHECKPOINTS.get(_stem(config_path))
    if release is None:
        raise TrainedWeightsUnavailable(
            f"No released weights for {config_path}: mmdetection released FSAF models for "
            f"{sorted(n + '.yaml' for n in RELEASED_CHECKPOINTS)} (and their .py LazyConfigs). Train this one "
            "with train_net.py / tools/lazyconfig_train_net.py."
        )
    return MMDET_DOWNLOAD_ROOT + release


def _cache_dir() -> str:
    return os.environ.get("FSAF_D2_CACHE") or os.path.join(torch.hub.get_dir(), "fsaf_d2")


def trained_checkpoint(config_path: str) -> str:
    """The local fsaf_d2 checkpoint of a config's released weights: downloaded and converted on first use.

    The mmdetection file is looked for in the cache folder first (put it there by hand on a machine
    without internet access), else downloaded there. Raises :class:`TrainedWeightsUnavailable`, naming the
    URL and both ways forward, when it can be neither found nor downloaded.
    """
    from ..utils.io import atomic_torch_save
    from ..weights.mmdet import ConversionError, convert_mmdet_checkpoint, load_checkpoint_file

    url = get_checkpoint_url(config_path)
    cache = _cache_dir()
    source = os.path.join(cache, os.path.basename(url))
    converted = os.path.splitext(source)[0] + "_fsaf_d2.pth"
    if os.path.isfile(converted):
        return converted
    if not os.path.isfile(source):
        os.makedirs(cache, exist_ok=True)
        logger.info(f"Downloading {url} to {source}")
        # the 8 hex digits of a release's name are its sha256 prefix: a proxy's page or a truncated file fails
        # the check, and nothing is left behind (the download goes through a temporary file)
        sha256_prefix = re.search(r"-([0-9a-f]{8})\.pth$", url)
        try:
            download_url_to_file(url, source, hash_prefix=sha256_prefix.group(1) if sha256_prefix else None)
        except (URLError, OSError, ValueError, RuntimeError) as e:
            raise TrainedWeightsUnavailable(
                f"Cannot download the released weights of {config_path} from {url} ({type(e).__name__}: {e}). "
                f"Download that file elsewhere and either put it at {source} (fsaf_d2 converts it on first use), "
                f"or convert it yourself: fsaf-convert-mmdet {os.path.basename(url)} model.pth, then load "
                "model.pth (MODEL.WEIGHTS, or train.init_checkpoint of a LazyConfig)."
            ) from e
    try:
        out, _ = convert_mmdet_checkpoint(load_checkpoint_file(source))
    except ConversionError as e:
        raise TrainedWeightsUnavailable(
            f"The released weights of {config_path} at {source} cannot be used: {e}\nDelete {source}; fsaf_d2 "
            "then downloads it again (or put a good copy there)."
        ) from e
    atomic_torch_save(out, converted)
    logger.info(f"Converted {source} to {converted}")
    return converted


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_config(config_path: str, trained: bool = False, device: Optional[str] = None):
    """The config of a shipped file: a frozen ``CfgNode`` for ``.yaml`` (built by
    :func:`fsaf_d2.engine.build_config`), a LazyConfig for ``.py``.

    Args:
        trained: point the weights (``MODEL.WEIGHTS`` / ``train.init_checkpoint``) at the released model
            (:func:`trained_checkpoint`; downloads and converts it on first use).
        device: ``MODEL.DEVICE`` / ``train.device``; None keeps the config's.
    """
    path = get_config_file(config_path)
    weights = trained_checkpoint(config_path) if trained else None
    if path.endswith(".py"):
        from ..engine.lazy import load_lazy_config

        opts = [f"train.device={device}"] if device else []
        opts += [f"train.init_checkpoint={weights}"] if weights else []
        return load_lazy_config(path, opts)
    from ..engine.config import build_config

    opts = ["MODEL.DEVICE", device] if device else []
    opts += ["MODEL.WEIGHTS", weights] if weights else []
    return build_config(path, opts)


def get(config_path: str, trained: bool = False, device: Optional[str] = None) -> torch.nn.Module:
    """The model of a shipped config, on ``device`` (default: cuda if available, else cpu), with its weights
    loaded: the released model with ``trained``, else the config's own (``MODEL.WEIGHTS`` /
    ``train.init_checkpoint``: ImageNet backbone weights for the COCO configs, none for the quickstart).
    As ``detectron2.model_zoo.get``, the model is returned in training mode."""
    from ..engine.checkpoint import AtomicCheckpointer

    cfg = get_config(config_path, trained=trained, device=device or _default_device())
    if config_path.endswith(".py"):
        from ..engine.lazy import build_lazy_model

        model, weights = build_lazy_model(cfg), cfg.train.init_checkpoint
    else:
        from detectron2.modeling import build_model

        model, weights = build_model(cfg), cfg.MODEL.WEIGHTS
    AtomicCheckpointer(model).load(weights)  # trusted files: Detectron2 checkpoints hold non-tensor entries
    return model
