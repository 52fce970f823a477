"""Loader of the mmdetection parity fixtures written by ``make_fixtures.py`` (no mmdet needed)."""
import collections
import functools
import io
import lzma
import os

import torch

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
FIXTURE = os.path.join(FIXTURE_DIR, "mmdet_fsaf_r18.pt.xz")


@functools.lru_cache(maxsize=2)
def load_fixture(path=FIXTURE):
    with open(path, "rb") as f:
        data = lzma.decompress(f.read())
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def mmdet_state_dict(fixture):
    """The mmdet-named state dict the fixture was generated with (fp32 tensors, mmdet key order)."""
    weights = dict(fixture["state_dict_float"])
    for k, v in fixture["state_dict_quantised"].items():
        weights[k] = v["q"].to(torch.float32) * (2.0 ** v["exp"])
    return collections.OrderedDict((k, weights[k]) for k in fixture["state_dict_keys"])


def mmdet_checkpoint(fixture):
    """The state dict wrapped as mmdet saves checkpoints ({"meta": ..., "state_dict": ...})."""
    return {
        "meta": {"mmdet_version": fixture["versions"]["mmdet"], "CLASSES": tuple(f"class{i}" for i in range(fixture["model"]["num_classes"]))},
        "state_dict": mmdet_state_dict(fixture),
    }
