"""Registration of the bundled quickstart datasets ``fsaf_quickstart_train`` / ``fsaf_quickstart_val``.

Both are registered with Detectron2's standard :func:`register_coco_instances` when :mod:`fsaf_d2.data` is
imported. Registration is lazy, like Detectron2's builtin datasets: nothing is read until the dataset is
loaded, and the files need not exist. The root directory is, unless given, the one
:func:`~fsaf_d2.data.shapes.default_quickstart_root` selects from the environment.

Loading a quickstart dataset whose files are missing raises ``FileNotFoundError`` with the command that
generates them; :func:`ensure_quickstart` generates them when missing.
"""
import logging
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils import comm

from .shapes import (
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    DEFAULT_SEED,
    QUICKSTART_CLASSES,
    default_quickstart_root,
    generate_command,
    generate_quickstart,
    quickstart_exists,
    quickstart_paths,
)

__all__ = [
    "QUICKSTART_DATASETS",
    "registered_quickstart_root",
    "register_quickstart",
    "ensure_quickstart",
]

logger = logging.getLogger(__name__)

QUICKSTART_DATASETS = {"fsaf_quickstart_train": "train", "fsaf_quickstart_val": "val"}

_registered_root: Optional[str] = None


def registered_quickstart_root() -> Optional[str]:
    """The root the quickstart names currently point to (None before :func:`register_quickstart`)."""
    return _registered_root


def _checked_loader(name: str, root: str, load):
    """Wrap a catalog loader so that missing quickstart files fail with the command that generates them."""

    def load_quickstart():
        paths = quickstart_paths(root)[QUICKSTART_DATASETS[name]]
        for kind, what in (("json_file", "annotation file"), ("image_root", "image directory")):
            if not os.path.exists(paths[kind]):
                raise FileNotFoundError(
                    f"Dataset '{name}' is registered but its {what} "
                    f"'{paths[kind]}' does not exist (current directory: {os.getcwd()}). Generate the quickstart "
                    f"dataset with:\n    {generate_command(root)}\nor call fsaf_d2.data.ensure_quickstart(). "
                    "Set $FSAF_D2_DATASETS (or $DETECTRON2_DATASETS) to keep it elsewhere."
                )
        return load()

    return load_quickstart


def register_quickstart(root: Optional[str] = None) -> str:
    """(Re-)register ``fsaf_quickstart_train`` and ``fsaf_quickstart_val`` under ``root``.

    Args:
        root: dataset root; None = :func:`default_quickstart_root`. Nothing under it is read.

    Returns:
        the root used.

    The datasets are registered by :func:`register_coco_instances` (metadata ``json_file``, ``image_root``,
    ``evaluator_type="coco"``, plus ``thing_classes`` so that visualisation works before loading); their
    catalog loader is then wrapped to check that the files exist. Existing registrations of these two
    names are replaced.
    """
    global _registered_root
    root = default_quickstart_root() if root is None else os.fspath(root)
    for name, split in QUICKSTART_DATASETS.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        paths = quickstart_paths(root)[split]
        metadata = {
            "thing_classes": list(QUICKSTART_CLASSES),
            "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(QUICKSTART_CLASSES))},
        }
        register_coco_instances(name, metadata, paths["json_file"], paths["image_root"])
        load = DatasetCatalog.pop(name)  # the loader register_coco_instances just registered
        DatasetCatalog.register(name, _checked_loader(name, root, load))
    _registered_root = root
    return root


def ensure_quickstart(
    root: Optional[str] = None,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
    show_progress: bool = True,
) -> str:
    """Generate the quickstart dataset under ``root`` unless it is already complete, and register it there.

    Args:
        root: dataset root; None = the registered root (or :func:`default_quickstart_root`).
        num_train, num_val, seed: generation parameters, used only when the data is missing.
        show_progress: show a tqdm bar while generating.

    Returns:
        the root. With several processes (``detectron2.utils.comm``), local rank 0 generates and every
        process waits for it; writes are atomic, so processes sharing a file system are safe too.
    """
    if root is None:
        root = _registered_root if _registered_root is not None else default_quickstart_root()
    root = os.fspath(root)
    if comm.get_local_rank() == 0 and not quickstart_exists(root):
        logger.info(f"Generating the fsaf_d2 quickstart dataset under {os.path.abspath(root)} ...")
        generate_quickstart(root, num_train, num_val, seed, show_progress=show_progress)
    # every process, whatever it found: a rank that looked after local rank 0 finished would skip the barrier
    # that rank 0 then waits in, and the ranks' collectives would pair up wrongly
    comm.synchronize()
    if root != _registered_root:
        register_quickstart(root)
    return root
