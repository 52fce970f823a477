"""Inference: candidate rules, box filters, class-aware NMS, and the batched post-processing of
``FSAF.forward_inference`` against the per-image, per-level loop it replaced."""
import math

import pytest
import torch
from detectron2.layers import batched_nms
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch.profiler import ProfilerActivity, profile

from fsaf_d2.modeling.box_coder import tblr_decode
from fsaf_d2.modeling.inference import (
    class_aware_nms,
    clip_boxes,
    detections_per_image,
    multi_level_candidates,
    topk_candidates,
    usable_boxes,
)
from fsaf_testing import tiny_cfg

H, W = 64, 96  # a multiple of the coarsest stride (128 after padding to 32): every level has whole cells
# aten ops that wait for the device when the tensors live on an accelerator
SYNCING_OPS = ("aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::masked_select", "aten::_unique2",
               "aten::unique_dim", "aten::unique_consecutive", "aten::nonzero_static")


def as_logits(scores):
    """(R, C) probabilities -> (1, R, C) logits."""
    return torch.tensor(scores).logit().unsqueeze(0)


def test_threshold_then_topk_pairs():
    scores = [[0.9, 0.04, 0.5], [0.06, 0.7, 0.01], [0.3, 0.2, 0.05]]
    s, loc, cls, ok = topk_candidates(as_logits(scores), 0.05, topk=4, rule="pairs")
    assert s[0].tolist() == pytest.approx([0.9, 0.7, 0.5, 0.3]) and ok.all()
    assert loc[0].tolist() == [0, 1, 0, 2] and cls[0].tolist() == [0, 1, 2, 0]
    s, _, _, ok = topk_candidates(as_logits(scores), 0.05, topk=100, rule="pairs")
    assert s.shape == (1, 9) and int(ok.sum()) == 6  # 0.05 itself is not > 0.05


def test_locations_rule_takes_topk_locations_first():
    scores = [[0.9, 0.8], [0.3, 0.2], [0.85, 0.01]]
    s, loc, cls, ok = topk_candidates(as_logits(scores), 0.05, topk=2, rule="locations")
    # best locations by max score: 0 (0.9) and 2 (0.85); both classes of location 0 survive
    kept = sorted(zip(s[ok].tolist(), loc[ok].tolist(), cls[ok].tolist()), reverse=True)
    assert [k[1:] for k in kept] == [(0, 0), (2, 0), (0, 1)]
    assert [k[0] for k in kept] == pytest.approx([0.9, 0.85, 0.8])


def test_candidates_of_all_levels_index_the_concatenated_locations():
    levels = [torch.full((2, 6, 3), -9.0), torch.full((2, 4, 3), -9.0)]
    levels[1][1, 2, 1] = 3.0  # image 1, location 2 of level 1, class 1
    s, loc, cls, ok = multi_level_candidates(levels, 0.05, topk=5)
    assert s.shape == (2, 10)  # min(5, 18) + min(5, 12) slots per image, whatever the data
    assert ok[0].sum() == 0 and ok[1].sum() == 1
    assert loc[1][ok[1]].tolist() == [6 + 2] and cls[1][ok[1]].tolist() == [1]


def test_decode_clips_to_image():
    priors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [92.0, 60.0, 100.0, 68.0]])
    deltas = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 1.0, 1.0, 1.0]])
    boxes = tblr_decode(deltas, priors, 4.0, (64, 100))
    assert boxes.tolist() == [[0.0, 0.0, 12.0, 12.0], [64.0, 32.0, 100.0, 64.0]]
    batched = clip_boxes(tblr_decode(deltas, priors, 4.0).unsqueeze(0), torch.tensor([[64, 100]]))
    assert batched[0].tolist() == boxes.tolist()


def test_clipping_keeps_non_finite_coordinates_non_finite():
    boxes = torch.tensor([[[-math.inf, 2.0, math.inf, 5.0], [math.nan, 1.0, 3.0, 4.0], [1.0, 1.0, 3.0, 4.0]]])
    clipped = clip_boxes(boxes, torch.tensor([[10, 10]]))
    assert not torch.isfinite(clipped[0, 0, 0]) and not torch.isfinite(clipped[0, 0, 2])
    assert usable_boxes(clipped, 0.0).tolist() == [[False, False, True]]


def test_usable_boxes_min_size_rule():
    boxes = torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.5, 3.0]])
    assert usable_boxes(boxes, 0.0).tolist() == [False, False, True, True]  # mmdet 3.x: w > 0 and h > 0
    assert usable_boxes(boxes, 1.0).tolist() == [False, False, True, False]
    assert usable_boxes(boxes, -1.0).tolist() == [True, True, True, True]  # mmdet 2.x: no filter


