"""Early, explicit input validation for the data pipeline.

Every check fails with an error that names the offending dataset, file or config key, and says how to fix
it. Policies (see also :class:`fsaf_d2.data.FSAFDatasetMapper`):

* unregistered dataset name -> :class:`DatasetNotRegisteredError` listing similar registered names;
* missing annotation json / image directory of a json-backed dataset -> ``FileNotFoundError`` naming the
  path (for COCO names: the expected ``datasets/coco`` layout and ``$DETECTRON2_DATASETS``); the builtin
  ``coco_2017_train`` / ``coco_2017_val`` are first pointed at whichever of Detectron2's and the Ascend
  ModelZoo's layouts exists (:mod:`fsaf_d2.data.coco_layout`), else the error names both;
* unreadable / corrupt image -> :class:`ImageReadError` naming the file (raised, never skipped: skipping
  silently changes the training set, and in evaluation it would change the metrics);
* boxes of zero or negative width/height (after clipping to the image) are dropped with a logged count;
  images left without a usable (non-crowd) box are removed when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``
  is True, with a logged count per reason;
* a training set without any usable box -> ``ValueError``.
"""
import difflib
import logging
import os
from collections import Counter
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..utils.io import is_local
from .coco_layout import COCO_2017_SPLITS, layouts_description, resolve_coco_dataset

__all__ = [
    "DatasetNotRegisteredError",
    "ImageReadError",
    "check_dataset_registered",
    "check_dataset_files",
    "check_datasets",
    "filter_training_annotations",
    "check_num_classes",
    "check_category_ids",
    "num_classes_key",
]

logger = logging.getLogger(__name__)

#: minimum width and height (pixels, after clipping to the image) of a usable box; Detectron2's mapper
#: drops smaller boxes after augmentation (``filter_empty_instances``) with the same threshold
MIN_BOX_SIZE = 1e-5


class DatasetNotRegisteredError(KeyError):
    """A dataset name used in the config is not in Detectron2's ``DatasetCatalog``."""

    def __str__(self):  # KeyError would print the repr of the message (quotes, escaped newlines)
        return str(self.args[0]) if self.args else ""


class ImageReadError(OSError):
    """An image file of a dataset is missing, unreadable or corrupt."""


# --------------------------------------------------------------------------------------------- names
def check_dataset_registered(name: str, cfg_key: str = "DATASETS.TRAIN") -> None:
    """Raise :class:`DatasetNotRegisteredError` if ``name`` is not registered, suggesting similar names."""
    registered = DatasetCatalog.list()
    if name in registered:
        return
    similar = difflib.get_close_matches(name, registered, n=5, cutoff=0.6)
    if not similar:  # substring matches catch e.g. "coco_val" -> "coco_2017_val"
        parts = [p for p in name.lower().replace("-", "_").split("_") if len(p) > 2]
        similar = [r for r in registered if parts and all(p in r.lower() for p in parts)][:5]
    hint = f"Similar registered names: {similar}. " if similar else ""
    raise DatasetNotRegisteredError(
        f"Dataset '{name}' (from {cfg_key}) is not registered in Detectron2's DatasetCatalog. {hint}"
        "Register your own COCO-format data before building the loaders, e.g. "
        "`from detectron2.data.datasets import register_coco_instances; "
        f"register_coco_instances('{name}', {{}}, 'path/to/instances.json', 'path/to/images')`, "
        "or use the bundled 'fsaf_quickstart_train' / 'fsaf_quickstart_val' (registered by `import fsaf_d2`). "
        f"{len(registered)} datasets are registered; see `DatasetCatalog.list()`."
    )


# --------------------------------------------------------------------------------------------- files
def _coco_layout_hint(name: str) -> str:
    d2 = os.environ.get("DETECTRON2_DATASETS")
    where = (
        f"$DETECTRON2_DATASETS={d2!r}"
        if d2
        else f"'datasets' relative to the current directory {os.getcwd()} ($DETECTRON2_DATASETS is unset)"
    )
    return (
        f"Detectron2's builtin COCO datasets (such as '{name}') are looked up under {where}, with this layout:\n"
        "    coco/\n"
        "      annotations/instances_train2017.json\n"
        "      annotations/instances_val2017.json\n"
        "      train2017/   (118287 images)\n"
        "      val2017/     (5000 images)\n"
        "Set DETECTRON2_DATASETS before Python starts (Detectron2 reads it at import time), or register your copy "
        "under a new name with register_coco_instances(name, {}, json_file, image_root)."
    )


