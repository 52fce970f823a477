"""tools/demo.py (fsaf_d2.predictor, fsaf_d2.visualization): drawing detections with a tiny random RetinaNet
(any meta-arch works), and its preprocessing."""
import os

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image

from fsaf_d2.data import QUICKSTART_CLASSES
from fsaf_d2.data.quickstart import generate_split
from fsaf_d2.engine import build_config
from fsaf_d2.predictor import Predictor
from fsaf_d2.visualization import MIN_DRAWING_SIDE, class_metadata, draw_detections
from tools_testing import load_tool

demo = load_tool("demo")

TINY_RETINANET = """
MODEL:
  META_ARCHITECTURE: "RetinaNet"
  DEVICE: "cpu"
  BACKBONE:
    NAME: "build_retinanet_resnet_fpn_backbone"
    FREEZE_AT: 0
  RESNETS:
    DEPTH: 18
    RES2_OUT_CHANNELS: 64
    NORM: "GN"
    OUT_FEATURES: ["res3", "res4", "res5"]
  FPN:
    IN_FEATURES: ["res3", "res4", "res5"]
    OUT_CHANNELS: 32
  RETINANET:
    NUM_CLASSES: 5
    NUM_CONVS: 1
    SCORE_THRESH_TEST: 0.0
  PIXEL_MEAN: [123.675, 116.28, 103.53]
  PIXEL_STD: [58.395, 57.12, 57.375]
DATASETS:
  TEST: ("fsaf_quickstart_val",)
INPUT:
  FORMAT: "RGB"
  MIN_SIZE_TEST: 160
  MAX_SIZE_TEST: 256
TEST:
  DETECTIONS_PER_IMAGE: 10
VERSION: 2
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(config file, random weights, two images) in a temporary directory."""
    tmp = tmp_path_factory.mktemp("demo")
    config_file = tmp / "tiny_retinanet.yaml"
    config_file.write_text(TINY_RETINANET)
    torch.manual_seed(0)
    cfg = build_config(str(config_file))
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp)).save("random")
    generate_split(str(tmp / "data"), "val", 2, seed=0)
    images = [str(tmp / "data" / "val" / f"00000{i}.jpg") for i in (1, 2)]
    return str(config_file), str(tmp / "random.pth"), images


def test_cli_writes_drawings(setup, tmp_path):
    config_file, weights, images = setup
    out = tmp_path / "out"
    written = demo.main(
        ["--config-file", config_file, "--input", *images, "--output", str(out), "--confidence-threshold", "0.0",
         "MODEL.WEIGHTS", weights]
    )  # fmt: skip
    assert written == [str(out / "000001.jpg"), str(out / "000002.jpg")]
    for src, dst in zip(images, written):
        with Image.open(src) as a, Image.open(dst) as b:
            scale = max(1.0, MIN_DRAWING_SIDE / max(a.size))
            assert all(abs(n - o * scale) <= 1 for n, o in zip(b.size, a.size)) and max(b.size) == 512


def test_threshold_controls_what_is_drawn(setup, tmp_path):
    config_file, weights, images = setup
    cfg = build_config(config_file, ["MODEL.WEIGHTS", weights])
    model = Predictor(cfg).model
    model.train()
    (none,) = draw_detections(cfg, model, images[:1], str(tmp_path / "none"), threshold=1.01)
    (all_,) = draw_detections(cfg, model, images[:1], str(tmp_path / "all"), threshold=0.0)
    assert model.training  # restored
    plain = np.asarray(Image.open(images[0]).convert("RGB").resize(Image.open(none).size), dtype=np.float64)
    drawn_none = np.asarray(Image.open(none), dtype=np.float64)
    drawn_all = np.asarray(Image.open(all_), dtype=np.float64)
    # nothing drawn: the upscaled input (up to resampling and JPEG); boxes drawn: clearly different
    assert np.abs(drawn_none - plain).mean() < np.abs(drawn_all - plain).mean() / 2


def test_directory_and_glob_inputs_and_overrides_after_input(setup, tmp_path):
    config_file, weights, images = setup
    image_dir = os.path.dirname(images[0])
    args = demo.parse_args(
        ["--config-file", config_file, "--output", str(tmp_path), "--input", image_dir, "MODEL.WEIGHTS", weights]
    )
    assert args.input == [image_dir] and args.opts == ["MODEL.WEIGHTS", weights]
    assert demo.collect_images([image_dir, os.path.join(image_dir, "*.jpg"), images[0]]) == images
    with pytest.raises(FileNotFoundError, match="no_such"):
        demo.collect_images([str(tmp_path / "no_such.jpg")])


def test_missing_weights_name_the_key(setup):
    cfg = build_config(setup[0], ["MODEL.WEIGHTS", "/nonexistent/model.pth"])
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS"):
        Predictor(cfg)


def test_weights_of_another_class_count_are_an_error_not_a_partly_random_model(setup):
    """A checkpoint that does not fit the config stops the demo, naming the key, as training does."""
    from fsaf_d2.engine.faults import CheckpointMismatchError

    config_file, weights, _ = setup
    cfg = build_config(config_file, ["MODEL.RETINANET.NUM_CLASSES", 7, "MODEL.WEIGHTS", weights])
    with pytest.raises(CheckpointMismatchError, match="cls_score"):
        Predictor(cfg)
    Predictor(build_config(config_file, ["MODEL.RETINANET.NUM_CLASSES", 7, "MODEL.WEIGHTS", weights,
                                         "MODEL.WEIGHTS_STRICT", False]))  # the documented way out


def test_class_names_from_test_dataset(setup):
    cfg = build_config(setup[0])
    assert class_metadata(cfg).thing_classes == list(QUICKSTART_CLASSES)
    cfg = build_config(setup[0], ["DATASETS.TEST", "('not_registered',)"])
    assert class_metadata(cfg).get("thing_classes", None) is None


class _Recorder(torch.nn.Module):
    """Stand-in model: records its input and returns one fixed detection."""

    def forward(self, batched_inputs):
        self.inputs = batched_inputs
        inst = Instances((batched_inputs[0]["height"], batched_inputs[0]["width"]))
        inst.pred_boxes = Boxes(torch.tensor([[2.0, 2.0, 20.0, 20.0]]))
        inst.scores = torch.tensor([0.9])
        inst.pred_classes = torch.tensor([3])
        return [{"instances": inst}]


@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_predictor_input_format_and_resize(setup, fmt):
    cfg = build_config(setup[0], ["INPUT.FORMAT", fmt, "INPUT.MIN_SIZE_TEST", "320", "INPUT.MAX_SIZE_TEST", "1000"])
    image = np.zeros((100, 80, 3), dtype=np.uint8)
    image[..., 0] = 200  # red
    model = _Recorder()
    out = Predictor(cfg, model)(image)
    x = model.inputs[0]
    assert (x["height"], x["width"]) == (100, 80) and x["image"].shape == (3, 400, 320)
    red_channel = 0 if fmt == "RGB" else 2
    assert int(x["image"][red_channel].float().mean()) == 200 and int(x["image"].sum(0).float().mean()) == 200
    assert len(out) == 1 and out.pred_classes.tolist() == [3]
