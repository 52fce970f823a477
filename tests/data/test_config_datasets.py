"""``DATASETS.REGISTER_COCO``: COCO-format datasets registered from the config, checked against it."""
import json
import os
import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from fsaf_d2.data import build_fsaf_test_loader, get_fsaf_train_dataset_dicts, register_config_datasets
from fsaf_d2.data import config_datasets
from fsaf_d2.engine import build_config

from fsaf_data_helpers import loader_cfg
from helpers import write_tiny_coco

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 5, "name": "bird"}]
CLASSES_BY_ID = ["cat", "bird", "dog"]  # ids 3, 5, 7


@pytest.fixture
def own_data(tmp_path):
    """A 3-class dataset (train: 4 images, val: 2) and unique names; unregisters them afterwards."""
    root = tmp_path / "mydata"
    train = write_tiny_coco(str(root / "images"), str(root / "train.json"), 4, CATEGORIES, seed=0)
    val = write_tiny_coco(str(root / "val_images"), str(root / "val.json"), 2, CATEGORIES, seed=1)
    tag = uuid.uuid4().hex[:6]
    data = {"train": [f"own_train_{tag}", train, str(root / "images")],
            "val": [f"own_val_{tag}", val, str(root / "val_images")], "root": root}
    yield data
    for entry in (data["train"], data["val"]):
        if entry[0] in DatasetCatalog.list():
            DatasetCatalog.remove(entry[0])
            MetadataCatalog.remove(entry[0])
        config_datasets._registered.pop(entry[0], None)


def _cfg(data, entries=None, num_classes=3):
    entries = [data["train"], data["val"]] if entries is None else entries
    return loader_cfg(train=(data["train"][0],), test=(data["val"][0],),
                      **{"DATASETS.REGISTER_COCO": entries, "MODEL.META_ARCHITECTURE": "FSAF",
                         "MODEL.FSAF.NUM_CLASSES": num_classes})


def test_registers_with_classes_from_the_json(own_data):
    cfg = _cfg(own_data)
    assert register_config_datasets(cfg) == [own_data["train"][0], own_data["val"][0]]
    meta = MetadataCatalog.get(own_data["train"][0])
    assert meta.thing_classes == CLASSES_BY_ID
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 5: 1, 7: 2}
    assert meta.json_file == os.path.abspath(own_data["train"][1]) and meta.evaluator_type == "coco"
    # the loaders register on their own (every worker) and load what Detectron2's loader reads
    dicts = get_fsaf_train_dataset_dicts(cfg)
    assert len(dicts) == 4 and {a["category_id"] for d in dicts for a in d["annotations"]} <= {0, 2}
    assert len(build_fsaf_test_loader(cfg, own_data["val"][0]).dataset) == 2
    assert MetadataCatalog.get(own_data["train"][0]).thing_classes == CLASSES_BY_ID  # unchanged by loading
    register_config_datasets(cfg)  # again: the same files are a no-op


def test_demo_class_names_come_from_the_json(own_data):
    from fsaf_d2.visualization import class_metadata

    missing = [own_data["val"][0], str(own_data["root"] / "gone.json"), own_data["val"][2]]
    assert class_metadata(_cfg(own_data, [missing])).get("thing_classes", None) is None  # ids shown, no crash
    assert class_metadata(_cfg(own_data)).thing_classes == CLASSES_BY_ID


def test_key_from_yaml_and_command_line(own_data, tmp_path):
    """The key is a list of [name, json, image folder] in a YAML file or as a ``KEY VALUE`` override."""
    yaml = tmp_path / "own.yaml"
    yaml.write_text("DATASETS:\n  REGISTER_COCO: [[%s, %s, %s]]\n" % tuple(own_data["train"]))
    assert build_config(str(yaml)).DATASETS.REGISTER_COCO == [own_data["train"]]
    cfg = build_config("", ["DATASETS.REGISTER_COCO", repr([tuple(own_data["val"])])])
    assert [list(e) for e in cfg.DATASETS.REGISTER_COCO] == [own_data["val"]]


