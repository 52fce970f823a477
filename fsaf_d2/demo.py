"""Draw a detector's detections on images with Detectron2's ``Visualizer``.

Usage::

    python -m fsaf_d2.demo --config-file configs/fsaf_R50_FPN_1x.yaml \\
        --input img1.jpg photos/ "more/*.png" --output out/ [--confidence-threshold 0.3] \\
        MODEL.WEIGHTS model.pth [KEY VALUE ...]

``--input`` takes files, directories (their images, sorted) and glob patterns; each result is written to
``OUTPUT/<image name>.jpg``. The model runs on ``cfg.MODEL.DEVICE`` and sees the same preprocessing as in
evaluation (``INPUT.FORMAT``, ``INPUT.MIN/MAX_SIZE_TEST``, ``INPUT.RESIZE_BACKEND``). Class names come from
the metadata of ``cfg.DATASETS.TEST[0]`` when it is registered. Any Detectron2 meta-architecture works
(``import fsaf_d2`` registers "FSAF"). Needs OpenCV (``pip install opencv-python-headless``) for drawing.
"""
import argparse
import glob
import logging
import os
import re
from typing import List, Optional, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.modeling import build_model
from PIL import Image

from fsaf_d2.config import add_fsaf_config, validate_fsaf_config
from fsaf_d2.data.checks import ImageReadError
from fsaf_d2.data.transforms import apply_resize_backend

__all__ = ["setup_cfg", "collect_images", "Predictor", "draw_detections", "build_argument_parser", "parse_args", "main"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: images whose longer side is below this are upscaled in the drawing so that labels stay readable
MIN_DRAWING_SIDE = 512


def setup_cfg(config_file: str, opts: Sequence[str] = ()):
    """Detectron2 config with fsaf_d2's keys, merged from ``config_file`` and ``KEY VALUE`` ``opts``; frozen."""
    cfg = get_cfg()
    add_fsaf_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    validate_fsaf_config(cfg)
    cfg.freeze()
    return cfg


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Expand files, directories and glob patterns into a list of image paths (order kept, no duplicates)."""
    paths: List[str] = []
    seen = set()
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(glob.glob(os.path.expanduser(item)))
        if not found:
            raise FileNotFoundError(f"--input {item!r}: no such file, no image in that directory, or no glob match")
        for p in found:
            if p not in seen:
                seen.add(p)
                paths.append(p)
    return paths


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
            raise ValueError(f"INPUT.FORMAT={cfg.INPUT.FORMAT!r} is not supported by the demo; use 'RGB' or 'BGR'")
        if model is None:
            model = build_model(cfg)
            _load_weights(model, cfg.MODEL.WEIGHTS)
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


def _load_weights(model, weights: str) -> None:
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: drawing the detections of a randomly initialised model")
        return
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS={weights!r} does not exist")
    DetectionCheckpointer(model).load(weights)


def read_rgb(path: str) -> np.ndarray:
    """Read an image file as RGB uint8 (EXIF orientation applied); :class:`ImageReadError` naming the file."""
    try:
        return utils.read_image(path, format="RGB")
    except (OSError, SyntaxError) as e:
        raise ImageReadError(f"Cannot read image '{path}': {type(e).__name__}: {e}") from e


def _metadata(cfg):
    """Metadata of ``cfg.DATASETS.TEST[0]`` if it is registered, else an empty one (class ids are shown)."""
    if len(cfg.DATASETS.TEST) and cfg.DATASETS.TEST[0] in DatasetCatalog.list():
        return MetadataCatalog.get(cfg.DATASETS.TEST[0])
    return Metadata()


def _output_path(output_dir: str, image_path: str, used: set) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name, n = stem, 1
    while name in used:
        name, n = f"{stem}_{n}", n + 1
    used.add(name)
    return os.path.join(output_dir, name + ".jpg")


def draw_detections(cfg, model, image_paths: Sequence[str], output_dir: str, threshold: float = 0.3) -> List[str]:
    """Detect objects in each image and write the drawings to ``output_dir/<name>.jpg``.

    Args:
        cfg: config of ``model`` (test-time input settings, ``DATASETS.TEST[0]`` for class names).
        model: a built Detectron2 model (any meta-architecture; may be DDP-wrapped or in training mode).
        image_paths: image files.
        output_dir: created if needed.
        threshold: detections with a score below this are not drawn.

    Returns:
        the written file paths, in input order.
    """
    try:
        from detectron2.utils.visualizer import Visualizer
    except ImportError as e:  # detectron2.utils.visualizer imports cv2
        raise ImportError("Drawing detections needs OpenCV: `pip install opencv-python-headless`") from e
    predictor = Predictor(cfg, model)
    metadata = _metadata(cfg)
    classes = metadata.get("thing_classes", None)
    os.makedirs(output_dir, exist_ok=True)
    written, used = [], set()
    for path in image_paths:
        image = read_rgb(path)
        instances = predictor(image)
        instances = instances[instances.scores >= threshold]
        meta = metadata
        if classes is not None and len(instances) and int(instances.pred_classes.max()) >= len(classes):
            logger.warning(f"Predicted class ids exceed the {len(classes)} names of {metadata.name}; showing ids")
            meta = Metadata()
        scale = max(1.0, MIN_DRAWING_SIDE / max(image.shape[:2]))
        drawing = Visualizer(image, meta, scale=scale).draw_instance_predictions(instances).get_image()
        out = _output_path(output_dir, path, used)
        Image.fromarray(drawing).save(out, quality=95)
        logger.info(f"{path}: {len(instances)} detections with score >= {threshold} -> {out}")
        written.append(out)
    return written


def build_argument_parser() -> argparse.ArgumentParser:
    """Argument parser of ``python -m fsaf_d2.demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m fsaf_d2.demo", description="Draw detections of a Detectron2/fsaf_d2 model on images."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument("--input", required=True, nargs="+", help="image files, directories or glob patterns")
    parser.add_argument("--output", required=True, help="output directory (created)")
    parser.add_argument("--confidence-threshold", type=float, default=0.3, help="minimum score drawn (0.3)")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth",
    )
    return parser


_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line; config overrides written right after ``--input`` images are moved to ``opts``."""
    args = build_argument_parser().parse_args(argv)
    for i, item in enumerate(args.input):  # "--input a.jpg MODEL.WEIGHTS w.pth": nargs="+" took the overrides
        if _CONFIG_KEY.match(item) and not os.path.exists(item):
            args.opts = list(args.input[i:]) + list(args.opts)
            args.input = args.input[:i]
            break
    if not args.input:
        build_argument_parser().error("--input needs at least one image, directory or glob pattern")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Command-line entry point; returns the written file paths."""
    from detectron2.utils.logger import setup_logger

    args = parse_args(argv)
    setup_logger(name="fsaf_d2")
    setup_logger(name="detectron2", abbrev_name="d2")
    cfg = setup_cfg(args.config_file, args.opts)
    images = collect_images(args.input)
    predictor = Predictor(cfg)
    written = draw_detections(cfg, predictor.model, images, args.output, args.confidence_threshold)
    print(f"Wrote {len(written)} image(s) to {args.output}")
    return written


if __name__ == "__main__":
    main()
