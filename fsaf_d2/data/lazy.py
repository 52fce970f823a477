"""Dataset functions for LazyConfigs: Detectron2's ``get_detection_dataset_dicts`` with fsaf_d2's checks.

``dataloader.train.dataset = L(train_dataset_dicts)(names=..., num_classes=...)`` gives a LazyConfig the
checks that :func:`fsaf_d2.data.get_fsaf_train_dataset_dicts` gives a YAML config: registered names and
existing files, degenerate boxes dropped, images without a usable box removed, category ids that fit the
model's classes.
"""
import logging
from typing import List, Optional, Sequence, Union

from detectron2.data import get_detection_dataset_dicts

from .checks import check_category_ids, check_datasets, filter_training_annotations

__all__ = ["train_dataset_dicts", "test_dataset_dicts"]

logger = logging.getLogger(__name__)


def train_dataset_dicts(
    names: Union[str, Sequence[str]], *, filter_empty: bool = True, num_classes: Optional[int] = None
) -> List[dict]:
    """The checked training dicts of the registered datasets ``names``.

    Args:
        filter_empty: remove images without a usable non-crowd box.
        num_classes: the model's classes (``model.num_classes``); a category id >= this raises ``ValueError``.
    """
    names = check_datasets(names, "dataloader.train.dataset.names")
    dicts = get_detection_dataset_dicts(names, filter_empty=False)
    if not isinstance(dicts, list):  # a registered torch Dataset: nothing to inspect up front
        return dicts
    dicts, _ = filter_training_annotations(dicts, filter_empty=filter_empty, dataset_names=names)
    if num_classes is not None:
        check_category_ids(num_classes, "model.num_classes", names, dicts)
    return dicts


def test_dataset_dicts(names: Union[str, Sequence[str]]) -> List[dict]:
    """The dicts of the registered test datasets ``names`` (all images kept), after the name and file checks."""
    names = check_datasets(names, "dataloader.test.dataset.names")
    return get_detection_dataset_dicts(names, filter_empty=False)
