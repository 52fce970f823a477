"""COCO-format datasets registered from the config: ``DATASETS.REGISTER_COCO``, no Python needed.

``DATASETS.REGISTER_COCO`` is a list of ``[NAME, JSON_FILE, IMAGE_ROOT]`` triples. Each is registered with
Detectron2's :func:`register_coco_instances` under ``NAME``, its class names taken from the json's
``categories`` (ordered by id, as Detectron2's loader orders them), and is then used like any registered
name in ``DATASETS.TRAIN`` / ``DATASETS.TEST``::

    DATASETS:
      REGISTER_COCO: [[mydata_train, data/train.json, data/images], [mydata_val, data/val.json, data/images]]
      TRAIN: ("mydata_train",)
      TEST: ("mydata_val",)

:func:`check_config_datasets` runs in ``train_net.py``'s launching process (so a bad entry fails before
any worker starts); :func:`register_config_datasets` registers when the loaders are built (in every worker). It fails early, naming the
entry and the key, on: a malformed entry, a missing json file or image folder, a json that is not COCO or
has no categories, a name already registered by other code, datasets of ``DATASETS.TRAIN`` / ``TEST``
whose class lists differ, and a ``MODEL.FSAF.NUM_CLASSES`` (``MODEL.RETINANET.NUM_CLASSES``) different from
the number of classes.
"""
import functools
import json
import logging
import os
from typing import Dict, List, NamedTuple, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from .checks import num_classes_key

__all__ = [
    "CocoEntry",
    "check_config_datasets",
    "parse_register_coco",
    "read_coco_categories",
    "register_config_datasets",
]

logger = logging.getLogger(__name__)

KEY = "DATASETS.REGISTER_COCO"
_EXAMPLE = f"{KEY} \"[('mydata_train', 'data/train.json', 'data/images')]\""

#: name -> (json_file, image_root) of the datasets registered here (absolute paths)
_registered: Dict[str, Tuple[str, str]] = {}


class CocoEntry(NamedTuple):
    """One ``DATASETS.REGISTER_COCO`` entry."""

    name: str
    json_file: str
    image_root: str


