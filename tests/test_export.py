"""fsaf_d2.export, tools/export.py: TorchScript (tracing, scripting) and ONNX exports give the eager detections.

Tiny random models (ResNet-18 FPN, 3 classes) on 128x160 images. The head is re-initialised with larger
weights so that the scores spread (tens of detections, no ties) instead of all sitting at the prior 0.01.
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from torch import nn

from fsaf_d2 import export
from fsaf_d2.engine.config import apply_device_rules
from tools_testing import load_tool, tool_command, tool_env

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "modeling"))
from fsaf_testing import CONFIG, tiny_cfg  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMBINED = "configs/fsaf_retinanet_R50_FPN_1x.yaml"
H, W = 128, 160
# TorchScript runs the same kernels as eager; ONNX Runtime's convolutions differ in the last bits, which the
# TBLR decoding magnifies (distances x BBOX_NORMALIZER x stride), so ONNX boxes get a pixel-sized tolerance
TOL = 1e-4
ONNX_BOX_TOL = 1e-3


def build(config_file=CONFIG, **overrides):
    torch.manual_seed(0)
    cfg = tiny_cfg(config_file, **{"MODEL.FSAF.SCORE_THRESH_TEST": 0.05, **overrides})
    apply_device_rules(cfg)  # the layout train_net.py and tools/export.py build on this device
    model = build_model(cfg).eval()
    with torch.no_grad():
        for m in model.head.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.05)
    return model


def image(seed, h=H, w=W):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 255


def eager(model, img):
    with torch.no_grad():
        return model([{"image": img}])[0]["instances"]


def as_instances(fields, img):
    return Instances(
        tuple(img.shape[-2:]),
        pred_boxes=Boxes(fields["pred_boxes"]),
        scores=fields["scores"],
        pred_classes=fields["pred_classes"],
    )


def max_diffs(ref, out):
    """(boxes, scores) max abs differences; same number of detections and same classes required."""
    assert len(ref) > 0
    assert len(out) == len(ref)
    assert torch.equal(out.pred_classes, ref.pred_classes)
    boxes = (out.pred_boxes.tensor - ref.pred_boxes.tensor).abs().max().item()
    scores = (out.scores - ref.scores).abs().max().item()
    return boxes, scores


def run_onnx(path, img):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(x) for x in session.run(None, {"image": img.numpy()})]


@pytest.fixture(scope="module")
def model():
    return build()


def test_tracing_torchscript_matches_eager(model, tmp_path):
    path, adapter, _ = export.export_tracing(model, [{"image": image(0)}], "torchscript", str(tmp_path))
    traced = torch.jit.load(path)
    for seed in (0, 1):  # the sample it was traced with, and another image of the same size
        img = image(seed)
        with torch.no_grad():
            out = adapter.outputs_schema(traced(img))[0]["instances"]
        boxes, scores = max_diffs(eager(model, img), out)
        assert boxes <= TOL and scores <= TOL, (boxes, scores)
    with pytest.raises(Exception, match="only takes images of the size"):
        traced(image(0, 96, 192))
    # data-dependent sizes stay in the graph: no candidate at all gives empty outputs, not an error
    with torch.no_grad():
        traced.model.head.cls_score.bias.fill_(-30.0)
        boxes, classes, scores, size = traced(image(1))
    assert boxes.shape == (0, 4) and len(classes) == len(scores) == 0 and size.tolist() == [H, W]
    assert not model.training


def test_scripting_matches_eager_at_any_size_and_batch(model, tmp_path):
    names = list(model.state_dict())
    path, _ = export.export_scripting(model, str(tmp_path))
    assert list(model.state_dict()) == names  # the eager model is left as it was
    scripted = torch.jit.load(path)
    batches = [[image(0)], [image(2, 96, 192)], [image(0), image(2, 96, 192)]]  # batched images are padded
    for images in batches:
        inputs = [{"image": img} for img in images]
        with torch.no_grad():
            outputs = scripted(inputs)
            references = model(inputs)
        assert set(outputs[0]) == {"pred_boxes", "scores", "pred_classes"}
        for img, fields, ref in zip(images, outputs, references):
            boxes, scores = max_diffs(ref["instances"], as_instances(fields, img))
            assert boxes <= TOL and scores <= TOL, (boxes, scores)
    assert not model.training


def test_scripting_rejects_fixed_sizes(tmp_path):
    model = build(**{"INPUT.FIXED_SIZES": [[128, 160]]})
    with pytest.raises(ValueError, match="FIXED_SIZES"):
        export.export_scripting(model, str(tmp_path))


def test_onnx_detections_match_eager(model, tmp_path):
    pytest.importorskip("onnx")
    img = image(0)
    path, adapter, _ = export.export_tracing(model, [{"image": img}], "onnx", str(tmp_path))
    assert not model.training  # torch.onnx.export restores the wrapper's mode on the whole tree
    out = adapter.outputs_schema(run_onnx(path, img))[0]["instances"]
    boxes, scores = max_diffs(eager(model, img), out)
    assert boxes <= ONNX_BOX_TOL and scores <= TOL, (boxes, scores)


def test_onnx_head_outputs_match_eager(model, tmp_path):
    pytest.importorskip("onnx")
    img = image(1)
    path, adapter, _ = export.export_tracing(model, [{"image": img}], "onnx", str(tmp_path), outputs="head")
    flat = run_onnx(path, img)
    with torch.no_grad():
        reference = adapter(img)
    assert len(flat) == len(reference) == 10  # 5 levels x (logits, distances)
    for name, r, o in zip(adapter.output_names(), reference, flat):
        assert o.shape == r.shape, name
        assert (o - r).abs().max().item() <= TOL, name
    # post-processing outside the exported model gives the eager detections
    out = export.detections_from_head_outputs(model, [x.numpy() for x in flat], (H, W))
    boxes, scores = max_diffs(eager(model, img), out)
    assert boxes <= ONNX_BOX_TOL and scores <= TOL, (boxes, scores)


def assert_traced_and_scripted_match(model, img, ref, tmp_path):
    """The traced and the scripted TorchScript exports of ``model`` give ``ref`` (eager) on ``img``."""
    path, adapter, _ = export.export_tracing(model, [{"image": img}], "torchscript", str(tmp_path / "trace"))
    with torch.no_grad():
        out = adapter.outputs_schema(torch.jit.load(path)(img))[0]["instances"]
    boxes, scores = max_diffs(ref, out)
    assert boxes <= TOL and scores <= TOL, (boxes, scores)
    path, _ = export.export_scripting(model, str(tmp_path / "script"))
    with torch.no_grad():
        fields = torch.jit.load(path)([{"image": img}])[0]
    boxes, scores = max_diffs(ref, as_instances(fields, img))
    assert boxes <= TOL and scores <= TOL, (boxes, scores)


def test_combined_model_traces_and_scripts(tmp_path):
    model = build(COMBINED)
    img = image(0)
    ref = eager(model, img)
    assert_traced_and_scripted_match(model, img, ref, tmp_path)


def test_folded_frozen_bn_model_scripts_and_exports_to_onnx(tmp_path):
    """FrozenBN (the R50 configs' norm) folded into the convolutions, channels-last (the default on cuda
    and on AVX-512 CPUs)."""
    from fsaf_d2.modeling.frozen_bn import FrozenBNFoldedConv2d

    model = build(**{"MODEL.RESNETS.NORM": "FrozenBN", "MODEL.FSAF.FOLD_FROZEN_BN": True,
                     "MODEL.FSAF.MEMORY_FORMAT": "channels_last"})
    assert any(type(m) is FrozenBNFoldedConv2d for m in model.backbone.modules())
    assert model.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last)
    img = image(0)
    ref = eager(model, img)
    path, _ = export.export_scripting(model, str(tmp_path / "script"))
    with torch.no_grad():
        fields = torch.jit.load(path)([{"image": img}])[0]
    boxes, scores = max_diffs(ref, as_instances(fields, img))
    assert boxes <= TOL and scores <= TOL, (boxes, scores)
    pytest.importorskip("onnx")
    path, adapter, _ = export.export_tracing(model, [{"image": img}], "onnx", str(tmp_path / "onnx"))
    out = adapter.outputs_schema(run_onnx(path, img))[0]["instances"]
    boxes, scores = max_diffs(ref, out)
    assert boxes <= ONNX_BOX_TOL and scores <= TOL, (boxes, scores)


def test_cli_end_to_end(tmp_path):
    cfg = tiny_cfg(**{"INPUT.MIN_SIZE_TEST": H})
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    out = tmp_path / "out"
    cmd = tool_command(
        "export", "--config-file", config, "--format", "torchscript",
        "--export-method", "tracing", "--output", out, "--input-size", H, W,
        "MODEL.FSAF.SCORE_THRESH_TEST", "0.01",
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.jit.load" in proc.stdout and f"exactly H={H}, W={W}" in proc.stdout
    info = json.loads((out / "export_info.json").read_text())
    assert info["input_size"] == [H, W] and info["output_names"] == list(export.DETECTION_OUTPUTS)
    assert info["check_against_eager"]["scores"] == 0.0 and info["check_against_eager"]["classes_equal"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boxes, classes, scores, size = torch.jit.load(str(out / "model.ts"))(image(0))
    assert boxes.shape[1] == 4 and size.tolist() == [H, W]


def test_cli_refuses_weights_of_another_class_count(tmp_path):
    """Exporting a partly random model silently would ship it: a checkpoint that does not fit is an error."""
    from detectron2.checkpoint import DetectionCheckpointer

    from fsaf_d2.engine.faults import CheckpointMismatchError

    DetectionCheckpointer(build_model(tiny_cfg()), save_dir=str(tmp_path)).save("other")
    classes = tiny_cfg().MODEL.FSAF.NUM_CLASSES + 2
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_cfg(**{"MODEL.FSAF.NUM_CLASSES": classes}).dump())
    tool = load_tool("export")
    with pytest.raises(CheckpointMismatchError, match="cls_score"):
        tool.main(["--config-file", str(config), "--output", str(tmp_path / "out"), "--input-size", str(H), str(W),
                   "MODEL.WEIGHTS", str(tmp_path / "other.pth")])


def test_cli_rejects_onnx_scripting(tmp_path):
    tool = load_tool("export")
    with pytest.raises(SystemExit):
        tool.main(["--config-file", "x.yaml", "--format", "onnx", "--export-method", "scripting", "--output", "o"])


def raw_detections(model, img):
    """forward_inference's output, before Detectron2's postprocessing drops empty boxes."""
    with torch.no_grad():
        images = model.preprocess_image([{"image": img}])
        features, predictions = model.features_and_predictions(images.tensor)
        return model.forward_inference(images, features, predictions)[0]


@pytest.mark.parametrize("rule,topk,least", [("pairs", 1000, 20), ("locations", 50, 5)])
def test_every_export_drops_empty_boxes_before_nms(tmp_path, rule, topk, least):
    """Most top-scoring boxes have zero width (left and right distances 0 after the ReLU): the eager model and
    its traced, scripted and ONNX exports all drop them before NMS (MODEL.FSAF.MIN_BOX_SIZE_TEST 0), and agree,
    under both top-k rules (with 50 locations per level, the "locations" rule cuts candidates)."""
    model = build(**{"MODEL.FSAF.TOPK_RULE": rule, "MODEL.FSAF.TOPK_CANDIDATES_TEST": topk})
    with torch.no_grad():
        model.head.bbox_pred.bias[2:].fill_(-0.6)
    img = image(0)
    ref = eager(model, img)
    assert len(ref) >= least and ref.pred_boxes.nonempty().all()
    model.test_min_box_size = -1.0  # mmdet 2.x: the empty boxes take places among the 100
    empty = (~raw_detections(model, img).pred_boxes.nonempty()).sum().item()
    model.test_min_box_size = 0.0
    assert empty >= 2 * least, empty
    assert_traced_and_scripted_match(model, img, ref, tmp_path)
    pytest.importorskip("onnx")
    path, adapter, _ = export.export_tracing(model, [{"image": img}], "onnx", str(tmp_path / "onnx"))
    out = adapter.outputs_schema(run_onnx(path, img))[0]["instances"]
    boxes, scores = max_diffs(ref, out)
    assert boxes <= ONNX_BOX_TOL and scores <= TOL, (boxes, scores)