def test_class_aware_nms_and_max_detections():
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 9.5], [0, 0, 10, 10], [50, 50, 60, 60.0]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    classes = torch.tensor([[0, 0, 1, 0]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    (b, s, c), = detections_per_image(boxes, scores, classes, valid, 0.5, 100)
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6]) and c.tolist() == [0, 1, 0]  # same-class duplicate gone
    (_, s, _), = detections_per_image(boxes, scores, classes, valid, 0.5, 2)
    assert s.tolist() == pytest.approx([0.9, 0.7])
    valid[0, 0] = False  # an invalid candidate neither suppresses nor survives
    (_, s, _), = detections_per_image(boxes, scores, classes, valid, 0.5, 100)
    assert s.tolist() == pytest.approx([0.8, 0.7, 0.6])
    assert class_aware_nms(boxes[0, :0], scores[0, :0], classes[0, :0], 0.5).numel() == 0


def test_images_of_a_batch_do_not_suppress_each_other():
    boxes = torch.tensor([[0, 0, 10, 10.0]]).expand(3, 1, 4)
    scores = torch.tensor([[0.9], [0.8], [0.7]])
    out = detections_per_image(boxes, scores, torch.zeros(3, 1, dtype=torch.long), scores > 0.75, 0.5, 100)
    assert [len(s) for _, s, _ in out] == [1, 1, 0]


# ------------------------------------------------------------------ the model's batched post-processing
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()


