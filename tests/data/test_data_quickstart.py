"""Quickstart dataset: generator determinism and COCO validity, registration, ensure_quickstart, loading."""
import filecmp
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image

import fsaf_d2.data as fdata
from fsaf_d2.data import datasets as qs_datasets
from fsaf_d2.data import quickstart as qs
from fsaf_d2.data import shapes


def _all_files(root):
    out = []
    for d, _, files in os.walk(root):
        out.extend(os.path.relpath(os.path.join(d, f), root) for f in files)
    return sorted(out)


def test_same_seed_gives_identical_bytes(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    for root, seed in ((a, 3), (b, 3), (c, 4)):
        qs.generate_quickstart(root, num_train=5, num_val=3, seed=seed, show_progress=False)
    files = _all_files(a)
    assert files == _all_files(b)
    assert "annotations/instances_train.json" in files and "val/000003.jpg" in files
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []
    # another seed: other images and annotations
    _, mismatch, _ = filecmp.cmpfiles(a, c, ["train/000001.jpg", "annotations/instances_train.json"], shallow=False)
    assert len(mismatch) == 2


def test_image_does_not_depend_on_split_size(tmp_path):
    qs.generate_quickstart(str(tmp_path / "small"), 2, 1, seed=0, show_progress=False)
    qs.generate_quickstart(str(tmp_path / "big"), 4, 2, seed=0, show_progress=False)
    assert filecmp.cmp(tmp_path / "small/train/000002.jpg", tmp_path / "big/train/000002.jpg", shallow=False)
    # train and val use different streams
    assert not filecmp.cmp(tmp_path / "big/train/000001.jpg", tmp_path / "big/val/000001.jpg", shallow=False)


@pytest.fixture(scope="module")
def medium_coco(tmp_path_factory):
    """80 training images, enough for size-range and overlap statistics."""
    root = str(tmp_path_factory.mktemp("medium"))
    return root, qs.generate_split(root, "train", 80, seed=1)


def test_coco_json_is_valid(medium_coco):
    root, coco = medium_coco
    with open(os.path.join(root, "annotations", "instances_train.json")) as f:
        assert json.load(f) == coco
    assert [c["name"] for c in coco["categories"]] == list(fdata.QUICKSTART_CLASSES)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    images = {img["id"]: img for img in coco["images"]}
    assert len(images) == 80
    for img in images.values():
        assert img["width"] == 128 and img["height"] == 128
        with Image.open(os.path.join(root, "train", img["file_name"])) as im:
            assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 5
        assert w >= 1 and h >= 1
        assert x >= 0 and y >= 0 and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
        # area = visible pixels: positive, at most the box (+1 px border for anti-aliasing rounding)
        assert 0 < ann["area"] <= (w + 1) * (h + 1)


def test_statistics_sizes_overlaps_classes(medium_coco):
    stats = qs.dataset_statistics(medium_coco[1])
    assert stats["images"] == 80 and stats["annotations"] > 80 * 2
    assert stats["objects_per_image"]["min"] >= 1 and stats["objects_per_image"]["max"] <= 8
    assert 10 <= stats["box_side"]["min"] < 20  # small objects (from 16 px, less where cut by the border) ...
    assert 50 < stats["box_side"]["max"] <= 64  # ... up to half the image: the strides 8-32 of P3-P5
    assert stats["overlapping_pairs"] > 10 and stats["same_class_overlapping_pairs"] > 3
    assert set(stats["per_class"]) == set(fdata.QUICKSTART_CLASSES)
    assert min(stats["per_class"].values()) > 10


def test_boxes_of_an_image_overlap_at_most_the_cap(medium_coco):
    """Objects touch and overlap, but no two boxes of an image have IoU > 0.3: NMS at 0.5 can keep both."""
    coco = medium_coco[1]
    largest = 0.0
    for img in coco["images"]:
        xywh = np.array([a["bbox"] for a in coco["annotations"] if a["image_id"] == img["id"]])
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        if len(boxes) > 1:
            largest = max(largest, np.triu(shapes._pairwise_iou(boxes), k=1).max())
    assert 0.1 < largest <= 0.3 + 0.01  # json boxes are rounded to 0.01 px


def test_objects_are_drawn_where_the_boxes_are(medium_coco):
    """The shape's pixels differ from the surrounding background: a box covers a coloured object."""
    root, coco = medium_coco
    img = coco["images"][0]
    pixels = np.asarray(Image.open(os.path.join(root, "train", img["file_name"])), dtype=np.float64)
    anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
    top = anns[-1]  # drawn last: fully visible
    x, y, w, h = (int(round(v)) for v in top["bbox"])
    inside = pixels[y + h // 2 - 1 : y + h // 2 + 2, x + w // 2 - 1 : x + w // 2 + 2].reshape(-1, 3).mean(0)
    assert np.abs(pixels.reshape(-1, 3).mean(0) - inside).sum() > 10


def test_cli_writes_layout_and_prints_stats(tmp_path, capsys):
    stats = qs.main(["--root", str(tmp_path), "--num-train", "3", "--num-val", "2", "--seed", "5", "--no-progress"])
    assert stats["train"]["images"] == 3 and stats["val"]["images"] == 2
    for rel in ("train/000003.jpg", "val/000002.jpg", "annotations/instances_train.json",
                "annotations/instances_val.json"):
        assert (tmp_path / rel).is_file(), rel
    out = capsys.readouterr().out
    assert "train: 3 images" in out and "val: 2 images" in out
    with pytest.raises(SystemExit):
        qs.main(["--root", str(tmp_path), "--num-train", "0"])


# ------------------------------------------------------------------------------------------ registration
def test_registered_names_and_metadata():
    for name, split in (("fsaf_quickstart_train", "train"), ("fsaf_quickstart_val", "val")):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.thing_classes == list(fdata.QUICKSTART_CLASSES)
        root = fdata.registered_quickstart_root()
        assert meta.json_file == os.path.join(root, "annotations", f"instances_{split}.json")
        assert meta.image_root == os.path.join(root, split)


def test_default_root_from_environment(monkeypatch):
    monkeypatch.delenv("FSAF_D2_DATASETS", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert fdata.default_quickstart_root() == os.path.join("datasets", "fsaf_quickstart")
    monkeypatch.setenv("DETECTRON2_DATASETS", "/data/d2")
    assert fdata.default_quickstart_root() == "/data/d2/fsaf_quickstart"
    monkeypatch.setenv("FSAF_D2_DATASETS", "/data/qs")
    assert fdata.default_quickstart_root() == "/data/qs"


def test_registration_is_lazy_and_missing_files_say_how_to_generate(tmp_path):
    previous = fdata.registered_quickstart_root()
    missing = str(tmp_path / "nothing_here")
    try:
        fdata.register_quickstart(missing)  # must not touch the file system
        assert not os.path.exists(missing)
        with pytest.raises(FileNotFoundError) as e:
            DatasetCatalog.get("fsaf_quickstart_train")
        msg = str(e.value)
        assert "instances_train.json" in msg and f"python -m fsaf_d2.data.quickstart --root {missing}" in msg
    finally:
        fdata.register_quickstart(previous)


def test_ensure_quickstart_generates_once_and_registers(tmp_path):
    previous = fdata.registered_quickstart_root()
    root = str(tmp_path / "qs")
    assert not qs_datasets.quickstart_exists(root)
    try:
        assert fdata.ensure_quickstart(root, num_train=3, num_val=2, show_progress=False) == root
        assert fdata.registered_quickstart_root() == root
        json_file = os.path.join(root, "annotations", "instances_train.json")
        mtime = os.stat(json_file).st_mtime_ns
        fdata.ensure_quickstart(root, num_train=3, num_val=2, show_progress=False)
        assert os.stat(json_file).st_mtime_ns == mtime  # complete: not regenerated
        assert len(DatasetCatalog.get("fsaf_quickstart_train")) == 3
        # a dataset of an older generator version is regenerated
        with open(json_file) as f:
            coco = json.load(f)
        coco["info"]["version"] = str(qs.GENERATOR_VERSION - 1)
        with open(json_file, "w") as f:
            json.dump(coco, f)
        assert not qs_datasets.quickstart_exists(root)
        fdata.ensure_quickstart(root, num_train=3, num_val=2, show_progress=False)
        assert qs_datasets.quickstart_exists(root)
    finally:
        fdata.register_quickstart(previous)


def test_loads_through_detectron2_coco_loader(registered_small_quickstart, small_quickstart):
    dicts = DatasetCatalog.get("fsaf_quickstart_train")
    assert len(dicts) == len(small_quickstart[1]["train"]["images"])
    ann = dicts[0]["annotations"][0]
    assert ann["bbox_mode"] == BoxMode.XYWH_ABS and 0 <= ann["category_id"] < 5
    assert os.path.isfile(dicts[0]["file_name"])
    assert sum(len(d["annotations"]) for d in dicts) == len(small_quickstart[1]["train"]["annotations"])
    # the plain loader without a dataset name agrees on the boxes
    root = registered_small_quickstart
    raw = load_coco_json(os.path.join(root, "annotations", "instances_val.json"), os.path.join(root, "val"))
    assert [d["file_name"] for d in raw] == [d["file_name"] for d in DatasetCatalog.get("fsaf_quickstart_val")]


def test_ensure_quickstart_waits_for_local_rank_0_on_every_rank(tmp_path, monkeypatch):
    """Ranks other than local rank 0 never generate, and every rank reaches the barrier, also when the data
    is already complete by the time it looks."""
    from detectron2.utils import comm

    previous = fdata.registered_quickstart_root()
    root = str(tmp_path / "qs")
    barriers = []
    monkeypatch.setattr(comm, "synchronize", lambda: barriers.append(qs_datasets.quickstart_exists(root)))
    try:
        monkeypatch.setattr(comm, "get_local_rank", lambda: 0)
        fdata.ensure_quickstart(root, num_train=3, num_val=2, show_progress=False)  # generates
        monkeypatch.setattr(comm, "get_local_rank", lambda: 1)
        fdata.ensure_quickstart(root, num_train=3, num_val=2, show_progress=False)  # finds it complete
        assert barriers == [True, True]
    finally:
        fdata.register_quickstart(previous)
