"""Shared fixtures of the data tests: a small generated quickstart dataset and config helpers."""
import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import fsaf_d2.data as fdata
from fsaf_d2.data.quickstart import generate_quickstart

SMALL_TRAIN, SMALL_VAL = 16, 6


@pytest.fixture(scope="session")
def small_quickstart(tmp_path_factory):
    """A 16/6-image quickstart dataset (seed 0); returns (root, {"train": coco, "val": coco})."""
    root = str(tmp_path_factory.mktemp("quickstart"))
    cocos = generate_quickstart(root, SMALL_TRAIN, SMALL_VAL, seed=0, show_progress=False)
    return root, cocos


@pytest.fixture
def registered_small_quickstart(small_quickstart):
    """Point fsaf_quickstart_train/val at the small dataset for one test, then restore the registration."""
    previous = fdata.registered_quickstart_root()
    fdata.register_quickstart(small_quickstart[0])
    yield small_quickstart[0]
    fdata.register_quickstart(previous)


@pytest.fixture
def register_dicts():
    """Register in-memory dataset dicts under a unique name; returns ``register(dicts, **metadata) -> name``."""
    names = []

    def register(dicts, **metadata):
        name = f"fsaf_test_{uuid.uuid4().hex[:8]}"
        DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
        if metadata:
            MetadataCatalog.get(name).set(**metadata)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
