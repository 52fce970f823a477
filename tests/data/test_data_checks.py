"""Bad inputs give early, clear errors (or the documented filtering) in the loaders and the mapper."""
import os
import shutil

import pytest
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from PIL import Image
from fsaf_data_helpers import capture_logs, image_path, loader_cfg

import fsaf_d2.data as fdata
from fsaf_d2.data import (
    DatasetNotRegisteredError,
    FSAFDatasetMapper,
    ImageReadError,
    build_fsaf_test_loader,
    build_fsaf_train_loader,
    filter_training_annotations,
    get_fsaf_train_dataset_dicts,
)


# ------------------------------------------------------------------------------------------ names
def test_unregistered_name_lists_similar_names():
    cfg = loader_cfg(train=("fsaf_quickstart_trian",))
    with pytest.raises(DatasetNotRegisteredError) as e:
        build_fsaf_train_loader(cfg)
    msg = str(e.value)
    assert "'fsaf_quickstart_trian'" in msg and "DATASETS.TRAIN" in msg
    assert "fsaf_quickstart_train" in msg.split("Similar registered names:")[1]
    assert "register_coco_instances" in msg
    assert isinstance(e.value, KeyError)  # what DatasetCatalog.get raises, for existing handlers


def test_unregistered_test_name_suggests_coco_builtin():
    with pytest.raises(DatasetNotRegisteredError) as e:
        build_fsaf_test_loader(loader_cfg(), "coco_val_2017")
    assert "coco_2017_val" in str(e.value) and "DATASETS.TEST" in str(e.value)


def test_empty_train_list():
    with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
        build_fsaf_train_loader(loader_cfg(train=()))


# ------------------------------------------------------------------------------------------ files
@pytest.fixture
def coco_registration(tmp_path):
    names = []

    def register(name, json_file, image_root):
        register_coco_instances(name, {}, str(json_file), str(image_root))
        names.append(name)
        return name

    yield register
    from detectron2.data import DatasetCatalog

    for n in names:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


def test_missing_annotation_json_is_named(tmp_path, coco_registration):
    name = coco_registration("fsaf_test_missing_json", tmp_path / "no_such.json", tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        build_fsaf_train_loader(loader_cfg(train=(name,)))
    msg = str(e.value)
    assert str(tmp_path / "no_such.json") in msg and name in msg and "register_coco_instances" in msg


def test_missing_image_dir_is_named(tmp_path, small_quickstart, coco_registration):
    json_file = os.path.join(small_quickstart[0], "annotations", "instances_val.json")
    name = coco_registration("fsaf_test_missing_images", json_file, tmp_path / "no_images")
    with pytest.raises(FileNotFoundError) as e:
        build_fsaf_test_loader(loader_cfg(), name)
    assert "image directory" in str(e.value) and str(tmp_path / "no_images") in str(e.value)


def test_missing_coco_explains_layout_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Detectron2's builtin COCO paths are relative ("datasets/coco/...")
    if os.path.exists(MetadataCatalog.get("coco_2017_val").json_file):
        pytest.skip("COCO is installed where the builtin registration points")
    with pytest.raises(FileNotFoundError) as e:
        build_fsaf_test_loader(loader_cfg(), "coco_2017_val")
    msg = str(e.value)
    for part in ("instances_val2017.json", "DETECTRON2_DATASETS", "coco/", "val2017/", "train2017/"):
        assert part in msg, part


def test_missing_quickstart_says_how_to_generate(tmp_path):
    previous = fdata.registered_quickstart_root()
    try:
        fdata.register_quickstart(str(tmp_path / "qs"))
        with pytest.raises(FileNotFoundError) as e:
            build_fsaf_train_loader(loader_cfg())
        assert f"python -m fsaf_d2.data.quickstart --root {tmp_path / 'qs'}" in str(e.value)
    finally:
        fdata.register_quickstart(previous)


# ------------------------------------------------------------------------------------------ images
def _record(file_name, boxes, image_id=1, crowd=()):
    """A dataset dict whose width/height are the image's own (128 px for a damaged or missing file)."""
    try:
        with Image.open(file_name) as image:
            width, height = image.size
    except (OSError, ValueError):
        width = height = 128
    return {
        "file_name": str(file_name),
        "width": width,
        "height": height,
        "image_id": image_id,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": int(i in crowd)}
            for i, b in enumerate(boxes)
        ],
    }


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_image_is_named(tmp_path, small_quickstart, damage):
    src = image_path(small_quickstart[0])
    bad = tmp_path / "bad.jpg"
    data = open(src, "rb").read()
    if damage == "garbage":
        bad.write_bytes(b"this is not an image" * 10)
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 3])
    mapper = FSAFDatasetMapper(loader_cfg(), True)
    with pytest.raises(ImageReadError) as e:
        mapper(_record(bad, [[10, 10, 20, 20]], image_id=42))
    assert str(bad) in str(e.value) and "image_id 42" in str(e.value)


