"""Detections drawn on images with Detectron2's ``Visualizer`` (OpenCV: ``pip install opencv-python-headless``)."""
import logging
import os
from typing import List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from PIL import Image

from .data.config_datasets import register_config_datasets
from .predictor import Predictor, read_rgb

__all__ = ["MIN_DRAWING_SIDE", "class_metadata", "draw_detections"]

logger = logging.getLogger(__name__)

#: images whose longer side is below this are upscaled in the drawing so that labels stay readable
MIN_DRAWING_SIDE = 512


def class_metadata(cfg):
    """Metadata of ``cfg.DATASETS.TEST[0]`` if it is registered, else an empty one (class ids are shown).

    Datasets of ``DATASETS.REGISTER_COCO`` are registered first; when their files are not on this machine,
    a warning is logged and the class ids are shown.
    """
    try:
        register_config_datasets(cfg)
    except (FileNotFoundError, ValueError) as e:
        logger.warning(f"Class names not available: {e}")
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
    metadata = class_metadata(cfg)
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