def _missing_file_hint(name: str) -> str:
    if name.startswith("fsaf_quickstart"):
        from .datasets import registered_quickstart_root
        from .shapes import generate_command

        root = registered_quickstart_root() or "datasets/fsaf_quickstart"
        return f"Generate the quickstart dataset with:\n    {generate_command(root)}"
    if name in COCO_2017_SPLITS:
        return layouts_description(COCO_2017_SPLITS[name])
    if "coco" in name:
        return _coco_layout_hint(name)
    return "Check the paths given to register_coco_instances() (or your own registration function)."


def check_dataset_files(name: str) -> None:
    """Raise ``FileNotFoundError`` if the annotation json or image directory in ``name``'s metadata is missing.

    Only datasets whose metadata has ``json_file`` / ``image_root`` (e.g. registered by
    ``register_coco_instances`` or Detectron2's builtins) are checked; remote paths (``scheme://``) are skipped.
    """
    meta = MetadataCatalog.get(name)
    for key, what, exists in (
        ("json_file", "annotation file", os.path.isfile),
        ("image_root", "image directory", os.path.isdir),
    ):
        path = meta.get(key, None)
        if path is None or not is_local(path) or exists(path):
            continue
        raise FileNotFoundError(
            f"The {what} of dataset '{name}' does not exist: '{path}' (metadata '{key}'; "
            f"current directory {os.getcwd()}).\n{_missing_file_hint(name)}"
        )