def parse_register_coco(entries) -> List[CocoEntry]:
    """Check the form of ``DATASETS.REGISTER_COCO`` (no file access) and return its entries.

    Raises:
        ValueError: an entry is not three non-empty strings, or a name appears twice.
    """
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"{KEY} must be a list of [name, json_file, image_root] entries, got {entries!r}; e.g. {_EXAMPLE}")
    parsed = []
    for entry in entries:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(v, str) and v for v in entry)
        ):
            raise ValueError(
                f"{KEY} entry {entry!r} is not [name, json_file, image_root] (three non-empty strings); "
                f"e.g. {_EXAMPLE}"
            )
        parsed.append(CocoEntry(*entry))
    names = [e.name for e in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{KEY} names {duplicates} more than once")
    return parsed


@functools.lru_cache(maxsize=16)
def _read_categories(json_file: str, mtime_ns: int, size: int) -> Tuple[Tuple[int, str], ...]:
    """``(id, name)`` of the categories of a COCO json, ordered by id (cached per file version)."""
    del mtime_ns, size  # cache key only
    with open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{json_file}' is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{json_file}' is not a COCO annotation file: its top level is not an object")
    categories = data.get("categories")
    if not categories:
        raise ValueError(
            f"'{json_file}' has no 'categories': a COCO annotation file lists its classes as "
            "\"categories\": [{\"id\": 1, \"name\": \"...\"}, ...], from which fsaf_d2 takes the class names"
        )
    bad = [c for c in categories if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c]
    if bad:
        raise ValueError(f"'{json_file}': categories need an integer 'id' and a 'name'; got {bad[:3]}")
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise ValueError(f"'{json_file}': category ids are not unique: {sorted(ids)}")
    return tuple((c["id"], str(c["name"])) for c in sorted(categories, key=lambda c: c["id"]))


def read_coco_categories(json_file: str) -> List[Tuple[int, str]]:
    """``(id, name)`` of the categories of the COCO json ``json_file``, ordered by id (Detectron2's class order).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a COCO json, no (or malformed) ``categories``.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"annotation file '{json_file}' does not exist (current directory {os.getcwd()})")
    st = os.stat(json_file)
    return list(_read_categories(os.path.abspath(json_file), st.st_mtime_ns, st.st_size))


def _register(entry: CocoEntry, categories: List[Tuple[int, str]]) -> None:
    """Register ``entry`` (idempotent for the same files; replaces an earlier registration of ours)."""
    files = (os.path.abspath(entry.json_file), os.path.abspath(entry.image_root))
    if entry.name in DatasetCatalog.list():
        if _registered.get(entry.name) == files:
            return
        DatasetCatalog.remove(entry.name)
        MetadataCatalog.remove(entry.name)
    # the same thing_classes / id map that load_coco_json sets when the data is loaded (ids sorted)
    metadata = {
        "thing_classes": [name for _, name in categories],
        "thing_dataset_id_to_contiguous_id": {cat_id: i for i, (cat_id, _) in enumerate(categories)},
    }
    register_coco_instances(entry.name, metadata, *files)
    _registered[entry.name] = files
    logger.info(f"Registered dataset '{entry.name}' from {KEY}: {files[0]} + {files[1]} ({len(categories)} classes)")


def _check_classes(cfg, classes_by_name: Dict[str, List[str]]) -> None:
    """The registered datasets of DATASETS.TRAIN / TEST share one class list, of the model's size."""
    used = [n for n in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST) if n in classes_by_name]
    if not used:
        return
    first = used[0]
    for name in used[1:]:
        if classes_by_name[name] != classes_by_name[first]:
            raise ValueError(
                f"Datasets '{first}' and '{name}' ({KEY}) have different classes: {classes_by_name[first]} and "
                f"{classes_by_name[name]}. Training and test sets need the same categories (same ids and names)."
            )
    key = num_classes_key(cfg)
    if key is None:
        return
    num_classes = cfg.MODEL[key[0]][key[1]]
    classes = classes_by_name[first]
    if num_classes != len(classes):
        raise ValueError(
            f"MODEL.{key[0]}.{key[1]}={num_classes}, but dataset '{first}' ({KEY}) has {len(classes)} classes "
            f"{classes}. Set MODEL.{key[0]}.{key[1]} {len(classes)}."
        )


def check_config_datasets(cfg) -> Dict[str, List[Tuple[int, str]]]:
    """Check the entries of ``cfg.DATASETS.REGISTER_COCO`` against the files and the config; register nothing.

    Returns:
        ``{name: [(category id, class name), ...]}`` of every entry, ordered by category id.

    Raises:
        FileNotFoundError: a json file or image folder is missing (the entry and key are named).
        ValueError: malformed entry, name registered by other code, json without categories, class lists or
            class count mismatch.
    """
    categories_by_name = {}
    for entry in parse_register_coco(cfg.DATASETS.get("REGISTER_COCO", [])):
        if entry.name in DatasetCatalog.list() and entry.name not in _registered:
            raise ValueError(
                f"{KEY} entry '{entry.name}': the name is already registered (a Detectron2 builtin or registered by "
                f"code: {MetadataCatalog.get(entry.name).get('json_file', 'no json file')}); choose another name"
            )
        try:
            categories = read_coco_categories(entry.json_file)
            if not os.path.isdir(entry.image_root):
                raise FileNotFoundError(
                    f"image folder '{entry.image_root}' does not exist (current directory {os.getcwd()})"
                )
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{KEY} entry '{entry.name}': {e}") from None
        categories_by_name[entry.name] = categories
    _check_classes(cfg, {name: [c for _, c in cats] for name, cats in categories_by_name.items()})
    return categories_by_name


def register_config_datasets(cfg) -> List[str]:
    """Register the datasets of ``cfg.DATASETS.REGISTER_COCO`` after :func:`check_config_datasets`.

    Returns:
        the registered names. Registering the same files again is a no-op.
    """
    entries = parse_register_coco(cfg.DATASETS.get("REGISTER_COCO", []))
    categories_by_name = check_config_datasets(cfg)
    for entry in entries:
        _register(entry, categories_by_name[entry.name])
    return [e.name for e in entries]
