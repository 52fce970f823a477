"""The combined model: RetinaNet anchor-based outputs + FSAF anchor-free outputs on shared towers."""
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fsaf_testing import make_input, tiny_cfg

COMBINED = "configs/fsaf_retinanet_R50_FPN_1x.yaml"


def build(**overrides):
    torch.manual_seed(0)
    return build_model(tiny_cfg(COMBINED, **overrides))


def test_combined_model_trains_and_gradients_reach_both_branches_and_towers(batch):
    model = build()
    model.train()
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_fsaf_cls", "loss_fsaf_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head = model.head
    for name in ("cls_score", "bbox_pred", "ab_cls_score", "ab_bbox_pred"):
        assert getattr(head, name).weight.grad.abs().sum() > 0, name
    assert head.cls_subnet[0].weight.grad.abs().sum() > 0
    assert head.bbox_subnet[0].weight.grad.abs().sum() > 0
    assert head.ab_cls_score.out_channels == 9 * 3


def test_af_weight_zero_gives_fsaf_outputs_no_gradient(batch):
    model = build(**{"MODEL.FSAF.AF_LOSS_WEIGHT": 0.0})
    model.train()
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    assert model.head.cls_score.weight.grad.abs().sum() == 0
    assert model.head.bbox_pred.weight.grad.abs().sum() == 0
    assert model.head.ab_cls_score.weight.grad.abs().sum() > 0


def _detect(model):
    model.eval()
    with torch.no_grad():
        return model([make_input(96, 128, [], [])])[0]["instances"]


def test_inference_keeps_detections_of_a_single_scoring_branch():
    model = build()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(-30.0)  # FSAF branch: nothing above the threshold
        model.head.ab_cls_score.bias.fill_(2.0)
    inst = _detect(model)
    assert len(inst) == 100  # only anchor-based candidates exist, NMS keeps plenty
    with torch.no_grad():
        model.head.cls_score.bias.fill_(2.0)
        model.head.ab_cls_score.bias.fill_(-30.0)  # anchor-based branch: nothing above the threshold
    inst = _detect(model)
    assert len(inst) > 0
    # FSAF-only boxes: each is the decoded TBLR box of a prior (about 2s x 2s at init)
    model.anchor_based = None
    ref = _detect(model)
    assert torch.allclose(inst.scores, ref.scores) and torch.allclose(inst.pred_boxes.tensor, ref.pred_boxes.tensor)


def test_anchor_based_candidates_outside_the_image_are_dropped_before_nms():
    """A 96x128 image in a batch padded to 192x256: the anchors of the padding are clipped to zero width or
    height, and (MODEL.FSAF.MIN_BOX_SIZE_TEST 0, as for FSAF's own boxes) never become candidates."""
    model = build().eval()
    with torch.no_grad():
        model.head.ab_cls_score.bias.fill_(2.0)
        images = model.preprocess_image([make_input(96, 128, [], []), make_input(192, 256, [], [], seed=1)])
        features, predictions = model.features_and_predictions(images.tensor)
        sizes = torch.tensor(images.image_sizes)
        boxes, scores, _, valid = model.anchor_based.candidates(features, predictions[2], predictions[3], sizes, 0.0)
        _, _, _, unfiltered = model.anchor_based.candidates(features, predictions[2], predictions[3], sizes, -1.0)
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    assert ((width > 0) & (height > 0))[valid].all()
    assert (unfiltered[0] & ~valid[0]).sum() > 100  # image 0: many empty boxes in the padding
    assert torch.equal(unfiltered[1], valid[1])  # image 1 fills the batch: nothing lies outside it
    assert (boxes[0][valid[0]][:, 2:] <= torch.tensor([128.0, 96.0])).all()


def test_crowd_boxes_are_background_for_the_anchor_based_branch(monkeypatch):
    """With CROWD_AS_IGNORE the mapper keeps crowd boxes (flagged); RetinaNet's matcher has no ignore rule, so
    its branch must not match anchors to them as objects: it trains on the other boxes only."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg("configs/fsaf_retinanet_R50_FPN_1x.yaml", **{"MODEL.FSAF.CROWD_AS_IGNORE": True}))
    model.train()
    x = make_input(96, 128, [[10, 10, 50, 60], [60, 5, 120, 90]], [0, 2])
    x["instances"].gt_is_crowd = torch.tensor([False, True])
    seen = []
    label_anchors = model.anchor_based.label_anchors

    def record(anchors, gt_instances):
        labels, boxes = label_anchors(anchors, gt_instances)
        seen.append([int((lab == c).sum()) for lab in labels for c in (0, 2)])
        return labels, boxes

    monkeypatch.setattr(model.anchor_based, "label_anchors", record)
    with EventStorage():
        losses = model([x])
    assert seen == [[seen[0][0], 0]] and seen[0][0] > 0  # anchors of the real box, none of the crowd one
    assert all(torch.isfinite(v) for v in losses.values())
