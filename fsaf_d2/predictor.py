"""Single-image inference with the evaluation-time preprocessing of a config."""
import logging
import os
from typing import Optional

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from .data.checks import ImageReadError
from .data.transforms import apply_resize_backend
from .engine.checkpoint import AtomicCheckpointer

__all__ = ["Predictor", "read_rgb"]

logger = logging.getLogger(__name__)


class Predictor:
    """Run a model on single images with the evaluation-time preprocessing of ``cfg``.

    Unlike ``DefaultPredictor`` it takes image *paths* or RGB arrays, honours ``INPUT.RESIZE_BACKEND``, can
    wrap an existing (e.g. just trained) model, and restores the model's training mode afterwards.
    """

    def __init__(self, cfg, model: Optional[torch.nn.Module] = None):
        """
        Args:
            cfg: config (``INPUT.*`` test settings; ``MODEL.*`` when ``model`` is None).
            model: a built model, or None to build one on ``cfg.MODEL.DEVICE`` and load ``cfg.MODEL.WEIGHTS``.
        """
        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT={cfg.INPUT.FORMAT!r} is not supported by Predictor; use 'RGB' or 'BGR'")
        if model is None:
            model = build_model(cfg)
            _load_weights(model, cfg.MODEL.WEIGHTS, strict=cfg.MODEL.get("WEIGHTS_STRICT", True))
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.input_format = cfg.INPUT.FORMAT
        augs = utils.build_augmentation(cfg, is_train=False)
        self.augmentations = T.AugmentationList(apply_resize_backend(augs, cfg.INPUT.get("RESIZE_BACKEND", "pil")))

    def __call__(self, image_rgb: np.ndarray):
        """Detect objects in one RGB uint8 image (H, W, 3); return ``Instances`` on the CPU, in image pixels."""
        height, width = image_rgb.shape[:2]
        image = image_rgb if self.input_format == "RGB" else image_rgb[:, :, ::-1]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                outputs = self.model([{"image": tensor, "height": height, "width": width}])[0]
        finally:
            self.model.train(was_training)
        return outputs["instances"].to("cpu")


def _load_weights(model, weights: str, strict: bool = True) -> None:
    """Load ``weights`` into ``model`` as training and evaluation do: a checkpoint of another architecture or
    class count is a :class:`~fsaf_d2.engine.faults.CheckpointMismatchError` (unless not ``strict``), not a
    partly random model."""
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: drawing the detections of a randomly initialised model")
        return
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS={weights!r} does not exist")
    AtomicCheckpointer(model, strict=strict).load(weights)


def read_rgb(path: str) -> np.ndarray:
    """Read an image file as RGB uint8 (EXIF orientation applied); :class:`ImageReadError` naming the file."""
    try:
        return utils.read_image(path, format="RGB")
    except (OSError, SyntaxError) as e:
        raise ImageReadError(f"Cannot read image '{path}': {type(e).__name__}: {e}") from e
