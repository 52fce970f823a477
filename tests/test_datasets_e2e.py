"""End to end: the data users bring, from the command line.

* COCO kept in the Ascend ModelZoo layout (``COCO/annotations`` + ``COCO/images/{train,val}2017``), given as
  ``DATA_PATH`` to the ModelZoo-style ``scripts/train_full_8p.sh``: trains a few iterations and evaluates.
* One's own COCO-format data registered by ``DATASETS.REGISTER_COCO``: a small 3-class dataset is generated (category ids 3, 5, 7: not 1..C), trained on for a few iterations
with the shipped quickstart config and evaluated, all from the command line with relative paths. The
bad inputs (missing file, json without categories, class-count mismatch) stop ``train_net.py`` before
any training starts, with the message naming the problem.
"""
import json
import os
import subprocess
import sys

import pytest

from fsaf_d2.engine import build_config
from helpers import REPO_ROOT, write_coco_2017, write_tiny_coco

pytestmark = pytest.mark.slow

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 5, "name": "bird"}]
TIMEOUT = 300


def test_modelzoo_layout_through_the_modelzoo_script(tmp_path):
    coco = write_coco_2017(str(tmp_path / "data" / "COCO"), "images/{split}", num_train=4, num_val=3)
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", NUM_DEVICES="1", BATCH_PER_DEVICE="4", DATA_PATH=coco, OUTPUT_DIR=str(out),
               CONFIG="configs/quickstart_R18_FPN.yaml", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("DETECTRON2_DATASETS", None)
    proc = subprocess.run(
        ["bash", "scripts/train_full_8p.sh", "DATASETS.TRAIN", "('coco_2017_train',)", "DATASETS.TEST",
         "('coco_2017_val',)", "MODEL.FSAF.NUM_CLASSES", "80", "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()",
         "SOLVER.WARMUP_ITERS", "0"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert f"Ascend ModelZoo layout, {coco}/annotations/instances_train2017.json + {coco}/images/train2017" in log
    assert "Inference on coco_2017_val: 3 images" in log
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    # the config's schedule (16 images per step) rescaled linearly to 1 device x 4 images: 4x the iterations
    # at a quarter of the learning rate
    steps = [m for m in metrics if "total_loss" in m]
    assert max(m["iteration"] for m in steps) == 3
    base_lr = build_config(os.path.join(REPO_ROOT, "configs", "quickstart_R18_FPN.yaml")).SOLVER.BASE_LR
    assert all(abs(m["lr"] - base_lr / 4) < 1e-12 for m in steps), [m["lr"] for m in steps]
    assert any("bbox/AP" in m for m in metrics)
    assert "bbox AP" in proc.stdout  # the script's closing summary


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory holding ``shapes/{train,val}.json`` and ``shapes/images`` (6 + 3 images)."""
    work = tmp_path_factory.mktemp("own_data")
    write_tiny_coco(str(work / "shapes" / "images"), str(work / "shapes" / "train.json"), 6, CATEGORIES, seed=0)
    write_tiny_coco(str(work / "shapes" / "val_images"), str(work / "shapes" / "val.json"), 3, CATEGORIES, seed=1)
    return work


def train_net(workdir, register, *opts):
    """``train_net.py`` with the quickstart config, ``register`` as ``DATASETS.REGISTER_COCO``, run in ``workdir``."""
    cmd = [
        sys.executable, os.path.join(REPO_ROOT, "train_net.py"),
        "--config-file", os.path.join(REPO_ROOT, "configs", "quickstart_R18_FPN.yaml"),
        "DATASETS.REGISTER_COCO", repr(register),
        "DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "('shapes_val',)",
        "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "0", "OUTPUT_DIR", "out", *opts,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run(cmd, cwd=str(workdir), env=env, capture_output=True, text=True, timeout=TIMEOUT)


REGISTER = [("shapes_train", "shapes/train.json", "shapes/images"), ("shapes_val", "shapes/val.json", "shapes/val_images")]


def test_train_and_evaluate_own_data(workdir):
    proc = train_net(workdir, REGISTER, "MODEL.FSAF.NUM_CLASSES", "3")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    out = workdir / "out"
    assert "Registered dataset 'shapes_train' from DATASETS.REGISTER_COCO" in log
    assert "Inference on shapes_val: 3 images" in log
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 3
    bbox = [m for m in metrics if "bbox/AP" in m][-1]
    assert {"bbox/AP-cat", "bbox/AP-bird", "bbox/AP-dog"} <= set(bbox)  # class names from the json
    assert 0 <= bbox["bbox/AP"] <= 100
    # detections are written back in the json's category ids (contiguous 0..2 mapped to 3, 5, 7)
    dets = json.load(open(out / "inference" / "coco_instances_results.json"))
    assert dets and {d["category_id"] for d in dets} <= {3, 5, 7}
    assert {d["image_id"] for d in dets} <= {1, 2, 3}
    assert os.path.isfile(out / "model_final.pth")


def _write_no_categories(workdir):
    data = json.load(open(workdir / "shapes" / "train.json"))
    del data["categories"]
    (workdir / "shapes" / "no_categories.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, register, num_classes, message",
    [
        ("missing file", [("shapes_train", "shapes/no_such.json", "shapes/images")], 3,
         "FileNotFoundError: DATASETS.REGISTER_COCO entry 'shapes_train': annotation file 'shapes/no_such.json' "
         "does not exist"),
        ("no categories", [("shapes_train", "shapes/no_categories.json", "shapes/images")], 3,
         "shapes/no_categories.json' has no 'categories'"),
        ("class-count mismatch", REGISTER, 5,
         "ValueError: MODEL.FSAF.NUM_CLASSES=5, but dataset 'shapes_train' (DATASETS.REGISTER_COCO) has 3 classes "
         "['cat', 'bird', 'dog']. Set MODEL.FSAF.NUM_CLASSES 3."),
    ],
)  # fmt: skip
def test_bad_own_data_stops_before_training(workdir, case, register, num_classes, message):
    _write_no_categories(workdir)
    proc = train_net(workdir, register, "MODEL.FSAF.NUM_CLASSES", str(num_classes), "OUTPUT_DIR", "out_bad")
    assert proc.returncode != 0, case
    assert message in proc.stderr and "DATASETS.REGISTER_COCO" in proc.stderr, proc.stderr[-3000:]
    assert not (workdir / "out_bad").exists()  # stopped in the launching process, before any worker's setup
