"""Shared helpers of the modeling tests: a tiny FSAF config and synthetic inputs."""

from helpers import make_cfg

from fsaf_d2.benchmarking import TINY_MODEL_OPTS, training_input

CONFIG = "configs/fsaf_R50_FPN_1x.yaml"


def tiny_cfg(config_file=CONFIG, **overrides):
    """``config_file`` with :data:`TINY_MODEL_OPTS`, then ``overrides`` ({"A.B": value})."""
    return make_cfg(config_file, TINY_MODEL_OPTS, **overrides)


def make_input(h, w, boxes, classes, seed=0, height=None, width=None):
    """:func:`fsaf_d2.benchmarking.training_input`, with "height" / "width" (the size to rescale
    detections to) optionally other than the image's."""
    x = training_input(h, w, boxes, classes, seed)
    return dict(x, height=height or h, width=width or w)
