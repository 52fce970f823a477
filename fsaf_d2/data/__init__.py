"""Data: bundled quickstart dataset, input validation, dataset mapper and loaders.

Importing this module registers ``fsaf_quickstart_train`` and ``fsaf_quickstart_val`` (lazily; see
:mod:`fsaf_d2.data.datasets`).
"""
from .build import (  # noqa: F401
    build_fsaf_test_loader,
    build_fsaf_train_loader,
    build_fsaf_train_sampler,
    get_fsaf_train_dataset_dicts,
)
from .checks import (  # noqa: F401
    DatasetNotRegisteredError,
    ImageReadError,
    check_dataset_files,
    check_dataset_registered,
    check_datasets,
    filter_training_annotations,
)
from .coco_layout import resolve_coco_dataset  # noqa: F401
from .config_datasets import register_config_datasets  # noqa: F401
from .datasets import (  # noqa: F401
    QUICKSTART_DATASETS,
    ensure_quickstart,
    register_quickstart,
    registered_quickstart_root,
)
from .mapper import FSAFDatasetMapper  # noqa: F401
from .shapes import (  # noqa: F401
    QUICKSTART_CLASSES,
    dataset_statistics,
    default_quickstart_root,
    generate_quickstart,
)
from .transforms import CV2Resize, CV2ResizeTransform  # noqa: F401

register_quickstart()
