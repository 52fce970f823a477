"""End-to-end behaviour of the FSAF meta-architecture (CPU, random weights)."""
import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import Instances
from torch.profiler import ProfilerActivity, profile

from fsaf_d2.modeling import FSAF
from fsaf_d2.modeling.fsaf import choose_fixed_size

from fsaf_testing import make_input, tiny_cfg

HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero")


def count_host_syncs(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in HOST_SYNC_OPS)


def build(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**overrides))
    return model


def test_registered():
    assert META_ARCH_REGISTRY.get("FSAF") is FSAF


def test_head_structure_and_init():
    model = build()
    head = model.head
    convs = [m for m in head.cls_subnet if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and len(head.bbox_subnet) == 8  # conv, relu x 4
    assert torch.allclose(head.cls_score.bias, torch.full((3,), -4.59512), atol=1e-5)
    assert torch.allclose(head.bbox_pred.bias, torch.full((4,), 0.25))
    assert abs(convs[0].weight.std().item() - 0.01) < 0.002


def test_p7_has_no_relu_by_default():
    model = build()
    top = model.backbone.top_block
    x = torch.randn(1, top.p6.in_channels, 8, 8)
    p6, p7 = top(x)
    assert torch.allclose(p7, top.p7(p6))
    top.relu_before_p7 = True
    assert not torch.allclose(top(x)[1], p7)


def test_train_step_finite_losses_and_gradients_on_every_head_parameter(batch):
    model = build()
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_fsaf_cls", "loss_fsaf_reg"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.backbone.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name


def test_train_step_batch_without_objects():
    model = build()
    model.train()
    losses = model([make_input(64, 64, [], []), make_input(64, 96, [], [], seed=2)])
    assert torch.isfinite(losses["loss_fsaf_cls"]) and losses["loss_fsaf_reg"].item() == 0


def test_batch_padding_locations_are_excluded(batch):
    model = build()
    model.train()
    images = model.preprocess_image(batch)
    feats, _ = model.features_and_predictions(images.tensor)
    _, _, sizes, valid = model.prior_layout(images, feats)
    # image 0 is 96x128 in a 128x128 batch: at stride 8 its rows 12..15 are padding
    level0 = valid[0, : sizes[0]].view(16, 16)
    assert level0[:12].all() and not level0[12:].any()
    level0_img1 = valid[1, : sizes[0]].view(16, 16)
    assert level0_img1[:, :12].all() and not level0_img1[:, 12:].any()


def test_inference_returns_instances_in_original_coordinates():
    model = build(**{"MODEL.FSAF.SCORE_THRESH_TEST": 0.0})
    model.eval()
    inputs = [make_input(64, 96, [], [], height=128, width=192)]
    with torch.no_grad():
        out = model(inputs)
    inst = out[0]["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (128, 192)
    assert 0 < len(inst) <= 100
    boxes = inst.pred_boxes.tensor
    assert boxes[:, 2].max() <= 192 and boxes[:, 3].max() <= 128 and boxes.min() >= 0
    assert boxes[:, 2].max() > 96  # scaled up from the 64x96 input
    assert inst.scores[:-1].ge(inst.scores[1:]).all()


def test_no_host_syncs_in_assignment_selection_and_losses(batch):
    model = build()
    model.train()
    images = model.preprocess_image(batch)
    feats, preds = model.features_and_predictions(images.tensor)
    gt = model.padded_ground_truth([x["instances"] for x in batch])
    assert count_host_syncs(lambda: model.losses(images, feats, preds, *gt)) == 0
    assert count_host_syncs(lambda: model.head(feats)) == 0


def test_host_sync_count_of_whole_training_step(batch):
    """The documented number: 2 scalar reads, both inside Detectron2's ImageList.from_tensors on host-side
    shape tensors (not device synchronisations); 0 with INPUT.FIXED_SIZES."""
    model = build()
    model.train()

    def step():
        losses = model(batch)
        sum(losses.values()).backward()

    assert count_host_syncs(step) == 2
    static = build(**{"INPUT.FIXED_SIZES": [[128, 128]], "MODEL.FSAF.MAX_GT": 8})
    static.train()

    def static_step():
        losses = static(batch)
        sum(losses.values()).backward()

    assert count_host_syncs(static_step) == 0


def test_static_shapes_give_the_same_losses(batch):
    dynamic = build()
    static = build(**{"INPUT.FIXED_SIZES": [[128, 128], [256, 256]], "MODEL.FSAF.MAX_GT": 8})
    static.load_state_dict(dynamic.state_dict())
    dynamic.train()
    static.train()
    a, b = dynamic(batch), static(batch)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5), k


def test_max_gt_overflow_names_the_key(batch):
    model = build(**{"MODEL.FSAF.MAX_GT": 2})
    model.train()
    with pytest.raises(ValueError, match="MODEL.FSAF.MAX_GT"):
        model(batch)
    # DenseDetector's forward_training entry point applies the same rule
    images = model.preprocess_image(batch)
    feats, preds = model.features_and_predictions(images.tensor)
    with pytest.raises(ValueError, match="MODEL.FSAF.MAX_GT"):
        model.forward_training(images, feats, preds, [x["instances"] for x in batch])


def test_fixed_size_choice():
    assert choose_fixed_size([(100, 60)], [[800, 1344], [1344, 800], [128, 128]]) == (128, 128)
    assert choose_fixed_size([(700, 1300)], [[800, 1344], [1344, 800]]) == (800, 1344)
    with pytest.raises(ValueError, match="INPUT.FIXED_SIZES"):
        choose_fixed_size([(900, 1400)], [[800, 1344]])


def test_ema_normalizer_option(batch):
    """LOSS_NORMALIZER ema: the losses are divided by Detectron2 RetinaNet's EMA (momentum 0.9, from 100) of
    max(num_pos, 1) instead of max(num_pos, 1) itself."""
    model = build(**{"MODEL.FSAF.LOSS_NORMALIZER": "ema"})
    exact = build()  # the same weights (same seed)
    model.train()
    exact.train()
    seen = []
    ema_normalizer = model._ema_normalizer
    model._ema_normalizer = lambda num_pos, num_neg: seen.append(float(num_pos)) or ema_normalizer(num_pos, num_neg)
    losses = model(batch)
    num_pos = max(seen[0], 1.0)
    assert seen[0] > 0
    expected = 0.9 * 100.0 + 0.1 * num_pos
    assert model.loss_normalizer_ema.item() == pytest.approx(expected, rel=1e-6)
    reference = exact(batch)
    for k in ("loss_fsaf_cls", "loss_fsaf_reg"):
        assert losses[k].item() * expected == pytest.approx(reference[k].item() * num_pos, rel=1e-4), k
    model(batch)  # the average goes on from there
    assert model.loss_normalizer_ema.item() == pytest.approx(0.9 * expected + 0.1 * max(seen[1], 1.0), rel=1e-6)
