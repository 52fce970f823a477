"""Where COCO 2017 lies on disk: Detectron2's layout or the Ascend ModelZoo's, found when the data is built.

Detectron2 registers ``coco_2017_train`` / ``coco_2017_val`` at import time, pointing at
``$DETECTRON2_DATASETS/coco/{annotations,train2017,val2017}``. The Ascend ModelZoo FSAF keeps the same
files as ``COCO/annotations/instances_{train,val}2017.json`` + ``COCO/images/{train2017,val2017}/``.
:func:`resolve_coco_dataset` points the two names at whichever layout exists, searched in this order:

1. ``$DATA_PATH`` (the ModelZoo scripts' data path): the COCO folder itself, or a folder holding
   ``coco/`` or ``COCO/``;
2. ``$DETECTRON2_DATASETS`` (default ``./datasets``): ``coco/`` or ``COCO/`` in it.

Each folder is tried with both image layouts (``train2017/`` and ``images/train2017/``). The environment is
read when the data is built, not at import time. When nothing is found, the error names both layouts, the
folders searched and the two variables.
"""
import logging
import os
from typing import List, NamedTuple, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["COCO_2017_SPLITS", "CocoFiles", "coco_candidates", "find_coco_files", "resolve_coco_dataset"]

logger = logging.getLogger(__name__)

#: Detectron2's builtin dataset names that may use either layout -> their COCO split
COCO_2017_SPLITS = {"coco_2017_train": "train2017", "coco_2017_val": "val2017"}

#: image folder of a split inside the COCO folder, per layout
_IMAGE_DIRS = {"Detectron2": "{split}", "Ascend ModelZoo": os.path.join("images", "{split}")}

#: the metadata keys that register_coco_instances sets itself
_REGISTRATION_KEYS = ("name", "json_file", "image_root", "evaluator_type")


class CocoFiles(NamedTuple):
    """The annotation file and image folder of one COCO split, and the layout they follow."""

    json_file: str
    image_root: str
    layout: str  # a key of _IMAGE_DIRS


def _coco_folders() -> List[str]:
    """Folders that may be the COCO folder, in search order (see the module docstring)."""
    folders = []
    data_path = os.path.expanduser(os.environ.get("DATA_PATH", ""))
    if data_path:
        folders += [data_path, os.path.join(data_path, "coco"), os.path.join(data_path, "COCO")]
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    folders += [os.path.join(root, "coco"), os.path.join(root, "COCO")]
    return list(dict.fromkeys(folders))  # unique, order kept


def coco_candidates(split: str) -> List[CocoFiles]:
    """Every (json, image folder, layout) tried for ``split`` ("train2017" / "val2017"), in search order."""
    return [
        CocoFiles(
            os.path.join(folder, "annotations", f"instances_{split}.json"),
            os.path.join(folder, image_dir.format(split=split)),
            layout,
        )
        for folder in _coco_folders()
        for layout, image_dir in _IMAGE_DIRS.items()
    ]


def find_coco_files(split: str) -> Optional[CocoFiles]:
    """The first candidate of :func:`coco_candidates` whose json file and image folder both exist, or None."""
    for files in coco_candidates(split):
        if os.path.isfile(files.json_file) and os.path.isdir(files.image_root):
            return files
    return None


def layouts_description(split: str = "val2017") -> str:
    """The two accepted layouts and the variables that locate them (for error messages)."""
    data_path = os.environ.get("DATA_PATH", "")
    d2 = os.environ.get("DETECTRON2_DATASETS", "")
    return (
        "fsaf_d2 accepts COCO 2017 in either layout:\n"
        "  Detectron2:       coco/annotations/instances_train2017.json, instances_val2017.json;"
        " coco/train2017/, coco/val2017/\n"
        "  Ascend ModelZoo:  COCO/annotations/instances_train2017.json, instances_val2017.json;"
        " COCO/images/train2017/, COCO/images/val2017/\n"
        "looked up under $DATA_PATH (the COCO folder itself, or the folder holding it; "
        + (f"now {data_path!r}" if data_path else "unset")
        + ") and under $DETECTRON2_DATASETS ("
        + (f"now {d2!r}" if d2 else f"unset: 'datasets' relative to the current directory {os.getcwd()}")
        + "). Searched for the "
        + split
        + " split:\n"
        + "\n".join(f"  {c.json_file} + {c.image_root}/" for c in coco_candidates(split))
        + "\nSet DATA_PATH or DETECTRON2_DATASETS, or register your copy under a new name with "
        "DATASETS.REGISTER_COCO [[name, json_file, image_root]]."
    )


def resolve_coco_dataset(name: str) -> Optional[CocoFiles]:
    """Point the builtin ``coco_2017_train`` / ``coco_2017_val`` at the layout found on disk.

    Other names are left alone (returns None). The first layout found in the folders of the current
    environment wins; when none is found, a registration whose files exist is kept. Re-registering keeps
    the builtin metadata (class names, id map, colours).

    Returns:
        the files the name now points to.

    Raises:
        FileNotFoundError: no layout found and the registered files are missing; the message names both
            layouts, the searched paths and the environment variables.
    """
    split = COCO_2017_SPLITS.get(name)
    if split is None or name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    registered = CocoFiles(meta.get("json_file", ""), meta.get("image_root", ""), "registered")
    found = find_coco_files(split)
    if found is None:
        if os.path.isfile(registered.json_file) and os.path.isdir(registered.image_root):
            return registered  # registered by other code, to files outside the searched folders
        raise FileNotFoundError(f"COCO files of dataset '{name}' not found.\n{layouts_description(split)}")
    if (os.path.abspath(found.json_file), os.path.abspath(found.image_root)) != (
        os.path.abspath(registered.json_file),
        os.path.abspath(registered.image_root),
    ):
        extra = {k: v for k, v in meta.as_dict().items() if k not in _REGISTRATION_KEYS}
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        register_coco_instances(name, extra, found.json_file, found.image_root)
        logger.info(f"Dataset '{name}': {found.layout} layout, {found.json_file} + {found.image_root}")
    return found
