"""Helpers of the data tests (imported by the test modules; fixtures live in conftest.py)."""
import logging
import os

from helpers import make_cfg


def loader_cfg(train=("fsaf_quickstart_train",), test=("fsaf_quickstart_val",), **overrides):
    """A CPU config with fsaf_d2's keys and small inputs for the loaders; ``overrides`` as {"A.B": value}."""
    opts = [
        "DATASETS.TRAIN", tuple(train),
        "DATASETS.TEST", tuple(test),
        "MODEL.DEVICE", "cpu",
        "MODEL.FSAF.NUM_CLASSES", 5,
        "INPUT.MIN_SIZE_TRAIN", (160,),
        "INPUT.MAX_SIZE_TRAIN", 256,
        "INPUT.MIN_SIZE_TEST", 160,
        "INPUT.MAX_SIZE_TEST", 256,
        "INPUT.FORMAT", "RGB",
        "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.IMS_PER_BATCH", 2,
        "SEED", 7,
    ]
    return make_cfg(opts=opts, **overrides)


def image_path(root, split="train", index=1):
    return os.path.join(root, split, f"{index:06d}.jpg")


class capture_logs:
    """Collect the messages of one logger (works even if a parent logger does not propagate)."""

    def __init__(self, name, level=logging.INFO):
        self.logger = logging.getLogger(name)
        self.level = level
        self.messages = []

    def __enter__(self):
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                outer.messages.append(record.getMessage())

        self.handler = _Handler(self.level)
        self.old_level = self.logger.level
        self.logger.setLevel(min(self.level, self.logger.level or self.level))
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.old_level)

    @property
    def text(self):
        return "\n".join(self.messages)