def check_datasets(names: Iterable[str], cfg_key: str) -> List[str]:
    """Run the registration and file checks on each name (after :func:`resolve_coco_dataset`); return the names."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError(f"{cfg_key} is empty: name at least one registered dataset")
    for name in names:
        check_dataset_registered(name, cfg_key)
    for name in names:
        resolve_coco_dataset(name)
        check_dataset_files(name)
    return names


# --------------------------------------------------------------------------------------------- boxes
def _box_is_usable(ann: dict, width, height) -> bool:
    """Whether the box has width and height > MIN_BOX_SIZE after clipping to the image (pure Python: fast)."""
    mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
    if mode == BoxMode.XYWH_ABS:
        x0, y0, w, h = (float(v) for v in ann["bbox"])
        x1, y1 = x0 + w, y0 + h
    elif mode == BoxMode.XYXY_ABS:
        x0, y0, x1, y1 = (float(v) for v in ann["bbox"])
    else:
        x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), mode, BoxMode.XYXY_ABS)
    if width is not None and height is not None:
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    return x1 - x0 > MIN_BOX_SIZE and y1 - y0 > MIN_BOX_SIZE  # False for NaN too


_COUNT_KEYS = (
    "images", "annotations", "crowd", "degenerate", "usable_boxes", "no_annotations", "only_crowd",
    "only_degenerate", "removed_images", "kept_images",
)  # fmt: skip


def filter_training_annotations(
    dataset_dicts: List[dict], *, filter_empty: bool, dataset_names: Sequence[str] = ()
) -> Tuple[List[dict], Dict[str, int]]:
    """Drop degenerate boxes and (optionally) images without a usable box, logging what was removed.

    Args:
        dataset_dicts: Detectron2 dataset dicts (not modified; changed records are shallow copies).
        filter_empty: remove images with no usable non-crowd box (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).
        dataset_names: for messages.

    Returns:
        (dicts, counts): the kept dicts, and counts with keys ``images``, ``annotations``, ``crowd``,
        ``degenerate``, ``usable_boxes`` (non-crowd), ``no_annotations``, ``only_crowd``,
        ``only_degenerate``, ``removed_images``, ``kept_images``.

    Raises:
        ValueError: if no image has a usable non-crowd box.
    """
    counts = Counter({k: 0 for k in _COUNT_KEYS})
    counts["images"] = len(dataset_dicts)
    kept = []
    for record in dataset_dicts:
        anns = record.get("annotations") or []
        width, height = record.get("width"), record.get("height")
        usable = [a for a in anns if _box_is_usable(a, width, height)]
        num_crowd = sum(a.get("iscrowd", 0) for a in usable)
        counts["annotations"] += len(anns)
        counts["degenerate"] += len(anns) - len(usable)
        counts["crowd"] += num_crowd
        counts["usable_boxes"] += len(usable) - num_crowd
        if len(usable) < len(anns):
            record = dict(record, annotations=usable)
        if len(usable) > num_crowd:
            kept.append(record)
            continue
        reason = "no_annotations" if not anns else ("only_crowd" if num_crowd else "only_degenerate")
        counts[reason] += 1
        if not filter_empty:
            kept.append(record)
    counts["removed_images"] = len(dataset_dicts) - len(kept)
    counts["kept_images"] = len(kept)
    names = ", ".join(dataset_names) or "the training set"
    if counts["degenerate"]:
        logger.warning(
            f"Dropped {counts['degenerate']} of {counts['annotations']} annotations of {names} whose box has zero "
            f"or negative width/height (<= {MIN_BOX_SIZE} px after clipping to the image)."
        )
    if counts["removed_images"]:
        logger.info(
            f"Removed {counts['removed_images']} of {counts['images']} images of {names} without a usable box "
            f"(DATALOADER.FILTER_EMPTY_ANNOTATIONS=True): {counts['no_annotations']} without annotations, "
            f"{counts['only_crowd']} with only crowd boxes, {counts['only_degenerate']} with only degenerate boxes. "
            f"{counts['kept_images']} images left."
        )
    if counts["usable_boxes"] == 0:
        files = [MetadataCatalog.get(n).get("json_file", None) for n in dataset_names]
        files = [f for f in files if f]
        raise ValueError(
            f"No usable box to train on in {names}: {counts['images']} images, {counts['annotations']} annotations "
            f"({counts['crowd']} crowd, {counts['degenerate']} with zero/negative width or height). Training needs "
            "non-crowd boxes with positive width and height"
            + (f"; check the annotation file(s) {files}." if files else ".")
            + " (An inference-only split such as COCO test-dev cannot be used in DATASETS.TRAIN.)"
        )
    return kept, dict(counts)


# --------------------------------------------------------------------------------------------- classes
_NUM_CLASSES_KEYS = {"FSAF": ("FSAF", "NUM_CLASSES"), "RetinaNet": ("RETINANET", "NUM_CLASSES")}


def num_classes_key(cfg) -> Optional[Tuple[str, str]]:
    """``("FSAF", "NUM_CLASSES")``-style key of the model's number of classes under ``cfg.MODEL``, or None
    for meta-architectures other than FSAF and RetinaNet."""
    keys = _NUM_CLASSES_KEYS.get(cfg.MODEL.META_ARCHITECTURE)
    return keys if keys is not None and keys[0] in cfg.MODEL else None


def check_num_classes(cfg, dataset_names: Sequence[str], dataset_dicts: List[dict]) -> None:
    """:func:`check_category_ids` against the model's number of classes, for the FSAF and RetinaNet
    meta-architectures (``MODEL.FSAF.NUM_CLASSES`` / ``MODEL.RETINANET.NUM_CLASSES``)."""
    keys = num_classes_key(cfg)
    if keys is None:
        return
    check_category_ids(cfg.MODEL[keys[0]][keys[1]], f"MODEL.{keys[0]}.{keys[1]}", dataset_names, dataset_dicts)


def check_category_ids(num_classes: int, key: str, dataset_names: Sequence[str], dataset_dicts: List[dict]) -> None:
    """Raise if a category id of the data is >= ``num_classes`` (the config key ``key``, named in the error).

    A model with *more* classes than the dataset's ``thing_classes`` only gets a warning (it trains, but
    wastes outputs).
    """
    max_id = max((a["category_id"] for r in dataset_dicts for a in r.get("annotations", ())), default=-1)
    classes = MetadataCatalog.get(dataset_names[0]).get("thing_classes", None) if dataset_names else None
    if max_id >= num_classes:
        raise ValueError(
            f"{key}={num_classes}, but dataset(s) {list(dataset_names)} have category id {max_id}"
            + (f" ({len(classes)} classes: {classes})" if classes else "")
            + f". Set {key} to the number of classes of the dataset."
        )
    if classes and len(classes) < num_classes:
        logger.warning(
            f"{key}={num_classes} but dataset(s) {list(dataset_names)} have {len(classes)} classes; "
            f"set {key}={len(classes)} unless this is intended."
        )