@pytest.mark.parametrize("entries", [[["only_a_name"]], [["a", "b.json", ""]], ["a,b,c"], [[1, "b.json", "img"]]])
def test_malformed_entry_fails_when_the_config_is_built(entries):
    with pytest.raises(ValueError, match=r"DATASETS.REGISTER_COCO entry .* is not \[name, json_file, image_root\]"):
        build_config("", ["DATASETS.REGISTER_COCO", entries])


def test_duplicate_name(own_data):
    with pytest.raises(ValueError, match="names .* more than once"):
        register_config_datasets(_cfg(own_data, [own_data["train"], own_data["train"]]))


def test_missing_json_file(own_data):
    entry = [own_data["train"][0], str(own_data["root"] / "no_such.json"), own_data["train"][2]]
    with pytest.raises(FileNotFoundError) as e:
        register_config_datasets(_cfg(own_data, [entry]))
    msg = str(e.value)
    assert "DATASETS.REGISTER_COCO" in msg and own_data["train"][0] in msg and entry[1] in msg
    assert own_data["train"][0] not in DatasetCatalog.list()


def test_missing_image_folder(own_data):
    entry = [own_data["train"][0], own_data["train"][1], str(own_data["root"] / "no_images")]
    with pytest.raises(FileNotFoundError, match=r"image folder '.*no_images' does not exist"):
        register_config_datasets(_cfg(own_data, [entry]))


@pytest.mark.parametrize("content", [{"images": [], "annotations": []}, {"images": [], "categories": []}])
def test_json_without_categories(own_data, content):
    path = own_data["root"] / "no_categories.json"
    path.write_text(json.dumps(content))
    entry = [own_data["train"][0], str(path), own_data["train"][2]]
    with pytest.raises(ValueError) as e:
        register_config_datasets(_cfg(own_data, [entry]))
    assert f"'{path}' has no 'categories'" in str(e.value) and own_data["train"][0] in str(e.value)


def test_not_a_coco_json(own_data):
    path = own_data["root"] / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        register_config_datasets(_cfg(own_data, [[own_data["train"][0], str(path), own_data["train"][2]]]))


@pytest.mark.parametrize("num_classes", [2, 5])
def test_class_count_mismatch_names_both_numbers_and_the_key(own_data, num_classes):
    with pytest.raises(ValueError) as e:
        register_config_datasets(_cfg(own_data, num_classes=num_classes))
    msg = str(e.value)
    assert f"MODEL.FSAF.NUM_CLASSES={num_classes}" in msg and "has 3 classes" in msg
    assert "Set MODEL.FSAF.NUM_CLASSES 3" in msg and str(CLASSES_BY_ID) in msg
    assert own_data["train"][0] not in DatasetCatalog.list()  # nothing registered from a bad config


def test_retinanet_key_is_checked(own_data):
    cfg = _cfg(own_data)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 80
    with pytest.raises(ValueError, match="MODEL.RETINANET.NUM_CLASSES=80, .* Set MODEL.RETINANET.NUM_CLASSES 3"):
        register_config_datasets(cfg)


def test_train_and_test_sets_with_different_classes(own_data):
    other = own_data["root"] / "other.json"
    write_tiny_coco(str(own_data["root"] / "images"), str(other), 2, [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"},
                                                                    {"id": 3, "name": "van"}])
    entries = [own_data["train"], [own_data["val"][0], str(other), own_data["train"][2]]]
    with pytest.raises(ValueError, match="have different classes"):
        register_config_datasets(_cfg(own_data, entries))


def test_builtin_name_is_not_replaced(own_data):
    with pytest.raises(ValueError, match="'coco_2017_val': the name is already registered"):
        register_config_datasets(_cfg(own_data, [["coco_2017_val", *own_data["val"][1:]]]))
    assert MetadataCatalog.get("coco_2017_val").json_file != os.path.abspath(own_data["val"][1])