def head_outputs(model, num_images, seed, cls_bias=-2.0, image_sizes=None, dtype=torch.float32):
    """Random (features, predictions) of the tiny model's levels for images of H x W."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(math.ceil(H / s), math.ceil(W / s)) for s in model.strides]
    logits = [torch.randn(num_images, model.num_classes, h, w, generator=g) * 2 + cls_bias for h, w in shapes]
    deltas = [torch.rand(num_images, 4, h, w, generator=g) * 0.5 + 0.05 for h, w in shapes]
    features = [torch.zeros(num_images, 1, h, w) for h, w in shapes]
    images = ImageList(torch.zeros(num_images, 3, H, W), image_sizes or [(H, W)] * num_images)
    return images, features, [[x.to(dtype) for x in logits], [x.to(dtype) for x in deltas]]


def reference_detections(model, images, features, predictions):
    """The per-image, per-level loop that forward_inference ran before it was batched (nonzero per level and
    image, Detectron2's batched_nms per image), kept as the reference of the batched code."""
    logits, deltas = model._transpose_dense_predictions(predictions, [model.num_classes, 4])
    priors = model.priors.level_priors([tuple(f.shape[-2:]) for f in features], torch.device("cpu"))
    out = []
    for i, image_size in enumerate(images.image_sizes):
        boxes, scores, classes = [], [], []
        for lvl_logits, lvl_deltas, lvl_priors in zip(logits, deltas, priors):
            p = lvl_logits[i].float().sigmoid()
            if model.test_topk_rule == "locations":
                loc = p.max(dim=1)[0].topk(min(p.shape[0], model.test_topk_candidates))[1]
                flat = (p[loc] > model.test_score_thresh).flatten().nonzero().squeeze(1)
                s, loc, cls = p[loc].flatten()[flat], loc[flat // p.shape[1]], flat % p.shape[1]
            else:
                keep = (p.flatten() > model.test_score_thresh).nonzero().squeeze(1)
                s, order = p.flatten()[keep].topk(min(len(keep), model.test_topk_candidates))
                loc, cls = keep[order] // p.shape[1], keep[order] % p.shape[1]
            boxes.append(tblr_decode(lvl_deltas[i][loc].float(), lvl_priors[loc], model.box_normalizer, image_size))
            scores.append(s)
            classes.append(cls)
        boxes, scores, classes = torch.cat(boxes), torch.cat(scores), torch.cat(classes)
        keep = batched_nms(boxes, scores, classes, model.test_nms_thresh)[: model.max_detections_per_image]
        out.append((boxes[keep], scores[keep], classes[keep]))
    return out


def assert_same(results, reference):
    assert len(results) == len(reference)
    for r, (boxes, scores, classes) in zip(results, reference):
        assert len(r) == len(scores)
        assert torch.equal(r.pred_classes, classes)
        torch.testing.assert_close(r.scores, scores, rtol=0, atol=1e-6)
        torch.testing.assert_close(r.pred_boxes.tensor, boxes, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rule", ["pairs", "locations"])
@pytest.mark.parametrize("num_images,cls_bias,topk", [(1, -2.0, 1000), (3, -2.0, 1000), (2, 0.0, 20), (2, -6.0, 1000)])
def test_batched_inference_equals_the_per_image_loop(model, rule, num_images, cls_bias, topk):
    """No empty boxes here (positive distances, images as large as the batch): the old loop's output."""
    images, features, predictions = head_outputs(model, num_images, seed=num_images, cls_bias=cls_bias)
    model.test_topk_rule, model.test_topk_candidates = rule, topk
    try:
        with torch.no_grad():
            results = model.forward_inference(images, features, predictions)
        reference = reference_detections(model, images, features, predictions)
    finally:
        model.test_topk_rule, model.test_topk_candidates = "pairs", 1000
    assert_same(results, reference)
    if cls_bias == -2.0:
        assert all(len(r) == model.max_detections_per_image for r in results)  # the cap is exercised
    if cls_bias == -6.0:
        assert any(0 < len(r) < model.max_detections_per_image for r in results)


def test_empty_boxes_are_dropped_before_nms(model):
    """The highest-scoring candidates have zero width: mmdet 3.x (MIN_BOX_SIZE_TEST 0) drops them before NMS,
    so 100 real detections remain; without the filter (-1, mmdet 2.x) they take places among the 100."""
    images, features, (logits, deltas) = head_outputs(model, 2, seed=5)
    logits[0][:, :, :4] += 8.0  # top rows of the finest level: the best scores...
    deltas[0][:, 2:4, :4] = 0.0  # ...with zero left and right distances
    with torch.no_grad():
        filtered = model.forward_inference(images, features, [logits, deltas])
        model.test_min_box_size = -1.0
        try:
            unfiltered = model.forward_inference(images, features, [logits, deltas])
        finally:
            model.test_min_box_size = 0.0
    for f, u in zip(filtered, unfiltered):
        assert len(f) == len(u) == model.max_detections_per_image
        assert f.pred_boxes.nonempty().all()
        empty = int((~u.pred_boxes.nonempty()).sum())
        assert empty >= 20
        # the non-empty detections of the 2.x rule are the first of the 3.x rule's
        kept = u[u.pred_boxes.nonempty()]
        torch.testing.assert_close(f.scores[: len(kept)], kept.scores)


def test_inf_nan_head_outputs_give_no_finite_detections(model):
    """Detectron2's ``test_inf_nan_data`` for RetinaNet, on FSAF: any box that comes out is non-finite."""
    for value in (math.inf, math.nan):
        images, features, (logits, deltas) = head_outputs(model, 1, seed=0)
        logits = [torch.full_like(x, value) for x in logits]
        deltas = [torch.full_like(x, value) for x in deltas]
        with torch.no_grad():
            det = model.forward_inference(images, features, [logits, deltas])[0]
        if len(det):
            assert torch.isfinite(det.pred_boxes.tensor).sum() == 0
    # partly non-finite: confident candidates (score 1.0) with inf distances, inf logits with finite distances
    images, features, (logits, deltas) = head_outputs(model, 1, seed=1)
    logits[0][:, :, :2] = 20.0
    deltas[0][:, :, :2] = math.inf
    logits[1][:, :, :1] = math.inf
    with torch.no_grad():
        det = model.forward_inference(images, features, [logits, deltas])[0]
    # the finite candidates still come out; none of the non-finite ones (the only ones scoring ~1.0) does
    assert len(det) == model.max_detections_per_image and torch.isfinite(det.pred_boxes.tensor).all()
    assert (det.scores < 0.999).all()


def test_fp16_head_outputs_give_float32_detections(model):
    images, features, predictions = head_outputs(model, 2, seed=3, dtype=torch.float16)
    with torch.no_grad():
        results = model.forward_inference(images, features, predictions)
        reference = model.forward_inference(images, features, [[x.float() for x in p] for p in predictions])
    for r in results:
        assert r.scores.dtype == torch.float32 and r.pred_boxes.tensor.dtype == torch.float32
    assert_same(results, [(r.pred_boxes.tensor, r.scores, r.pred_classes) for r in reference])


def test_one_host_sync_per_batch(model):
    """The profiler sees one host sync (the valid counts) for a batch of 4 with thousands of candidates, and
    none of the ops that wait for an accelerator (nonzero, item, masked_select, unique)."""
    images, features, predictions = head_outputs(model, 4, seed=4, cls_bias=-1.0)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        results = model.forward_inference(images, features, predictions)
    names = [e.name for e in prof.events()]
    assert names.count("fsaf::host_sync") == 1
    assert not [n for n in names if n in SYNCING_OPS], sorted(set(n for n in names if n in SYNCING_OPS))
    assert all(len(r) == model.max_detections_per_image for r in results)
