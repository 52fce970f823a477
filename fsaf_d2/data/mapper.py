"""FSAF's dataset mapper: Detectron2's :class:`DatasetMapper` plus resize backend, crowd policy, read errors."""
import logging
from typing import List

import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils

from .checks import ImageReadError
from .transforms import apply_resize_backend

__all__ = ["FSAFDatasetMapper"]

logger = logging.getLogger(__name__)


class FSAFDatasetMapper(DatasetMapper):
    """Map a Detectron2 dataset dict to model inputs, like :class:`DatasetMapper`, with three additions.

    1. ``INPUT.RESIZE_BACKEND``: "pil" resizes as Detectron2 does; "cv2" with ``cv2.INTER_LINEAR`` as
       mmdetection does (same output sizes; see :mod:`fsaf_d2.data.transforms`).
    2. Crowd boxes (``iscrowd=1``): with ``MODEL.FSAF.CROWD_AS_IGNORE`` False (default) they are dropped,
       as in Detectron2. With True (training only) they are kept in ``instances`` and flagged by the
       boolean field ``instances.gt_is_crowd`` (same length as ``gt_boxes``), for the head to ignore.
       The field is present only in that mode.
    3. An image that cannot be read (missing, truncated or not an image) raises :class:`ImageReadError`
       naming the file and image id, instead of a bare PIL error. The image is not skipped.
    """

    @configurable
    def __init__(self, is_train: bool, *, crowd_as_ignore: bool = False, **kwargs):
        """
        Args:
            is_train, kwargs: as :class:`DatasetMapper`.
            crowd_as_ignore: keep crowd boxes, flagged by ``instances.gt_is_crowd`` (training only).
        """
        super().__init__(is_train, **kwargs)
        self.crowd_as_ignore = bool(crowd_as_ignore)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = apply_resize_backend(ret["augmentations"], cfg.INPUT.get("RESIZE_BACKEND", "pil"))
        fsaf = cfg.MODEL.get("FSAF", None)
        ret["crowd_as_ignore"] = bool(is_train and fsaf is not None and fsaf.get("CROWD_AS_IGNORE", False))
        return ret

    def __call__(self, dataset_dict: dict) -> dict:
        try:
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as e:  # PIL: OSError (incl. FileNotFoundError), SyntaxError (bad PNG)
            if isinstance(e, ImageReadError):
                raise
            file_name = dataset_dict.get("file_name", "<no file_name>")
            raise ImageReadError(
                f"Cannot read image '{file_name}' (image_id {dataset_dict.get('image_id')}): "
                f"{type(e).__name__}: {e}. The file is missing, truncated or not an image; restore it, or remove "
                "it from the annotation file. fsaf_d2 does not skip unreadable images."
            ) from e

    def _transform_annotations(self, dataset_dict: dict, transforms, image_shape) -> None:
        """Transform the annotations into ``dataset_dict["instances"]`` (see the class docstring for crowd)."""
        annos: List[dict] = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0) and not self.crowd_as_ignore:
                continue
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            if not self.use_keypoint:
                obj.pop("keypoints", None)
            annos.append(
                utils.transform_instance_annotations(
                    obj, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices
                )
            )
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.instance_mask_format)
        if self.crowd_as_ignore:
            instances.gt_is_crowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in annos], dtype=torch.bool)
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