def test_unreadable_image_fails_through_the_train_loader(tmp_path, small_quickstart, register_dicts):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    name = register_dicts([_record(bad, [[10, 10, 20, 20]])], thing_classes=["a"])
    loader = build_fsaf_train_loader(loader_cfg(train=(name,), **{"MODEL.FSAF.NUM_CLASSES": 1}))
    with pytest.raises(ImageReadError, match="corrupt.jpg"):
        next(iter(loader))


# ------------------------------------------------------------------------------------------ boxes
@pytest.fixture
def mixed_records(small_quickstart):
    root = small_quickstart[0]
    return [
        _record(image_path(root, index=1), [[10, 10, 0, 20], [5, 5, 30, -3]], image_id=1),  # all degenerate
        _record(image_path(root, index=2), [[10, 10, 30, 30]], image_id=2, crowd=(0,)),  # all crowd
        _record(image_path(root, index=3), [[10, 10, 30, 30], [40, 40, 0, 0]], image_id=3),  # 1 valid
        _record(image_path(root, index=4), [], image_id=4),  # no annotations
        _record(image_path(root, index=5), [[500, 500, 20, 20]], image_id=5),  # outside the image
    ]


def test_degenerate_and_crowd_only_images_are_filtered_with_counts(mixed_records, register_dicts):
    name = register_dicts(mixed_records, thing_classes=list(fdata.QUICKSTART_CLASSES))
    with capture_logs("fsaf_d2.data.checks") as logs:
        dicts = get_fsaf_train_dataset_dicts(loader_cfg(train=(name,)))
    assert [d["image_id"] for d in dicts] == [3]
    assert dicts[0]["annotations"] == [mixed_records[2]["annotations"][0]]
    assert "Dropped 4 of 6 annotations" in logs.text
    assert "Removed 4 of 5 images" in logs.text
    assert "1 without annotations, 1 with only crowd boxes, 2 with only degenerate boxes" in logs.text
    # the loader serves only the usable image
    loader = build_fsaf_train_loader(loader_cfg(train=(name,)))
    batch = next(iter(loader))
    assert {d["image_id"] for d in batch} == {3}
    assert all(len(d["instances"]) == 1 for d in batch)


def test_without_filter_empty_images_stay_but_degenerate_boxes_go(mixed_records):
    dicts, counts = filter_training_annotations(mixed_records, filter_empty=False)
    assert [d["image_id"] for d in dicts] == [1, 2, 3, 4, 5]
    assert [len(d["annotations"]) for d in dicts] == [0, 1, 1, 0, 0]
    assert counts["degenerate"] == 4 and counts["crowd"] == 1 and counts["removed_images"] == 0
    assert len(mixed_records[0]["annotations"]) == 2  # input not modified


@pytest.mark.parametrize("kind", ["no_annotations", "only_crowd", "only_degenerate"])
def test_dataset_without_any_usable_box_is_an_error(kind, small_quickstart, register_dicts):
    root = small_quickstart[0]
    boxes, crowd = {
        "no_annotations": ([], ()),
        "only_crowd": ([[1, 1, 9, 9]], (0,)),
        "only_degenerate": ([[1, 1, 0, 9]], ()),
    }[kind]
    name = register_dicts([_record(image_path(root, index=i), boxes, image_id=i, crowd=crowd) for i in (1, 2)])
    for filter_empty in (True, False):
        cfg = loader_cfg(train=(name,), **{"DATALOADER.FILTER_EMPTY_ANNOTATIONS": filter_empty})
        with pytest.raises(ValueError, match=f"No usable box to train on in {name}: 2 images"):
            build_fsaf_train_loader(cfg)


def test_too_few_model_classes_name_the_key(registered_small_quickstart):
    cfg = loader_cfg(**{"MODEL.META_ARCHITECTURE": "FSAF", "MODEL.FSAF.NUM_CLASSES": 2})
    with pytest.raises(ValueError, match=r"MODEL.FSAF.NUM_CLASSES=2.*5 classes"):
        build_fsaf_train_loader(cfg)


def test_unsupported_sampler_names_the_key(registered_small_quickstart):
    cfg = loader_cfg(**{"DATALOADER.SAMPLER_TRAIN": "NoSuchSampler"})
    with pytest.raises(ValueError, match="DATALOADER.SAMPLER_TRAIN='NoSuchSampler'"):
        build_fsaf_train_loader(cfg)


def test_copied_dataset_with_deleted_image_fails_on_that_file(tmp_path, small_quickstart, coco_registration):
    root = tmp_path / "copy"
    shutil.copytree(small_quickstart[0], root)
    os.remove(root / "val" / "000002.jpg")
    name = coco_registration("fsaf_test_deleted_image", root / "annotations" / "instances_val.json", root / "val")
    loader = build_fsaf_test_loader(loader_cfg(), name)
    with pytest.raises(ImageReadError, match="000002.jpg"):
        for _ in loader:
            pass
