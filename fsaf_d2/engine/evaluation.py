"""COCO box AP computed by a chosen COCOeval implementation (``TEST.COCO_EVAL_BACKEND``).

Detectron2's fast ``COCOeval_opt`` needs its compiled ``_C``, which the PyPI Detectron2 lacks, so its
``COCOEvaluator`` falls back to pycocotools' pure-Python ``COCOeval``. faster-coco-eval's ``COCOeval_faster``
runs the same evaluation in C++ on the same pycocotools ``COCO`` objects and gives the same 12 ``stats`` in
the same order (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) and the same
``eval["precision"]`` array; tests/engine/test_evaluation.py checks the agreement, docs/benchmarks.md the speed.

Backends: "faster_coco_eval", "pycocotools", and "auto" = faster_coco_eval when importable, else pycocotools.
"""
import contextlib
import functools
import importlib
import logging
import time
from importlib import metadata

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation import coco_evaluation as d2_coco_evaluation

from ..config import check_choice

__all__ = [
    "FASTER_COCO_EVAL_HINT",
    "faster_coco_eval_available",
    "resolve_coco_eval_backend",
    "backend_description",
    "build_cocoeval",
    "BackendCOCOEvaluator",
]

logger = logging.getLogger(__name__)

FASTER_COCO_EVAL_HINT = "pip install faster-coco-eval"


def _import_faster_coco_eval():
    return importlib.import_module("faster_coco_eval")


def faster_coco_eval_available() -> bool:
    """Whether ``faster_coco_eval`` imports (its C++ extension included)."""
    try:
        _import_faster_coco_eval()
    except ImportError:
        return False
    return True


def resolve_coco_eval_backend(choice: str, key: str = "TEST.COCO_EVAL_BACKEND") -> str:
    """``TEST.COCO_EVAL_BACKEND`` -> "faster_coco_eval" or "pycocotools" (``key``: the spelling errors name).

    "faster_coco_eval" when the package is missing raises an ``ImportError`` naming the install command.
    """
    check_choice("TEST.COCO_EVAL_BACKEND", choice, key)
    if choice == "auto":
        return "faster_coco_eval" if faster_coco_eval_available() else "pycocotools"
    if choice == "faster_coco_eval" and not faster_coco_eval_available():
        raise ImportError(
            f"{key}='faster_coco_eval' but the package faster_coco_eval does not import; "
            f"install it ({FASTER_COCO_EVAL_HINT}) or use 'auto' / 'pycocotools'"
        )
    return choice


def backend_description(backend: str) -> str:
    """``backend`` as its distribution name and version, e.g. "faster-coco-eval 1.8.0"."""
    dist = {"faster_coco_eval": "faster-coco-eval", "pycocotools": "pycocotools"}[backend]
    try:
        return f"{dist} {metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        return dist


def build_cocoeval(backend: str, coco_gt, coco_dt, iou_type: str = "bbox"):
    """A COCOeval of ``backend`` on pycocotools ``COCO`` objects (ground truth, ``coco_gt.loadRes`` results).

    faster-coco-eval's progress lines go to this module's logger at DEBUG level; pycocotools prints its own.
    """
    if backend == "pycocotools":
        from pycocotools.cocoeval import COCOeval

        return COCOeval(coco_gt, coco_dt, iou_type)
    if backend != "faster_coco_eval":
        raise ValueError(f"unknown COCO evaluation backend {backend!r}")
    cocoeval = _import_faster_coco_eval().COCOeval_faster
    return cocoeval(coco_gt, coco_dt, iou_type, print_function=logger.debug)


@contextlib.contextmanager
def _detectron2_cocoeval(factory):
    """Within the block, Detectron2's COCO evaluation builds its COCOeval (also the custom-maxDets one)
    with ``factory(coco_gt, coco_dt, iou_type)``. Module-level, so not for concurrent evaluations."""
    saved = d2_coco_evaluation.COCOeval_opt, d2_coco_evaluation.COCOevalMaxDets
    d2_coco_evaluation.COCOeval_opt = d2_coco_evaluation.COCOevalMaxDets = factory
    try:
        yield
    finally:
        d2_coco_evaluation.COCOeval_opt, d2_coco_evaluation.COCOevalMaxDets = saved


class BackendCOCOEvaluator(COCOEvaluator):
    """Detectron2's ``COCOEvaluator`` with its COCOeval from ``backend`` (see :func:`resolve_coco_eval_backend`).

    Args:
        dataset_name, kwargs: as ``COCOEvaluator`` (``use_fast_impl`` is replaced by ``backend``).
        backend: "auto", "faster_coco_eval" or "pycocotools"; resolved (and checked) here. With
            ``max_dets_per_image`` < 10 the evaluation is pycocotools' (faster-coco-eval sorts maxDets).
    """

    def __init__(self, dataset_name, *args, backend: str = "auto", **kwargs):
        kwargs.pop("use_fast_impl", None)
        self.backend = resolve_coco_eval_backend(backend)
        super().__init__(dataset_name, *args, use_fast_impl=False, **kwargs)
        if self.backend == "faster_coco_eval" and self._max_dets_per_image[2] < self._max_dets_per_image[1]:
            # COCOeval_faster sorts maxDets and reports AP at the largest; Detectron2's [1, 10, N] then differs
            logger.warning(f"max_dets_per_image {self._max_dets_per_image[2]} < 10: COCO AP by pycocotools")
            self.backend = "pycocotools"

    def _eval_predictions(self, predictions, img_ids=None):
        start = time.perf_counter()
        if self.backend == "pycocotools":
            super()._eval_predictions(predictions, img_ids=img_ids)
        else:
            # Detectron2 picks COCOeval_opt when _use_fast_impl: point that name at faster-coco-eval
            self._use_fast_impl = True
            try:
                with _detectron2_cocoeval(functools.partial(build_cocoeval, self.backend)):
                    super()._eval_predictions(predictions, img_ids=img_ids)
            finally:
                self._use_fast_impl = False
        elapsed = time.perf_counter() - start
        logger.info(f"COCO evaluation by {backend_description(self.backend)}: {elapsed:.2f} s")
