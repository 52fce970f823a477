"""Train and test data loaders of fsaf_d2: Detectron2's loaders with :class:`FSAFDatasetMapper` and checks."""
import inspect
import logging
from typing import List, Union

from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.build import build_batch_data_loader
from detectron2.data.samplers import RandomSubsetTrainingSampler, RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm

from .checks import check_datasets, check_num_classes, filter_training_annotations
from .config_datasets import register_config_datasets
from .mapper import FSAFDatasetMapper

__all__ = [
    "get_fsaf_train_dataset_dicts",
    "build_fsaf_train_sampler",
    "build_fsaf_train_loader",
    "build_fsaf_test_loader",
    "pin_memory",
]

logger = logging.getLogger(__name__)

_SUPPORTED_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


def _seed(cfg):
    """``cfg.SEED`` if it is >= 0 (deterministic data order), else None (a random seed shared by workers)."""
    return int(cfg.SEED) if cfg.SEED >= 0 else None


def get_fsaf_train_dataset_dicts(cfg) -> List[dict]:
    """Load, check and filter the dataset dicts of ``cfg.DATASETS.TRAIN``.

    Fails early on unregistered names and missing files; drops degenerate boxes; removes images without
    a usable box if ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` (with logged counts); raises ``ValueError`` if
    nothing usable is left or a category id does not fit the model's number of classes. Datasets of
    ``DATASETS.REGISTER_COCO`` are registered first.
    """
    register_config_datasets(cfg)
    names = check_datasets(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
    dicts = get_detection_dataset_dicts(
        names,
        filter_empty=False,  # done below, together with degenerate boxes, with counts per reason
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    if not isinstance(dicts, list):  # a registered torch Dataset: nothing to inspect up front
        return dicts
    dicts, _ = filter_training_annotations(
        dicts, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, dataset_names=names
    )
    check_num_classes(cfg, names, dicts)
    return dicts


def build_fsaf_train_sampler(cfg, dataset_dicts):
    """The training sampler named by ``DATALOADER.SAMPLER_TRAIN``, seeded by ``cfg.SEED`` when it is >= 0."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    seed = _seed(cfg)
    logger.info(f"Using training sampler {name} (seed {seed})")
    if name == "TrainingSampler":
        return TrainingSampler(len(dataset_dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        kwargs = {"sqrt": cfg.DATALOADER.REPEAT_SQRT} if "REPEAT_SQRT" in cfg.DATALOADER else {}
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, **kwargs
        )
        return RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        return RandomSubsetTrainingSampler(
            len(dataset_dicts), cfg.DATALOADER.RANDOM_SUBSET_RATIO, seed_shuffle=seed, seed_subset=seed
        )
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN={name!r} is not supported by fsaf_d2's train loader; use one of "
        f"{list(_SUPPORTED_SAMPLERS)}"
    )


def build_fsaf_train_loader(cfg):
    """Infinite training loader of ``cfg.DATASETS.TRAIN`` (batches are lists of mapped dicts).

    Uses :func:`get_fsaf_train_dataset_dicts`, :class:`FSAFDatasetMapper` and
    :func:`build_fsaf_train_sampler`. With ``cfg.SEED >= 0`` the order of images and the data-loader worker
    seeds (hence random flips) are deterministic; the worker seeds differ by rank (``SEED + rank``), as the
    main process's do in Detectron2's ``default_setup``. Images are uint8 (3, H, W) tensors, in pinned memory with
    ``DATALOADER.PIN_MEMORY`` on cuda / npu (:func:`pin_memory`).
    """
    dicts = get_fsaf_train_dataset_dicts(cfg)
    kwargs = {}
    seed = _seed(cfg)
    if seed is not None and "seed" in inspect.signature(build_batch_data_loader).parameters:
        # the DataLoader's torch.Generator -> its workers' seeds (random flips, scales): one stream per rank.
        # The sampler keeps the shared SEED, so that the ranks split one image order between them.
        kwargs["seed"] = seed + comm.get_rank()
    if pin_memory(cfg):
        kwargs["pin_memory"] = True
    return build_detection_train_loader(
        dataset=dicts,
        mapper=FSAFDatasetMapper(cfg, True),
        sampler=None if not isinstance(dicts, list) else build_fsaf_train_sampler(cfg, dicts),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        **kwargs,
    )


def pin_memory(cfg) -> bool:
    """``DATALOADER.PIN_MEMORY`` where pinning means something: a ``MODEL.DEVICE`` with its own memory."""
    from ..engine.device import device_type_of, is_accelerator  # the engine imports this module lazily

    return bool(cfg.DATALOADER.get("PIN_MEMORY", False)) and is_accelerator(device_type_of(cfg.MODEL.DEVICE))


def build_fsaf_test_loader(cfg, dataset_name: Union[str, List[str]]):
    """Inference loader of one test dataset (batch size 1, :class:`FSAFDatasetMapper` in test mode)."""
    register_config_datasets(cfg)
    names = check_datasets(dataset_name, "DATASETS.TEST")
    return build_detection_test_loader(cfg, names, mapper=FSAFDatasetMapper(cfg, False))
