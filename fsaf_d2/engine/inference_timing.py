"""Inference throughput of an evaluation run, separated from the evaluator's ``evaluate()`` time.

``inference_on_dataset`` calls ``evaluator.reset()`` once before the first batch and ``evaluate()`` once after
the last (after the device was synchronized), so a thin evaluator wrapper sees both ends of the inference.
"""
import time

from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.utils import comm

from .device import is_accelerator, synchronize

__all__ = ["TimedEvaluator", "inference_callbacks"]


def inference_callbacks(device_type: str):
    """``inference_on_dataset``'s callbacks for ``device_type``: on accelerators the device is synchronised
    after the last batch, so that the inference time holds the queued work; None on the CPU."""
    return {"after_inference": lambda: synchronize(device_type)} if is_accelerator(device_type) else None


class TimedEvaluator(DatasetEvaluator):
    """Delegates to ``evaluator`` and records the inference and evaluation wall times.

    After ``evaluate()``: ``num_images`` (all processes), ``inference_seconds`` (the slowest process, from
    ``reset()`` to ``evaluate()``) and ``evaluate_seconds`` (this process's ``evaluator.evaluate()``).
    ``evaluate()`` gathers from all processes, as ``inference_on_dataset`` calls it on every one.
    ``evaluator`` may also be a list of evaluators or None, as ``inference_on_dataset`` accepts.
    """

    def __init__(self, evaluator):
        if evaluator is None:
            evaluator = DatasetEvaluators([])
        elif isinstance(evaluator, (list, tuple)):
            evaluator = DatasetEvaluators(list(evaluator))
        self.evaluator = evaluator
        self.num_images = 0
        self.inference_seconds = 0.0
        self.evaluate_seconds = 0.0
        self._count = 0
        self._start = None

    def reset(self):
        self.evaluator.reset()
        self._count = 0
        self._start = time.perf_counter()

    def process(self, inputs, outputs):
        self._count += len(inputs)
        self.evaluator.process(inputs, outputs)

    def evaluate(self):
        elapsed = time.perf_counter() - self._start
        per_process = comm.all_gather((self._count, elapsed))
        self.num_images = sum(count for count, _ in per_process)
        self.inference_seconds = max(seconds for _, seconds in per_process)
        start = time.perf_counter()
        results = self.evaluator.evaluate()
        self.evaluate_seconds = time.perf_counter() - start
        return results

    @property
    def images_per_second(self) -> float:
        """Inference images/s of all devices (nan before ``evaluate()``)."""
        return self.num_images / self.inference_seconds if self.inference_seconds > 0 else float("nan")

    def summary(self, dataset_name: str) -> str:
        """One log line: images, inference seconds, images/s of all devices, evaluate() seconds."""
        rate = self.images_per_second
        return (
            f"Inference on {dataset_name}: {self.num_images} images in {self.inference_seconds:.2f} s, "
            f"{rate:.2f} images/s (all devices); evaluation (evaluate()) {self.evaluate_seconds:.2f} s"
        )
