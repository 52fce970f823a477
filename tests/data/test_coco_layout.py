"""``coco_2017_train`` / ``coco_2017_val`` in Detectron2's layout or the Ascend ModelZoo's, found at data-build time."""
import os

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from fsaf_d2.data import build_fsaf_test_loader, get_fsaf_train_dataset_dicts
from fsaf_d2.data.coco_layout import COCO_2017_SPLITS

from fsaf_data_helpers import loader_cfg
from helpers import write_coco_2017

LAYOUT_IMAGE_DIRS = {"modelzoo": "images/{split}", "detectron2": "{split}"}
COCO_FOLDER = {"modelzoo": "COCO", "detectron2": "coco"}
NUM_TRAIN, NUM_VAL = 4, 3


@pytest.fixture
def coco_env(tmp_path, monkeypatch):
    """An empty working directory and no COCO variables; the builtin registrations are restored afterwards."""
    saved = {n: (DatasetCatalog[n], MetadataCatalog.get(n).as_dict()) for n in COCO_2017_SPLITS}
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("DATA_PATH", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    yield monkeypatch
    for name, (loader, meta) in saved.items():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**{k: v for k, v in meta.items() if k != "name"})


def _coco_cfg():
    return loader_cfg(train=("coco_2017_train",), test=("coco_2017_val",), **{"MODEL.FSAF.NUM_CLASSES": 80})


@pytest.mark.parametrize(
    "variable, points_at, layout",
    [
        ("DATA_PATH", "coco folder", "modelzoo"),  # the ModelZoo scripts' --data_path
        ("DATA_PATH", "parent", "modelzoo"),
        ("DATA_PATH", "parent", "detectron2"),
        ("DETECTRON2_DATASETS", "parent", "modelzoo"),
        ("DETECTRON2_DATASETS", "parent", "detectron2"),  # set after import: read when the data is built
    ],
)
def test_coco_2017_found_in_either_layout(tmp_path, coco_env, variable, points_at, layout):
    coco_dir = write_coco_2017(str(tmp_path / "data" / COCO_FOLDER[layout]), LAYOUT_IMAGE_DIRS[layout], NUM_TRAIN, NUM_VAL)
    coco_env.setenv(variable, coco_dir if points_at == "coco folder" else os.path.dirname(coco_dir))

    loader = build_fsaf_test_loader(_coco_cfg(), "coco_2017_val")
    val_images = os.path.join(coco_dir, LAYOUT_IMAGE_DIRS[layout].format(split="val2017"))
    assert len(loader.dataset) == NUM_VAL
    assert {os.path.dirname(d["file_name"]) for d in loader.dataset} == {val_images}
    meta = MetadataCatalog.get("coco_2017_val")
    assert meta.json_file == os.path.join(coco_dir, "annotations", "instances_val2017.json")  # the evaluator's json
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == [c["name"] for c in COCO_CATEGORIES if c["isthing"]]  # builtin metadata kept

    dicts = get_fsaf_train_dataset_dicts(_coco_cfg())
    assert len(dicts) == NUM_TRAIN
    assert os.path.dirname(dicts[0]["file_name"]) == os.path.join(coco_dir, LAYOUT_IMAGE_DIRS[layout].format(split="train2017"))


def test_data_path_wins_over_default_folder(tmp_path, coco_env):
    """./datasets/coco exists, but the ModelZoo scripts' DATA_PATH names another copy: DATA_PATH is used."""
    write_coco_2017("datasets/coco", "{split}", NUM_TRAIN, NUM_VAL)
    zoo = write_coco_2017(str(tmp_path / "zoo" / "COCO"), "images/{split}", NUM_TRAIN, 2)
    coco_env.setenv("DATA_PATH", zoo)
    assert len(build_fsaf_test_loader(_coco_cfg(), "coco_2017_val").dataset) == 2
    coco_env.delenv("DATA_PATH")
    assert len(build_fsaf_test_loader(_coco_cfg(), "coco_2017_val").dataset) == NUM_VAL


def test_neither_layout_names_both_and_the_variables(tmp_path, coco_env):
    write_coco_2017(str(tmp_path / "elsewhere" / "COCO"), "wrong/{split}", 1, 1)  # json present, images not
    coco_env.setenv("DATA_PATH", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError) as e:
        build_fsaf_test_loader(_coco_cfg(), "coco_2017_val")
    msg = str(e.value)
    for part in (
        "coco_2017_val",
        "coco/annotations/instances_train2017.json",
        "coco/train2017/, coco/val2017/",
        "COCO/images/train2017/, COCO/images/val2017/",
        "Ascend ModelZoo",
        "$DATA_PATH",
        "$DETECTRON2_DATASETS",
        os.path.join(str(tmp_path / "elsewhere" / "COCO"), "images", "val2017"),  # a searched folder
        "DATASETS.REGISTER_COCO",
    ):
        assert part in msg, part
    with pytest.raises(FileNotFoundError, match="COCO files of dataset 'coco_2017_train' not found"):
        get_fsaf_train_dataset_dicts(_coco_cfg())
