"""Resize backends: ``INPUT.RESIZE_BACKEND`` "pil" (Detectron2's default) or "cv2".

Detectron2's :class:`ResizeTransform` resizes uint8 images with PIL, whose bilinear filter antialiases when
downscaling. mmdetection resizes with ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)``, which does not.
The output *sizes* are identical (both round ``scale * side + 0.5``); only pixel values differ. Evaluating
converted mmdetection weights with the "cv2" backend removes that source of drift (about 0.1-0.3 AP).

OpenCV is optional (``pip install opencv-python-headless``) and only needed for the "cv2" backend.
"""
from typing import List, Union

import numpy as np
from detectron2.data import transforms as T

from ..config import check_choice

__all__ = ["CV2ResizeTransform", "CV2Resize", "apply_resize_backend", "import_cv2"]

# resize augmentations whose transforms are converted; all take only the image in get_transform
_RESIZE_AUGMENTATIONS = tuple(
    getattr(T, name) for name in ("ResizeShortestEdge", "Resize", "ResizeScale", "RandomResize") if hasattr(T, name)
)


def import_cv2():
    """Import OpenCV, or fail with an error naming the config key that needs it."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            'INPUT.RESIZE_BACKEND="cv2" needs OpenCV, which is not installed: '
            "`pip install opencv-python-headless`, or use INPUT.RESIZE_BACKEND=\"pil\"."
        ) from e
    return cv2


class CV2ResizeTransform(T.ResizeTransform):
    """:class:`ResizeTransform` that resizes images with ``cv2.INTER_LINEAR`` (segmentations: nearest)."""

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        assert img.shape[:2] == (self.h, self.w), (img.shape, (self.h, self.w))
        cv2 = import_cv2()
        flag = cv2.INTER_NEAREST if interp == "nearest" else cv2.INTER_LINEAR
        out = cv2.resize(np.ascontiguousarray(img), (self.new_w, self.new_h), interpolation=flag)
        if img.ndim == 3 and out.ndim == 2:  # cv2 drops a single channel axis
            out = out[:, :, None]
        return out

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation, interp="nearest")

    def inverse(self) -> "CV2ResizeTransform":
        return CV2ResizeTransform(self.new_h, self.new_w, self.h, self.w)


def _to_cv2(tfm: Union[T.Transform, T.TransformList]):
    if isinstance(tfm, T.TransformList):
        return T.TransformList([_to_cv2(t) for t in tfm.transforms])
    if isinstance(tfm, T.ResizeTransform) and not isinstance(tfm, CV2ResizeTransform):
        return CV2ResizeTransform(tfm.h, tfm.w, tfm.new_h, tfm.new_w)
    return tfm


class CV2Resize(T.Augmentation):
    """Wrap a resize augmentation: same sampled output size, resized by :class:`CV2ResizeTransform`."""

    def __init__(self, aug: T.Augmentation):
        super().__init__()
        self.aug = aug

    def get_transform(self, image):
        return _to_cv2(self.aug.get_transform(image))

    def __repr__(self):
        return f"CV2Resize({self.aug!r})"


def apply_resize_backend(augmentations: List, backend: str) -> List:
    """Return ``augmentations`` with every resize augmentation using ``backend`` ("pil" or "cv2")."""
    if check_choice("INPUT.RESIZE_BACKEND", backend) == "pil":
        return list(augmentations)
    import_cv2()  # fail now, not in a data-loader worker
    return [
        CV2Resize(a) if isinstance(a, _RESIZE_AUGMENTATIONS) else _to_cv2(a) if isinstance(a, T.Transform) else a
        for a in augmentations
    ]
