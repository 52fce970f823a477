"""The static-shape path (INPUT.FIXED_SIZES + MODEL.FSAF.MAX_GT) computes what the dynamic path computes."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import fsaf_d2
from fsaf_d2.engine.config import NPU_DEFAULT_MAX_GT, apply_static_shape_defaults, build_config
from fsaf_d2.modeling.losses import fsaf_losses
from fsaf_testing import make_input, tiny_cfg

MAX_GT = 5


def pair(fixed_sizes=((128, 128), (160, 160))):
    """A dynamic and a static model with the same weights. With the default buckets the test batch is
    padded to 128x128 in both modes: a CNN's outputs near the padded border depend on how far the batch is
    padded, so the comparison isolates what the static path changes (fixed-size ground truth, cached
    priors and masks) from that property of batch padding."""
    torch.manual_seed(0)
    dynamic = build_model(tiny_cfg())
    static = build_model(
        tiny_cfg(**{"INPUT.FIXED_SIZES": [list(s) for s in fixed_sizes], "MODEL.FSAF.MAX_GT": MAX_GT})
    )
    static.load_state_dict(dynamic.state_dict())
    return dynamic.train(), static.train()


def full_and_empty_batch():
    boxes = [[10, 10, 50, 60], [20, 20, 40, 40], [60, 5, 120, 90], [2, 2, 8, 8], [30, 50, 90, 95]]
    return [
        make_input(96, 128, boxes, [0, 0, 2, 1, 1]),  # exactly MAX_GT objects
        make_input(128, 96, [], [], seed=1),  # no object
        make_input(100, 120, [[5, 5, 60, 60]], [2], seed=2),
    ]


def test_static_losses_and_gradients_equal_dynamic():
    dynamic, static = pair()
    batch = full_and_empty_batch()
    a, b = dynamic(batch), static(batch)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=0), (k, a[k].item(), b[k].item())
    sum(a.values()).backward()
    sum(b.values()).backward()
    grads_a = dict(dynamic.named_parameters())
    for name, p in static.named_parameters():
        if p.grad is None:
            assert grads_a[name].grad is None, name
            continue
        assert torch.allclose(p.grad, grads_a[name].grad, rtol=1e-4, atol=1e-6), name


def test_static_batch_has_fixed_shapes():
    _, static = pair(fixed_sizes=((128, 160), (160, 128)))
    batch = full_and_empty_batch()
    images = static.preprocess_image(batch)
    assert tuple(images.tensor.shape[-2:]) == (128, 160)  # landscape bucket, not the 128x128 batch max
    boxes, labels, valid, ignore = static.padded_ground_truth([x["instances"] for x in batch])
    assert boxes.shape == (3, MAX_GT, 4) and valid.sum(dim=1).tolist() == [5, 0, 1] and ignore is None


def test_losses_do_not_depend_on_padding_slots():
    """Adding empty ground-truth slots changes nothing (the property the static path relies on)."""
    _, static = pair()
    batch = full_and_empty_batch()
    images = static.preprocess_image(batch)
    feats, preds = static.features_and_predictions(images.tensor)
    boxes, labels, valid, _ = static.padded_ground_truth([x["instances"] for x in batch])
    wide = [torch.cat([t, torch.zeros_like(t)], dim=1) for t in (boxes, labels, valid)]
    a = static.losses(images, feats, preds, boxes, labels, valid)
    b = static.losses(images, feats, preds, *wide)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_npu_gets_static_defaults_other_devices_do_not():
    cfg = get_cfg()
    fsaf_d2.add_fsaf_config(cfg)
    cfg.merge_from_file("configs/fsaf_R50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cuda"
    assert not apply_static_shape_defaults(cfg) and cfg.INPUT.FIXED_SIZES == [] and cfg.MODEL.FSAF.MAX_GT == 0
    cfg.MODEL.DEVICE = "npu:0"
    assert apply_static_shape_defaults(cfg)
    assert cfg.INPUT.FIXED_SIZES == [[800, 1344], [1344, 800]]
    assert cfg.MODEL.FSAF.MAX_GT == NPU_DEFAULT_MAX_GT
    cfg.INPUT.FIXED_SIZES = [[640, 640]]
    cfg.MODEL.FSAF.MAX_GT = 32
    assert not apply_static_shape_defaults(cfg) and cfg.MODEL.FSAF.MAX_GT == 32  # explicit choices win


def test_npu_without_a_size_bound_names_fixed_sizes():
    """The quickstart trains at the images' native size (MIN_SIZE_TRAIN 0): no bucket can be derived."""
    quickstart_on_npu = ["MODEL.DEVICE", "npu"]
    with pytest.raises(ValueError, match=r"MIN_SIZE_TRAIN \(0,\).*native size.*set INPUT.FIXED_SIZES"):
        build_config("configs/quickstart_R18_FPN.yaml", quickstart_on_npu)
    cfg = build_config("configs/quickstart_R18_FPN.yaml", quickstart_on_npu + ["INPUT.FIXED_SIZES", "[[128, 128]]"])
    assert cfg.INPUT.FIXED_SIZES == [[128, 128]] and cfg.MODEL.FSAF.MAX_GT == NPU_DEFAULT_MAX_GT


def test_compiled_static_loss_has_no_graph_break():
    """torch.compile traces the whole static-shape loss (assignment, selection, losses) as one graph."""
    _, static = pair()
    batch = full_and_empty_batch()
    images = static.preprocess_image(batch)
    feats = static.backbone(images.tensor)
    feats = [feats[f].detach() for f in static.head_in_features]
    logits, deltas = static._transpose_dense_predictions(static.head(feats), [static.num_classes, 4])
    logits = torch.cat(logits, 1).detach()
    deltas = torch.cat(deltas, 1).detach()
    priors, level, sizes, valid = static.prior_layout(images, feats)
    gt = static.padded_ground_truth([x["instances"] for x in batch])[:3]

    def loss_fn(logits, deltas, boxes, labels, gt_valid):
        out = fsaf_losses(logits, deltas, priors, sizes, level, valid, boxes, labels, gt_valid, box_coder=static.box_coder)
        return out["loss_fsaf_cls"] + out["loss_fsaf_reg"]

    explanation = torch._dynamo.explain(loss_fn)(logits, deltas, *gt)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(loss_fn, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(logits, deltas, *gt), loss_fn(logits, deltas, *gt), rtol=1e-6)
