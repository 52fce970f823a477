"""Registration of the bundled quickstart datasets ``fsaf_quickstart_train`` / ``fsaf_quickstart_val``.

Both are registered with Detectron2's standard :func:`register_coco_instances` when :mod:`fsaf_d2.data` is
imported. Registration is lazy, like Detectron2's builtin datasets: nothing is read until the dataset is
loaded, and the files need not exist. The root directory is, in this order of precedence:

1. ``$FSAF_D2_DATASETS`` (the quickstart root itself),
2. ``$DETECTRON2_DATASETS/fsaf_quickstart``,
3. ``datasets/fsaf_quickstart``, relative to the current directory at load time (as Detectron2's builtins).

Loading a quickstart dataset whose files are missing raises ``FileNotFoundError`` with the command that
generates them; :func:`ensure_quickstart` generates them when missing.
"""
import logging
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.utils import comm

from .quickstart import (
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    DEFAULT_SEED,
    QUICKSTART_CLASSES,
    generate_quickstart,
    quickstart_paths,
)

__all__ = [
    "QUICKSTART_DATASETS",
    "default_quickstart_root",
    "registered_quickstart_root",
    "register_quickstart",
    "quickstart_exists",
    "ensure_quickstart",
    "ensure_quickstart_for_config",
    "generate_command",
]

logger = logging.getLogger(__name__)

QUICKSTART_DATASETS = {"fsaf_quickstart_train": "train", "fsaf_quickstart_val": "val"}

_registered_root: Optional[str] = None


def default_quickstart_root() -> str:
    """The quickstart root selected by the environment (see the module docstring); not made absolute."""
    own = os.environ.get("FSAF_D2_DATASETS", "")
    if own:
        return os.path.expanduser(own)
    d2 = os.environ.get("DETECTRON2_DATASETS", "")
    if d2:
        return os.path.join(os.path.expanduser(d2), "fsaf_quickstart")
    return os.path.join("datasets", "fsaf_quickstart")


def registered_quickstart_root() -> Optional[str]:
    """The root the quickstart names currently point to (None before :func:`register_quickstart`)."""
    return _registered_root


def generate_command(root: str) -> str:
    """The shell command that generates the quickstart dataset under ``root``."""
    return f"python -m fsaf_d2.data.quickstart --root {root}"


def quickstart_exists(root: str) -> bool:
    """Whether both splits under ``root`` are complete (each json is written last, after its images)."""
    return all(
        os.path.isfile(p["json_file"]) and os.path.isdir(p["image_root"]) for p in quickstart_paths(root).values()
    )


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
    if not quickstart_exists(root):
        if comm.get_local_rank() == 0:
            logger.info(f"Generating the fsaf_d2 quickstart dataset under {os.path.abspath(root)} ...")
            generate_quickstart(root, num_train, num_val, seed, show_progress=show_progress)
        comm.synchronize()
    if root != _registered_root:
        register_quickstart(root)
    return root


def ensure_quickstart_for_config(cfg, **kwargs) -> Optional[str]:
    """Call :func:`ensure_quickstart` if ``cfg.DATASETS.TRAIN`` or ``TEST`` names a quickstart dataset.

    For training scripts: the quickstart data is generated on first use. Returns the root, or None if the
    config does not use the quickstart datasets. ``kwargs`` go to :func:`ensure_quickstart`.
    """
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if not any(n in QUICKSTART_DATASETS for n in names):
        return None
    return ensure_quickstart(**kwargs)
