"""Level selection, re-weighting, normalisation and loss values (docs/algorithm.md#training-loss)."""
import math

import pytest
import torch
from fvcore.nn import sigmoid_focal_loss

from fsaf_d2.modeling.box_coder import TBLRBoxCoder
from fsaf_d2.modeling.losses import NO_CANDIDATE_COST, fsaf_losses, iou_loss, select_levels


def test_select_levels_on_constructed_table():
    # one image, two levels of 3 priors each, two objects
    # object 0: candidates at level 0 (costs 1, 3 -> mean 2) and level 1 (cost 1.5) -> level 1
    # object 1: candidates at level 0 only (cost 0.5) -> level 0, cost 1e6 at level 1
    cost = torch.tensor([[1.0, 3.0, 0.5, 1.5, 9.0, 9.0]])
    gt_index = torch.tensor([[0, 0, 1, 0, -1, -1]])
    level = torch.tensor([0, 0, 0, 1, 1, 1])
    table, selected = select_levels(cost, gt_index, level, num_levels=2, num_gt=3)
    assert table.shape == (1, 2, 3)
    assert table[0, :, 0].tolist() == [2.0, 1.5]
    assert table[0, :, 1].tolist() == [0.5, NO_CANDIDATE_COST]
    assert table[0, :, 2].tolist() == [NO_CANDIDATE_COST, NO_CANDIDATE_COST]  # padded slot
    assert selected[0, :2].tolist() == [1, 0]


def two_level_setup(level1_better: bool):
    """One object (class 1 of 3) with candidate positives on two levels (strides 8 and 16)."""
    # level 0: 3x3 grid of stride 8; level 1: 2x2 grid of stride 16 (centres at 0 and 16)
    priors, sizes = [], []
    for s, n in ((8, 3), (16, 2)):
        for i in range(n):
            for j in range(n):
                priors.append([j * s - s / 2, i * s - s / 2, j * s + s / 2, i * s + s / 2])
        sizes.append(n * n)
    priors = torch.tensor(priors)
    level = torch.tensor([0] * 9 + [1] * 4)
    gt = torch.tensor([[[1.0, 1.0, 31.0, 31.0]]])  # core [13, 19]: (16,16) is in it on both levels
    logits = torch.full((1, 13, 3), -3.0, requires_grad=True)
    deltas = torch.full((1, 13, 4), 0.5)  # 16 px on every side at stride 8: the object's box at (16, 16)
    deltas[0, 9:] = 0.25  # 16 px at stride 16 as well, so both levels regress perfectly
    # make level 1's prediction of the object's class much better
    with torch.no_grad():
        if level1_better:
            logits[0, 9 + 3, 1] = 5.0
        else:
            logits[0, 8, 1] = 5.0
    return dict(
        cls_logits=logits,
        reg_deltas=deltas.requires_grad_(),
        priors=priors,
        level_sizes=sizes,
        prior_level=level,
        prior_valid=torch.ones(1, 13, dtype=torch.bool),
        gt_boxes=gt,
        gt_labels=torch.tensor([[1]]),
        gt_valid=torch.tensor([[True]]),
        box_coder=TBLRBoxCoder(4.0),
    )


@pytest.mark.parametrize("level1_better", [True, False])
def test_reweighting_after_selection(level1_better):
    inputs = two_level_setup(level1_better)
    losses, d = fsaf_losses(**inputs, return_details=True)
    a = d.assignment
    # candidate at (16,16) on level 0 (index 8) and on level 1 (index 12)
    assert a.positive[0].nonzero().flatten().tolist() == [8, 12]
    chosen, other = (12, 8) if level1_better else (8, 12)
    assert d.selected_level[0, 0].item() == (1 if level1_better else 0)
    assert d.final_positive[0].nonzero().flatten().tolist() == [chosen]
    # the non-selected candidate: class 1 ignored, the other classes stay negatives
    assert d.cls_weights[0, other].tolist() == [1.0, 0.0, 1.0]
    assert d.cls_weights[0, chosen].tolist() == [1.0, 1.0, 1.0]
    assert d.num_pos.item() == 1 and d.normalizer.item() == 1
    # per-level sums add up to the returned (normalised) loss
    assert torch.isclose(d.loss_cls_per_level.sum(), losses["loss_fsaf_cls"].detach())
    # the regression loss only comes from the chosen level
    reg_levels = d.loss_reg_per_level.tolist()
    assert (reg_levels[0] == 0) == level1_better and (reg_levels[1] == 0) != level1_better


def test_cost_is_mean_of_focal_sum_plus_iou():
    inputs = two_level_setup(True)
    losses, d = fsaf_losses(**inputs, return_details=True)
    logits = inputs["cls_logits"].detach()[0]
    target = torch.zeros(3)
    target[1] = 1
    for idx, lvl in ((8, 0), (12, 1)):
        focal = sigmoid_focal_loss(logits[idx], target, 0.25, 2.0, reduction="sum")
        box = TBLRBoxCoder(4.0).apply_deltas(inputs["reg_deltas"].detach()[0, idx], inputs["priors"][idx])
        expected = focal + iou_loss(box, inputs["gt_boxes"][0, 0])
        assert torch.isclose(d.cost[0, lvl, 0], expected, rtol=1e-5)


def test_normalizer_falls_back_to_negatives_without_positives():
    inputs = two_level_setup(True)
    inputs["gt_valid"] = torch.tensor([[False]])  # no object at all
    losses, d = fsaf_losses(**inputs, return_details=True)
    assert d.num_pos.item() == 0
    assert d.normalizer.item() == 13  # every valid prior is a negative
    expected = sigmoid_focal_loss(inputs["cls_logits"].detach(), torch.zeros(1, 13, 3), 0.25, 2.0, "sum") / 13
    assert torch.isclose(losses["loss_fsaf_cls"].detach(), expected)
    assert losses["loss_fsaf_reg"].item() == 0


def test_normalizer_counts_max_neg_1_per_image():
    inputs = two_level_setup(True)
    for k in ("cls_logits", "reg_deltas"):
        inputs[k] = inputs[k].detach().repeat(2, 1, 1)
    inputs["gt_boxes"] = inputs["gt_boxes"].repeat(2, 1, 1)
    inputs["gt_labels"] = inputs["gt_labels"].repeat(2, 1)
    inputs["gt_valid"] = torch.tensor([[False], [False]])
    inputs["prior_valid"] = torch.tensor([[True] * 13, [False] * 13])  # second image: no valid prior
    _, d = fsaf_losses(**inputs, return_details=True)
    assert d.normalizer.item() == 13 + 1


def test_gradients_flow_and_selection_has_none():
    inputs = two_level_setup(True)
    losses = fsaf_losses(**inputs)
    (losses["loss_fsaf_cls"] + losses["loss_fsaf_reg"]).backward()
    g = inputs["reg_deltas"].grad[0]
    assert g[12].abs().sum() > 0 and g[8].abs().sum() == 0  # only the selected candidate regresses


def test_non_finite_distance_outside_the_positives_leaves_gradients_finite():
    """A distance that overflowed (fp16 inf) at a prior that is not a candidate positive takes no part in the
    loss; its 0 weight must not meet the inf in the backward pass (0 * inf = NaN in every weight's gradient)."""
    inputs = two_level_setup(True)
    _, d = fsaf_losses(**inputs, return_details=True)
    negative = int((~d.assignment.positive[0]).nonzero()[0, 0])
    clean = fsaf_losses(**inputs)
    deltas = inputs["reg_deltas"].detach().clone()
    deltas[0, negative] = float("inf")
    inputs["reg_deltas"] = deltas.requires_grad_(True)
    losses = fsaf_losses(**inputs)
    (losses["loss_fsaf_cls"] + losses["loss_fsaf_reg"]).backward()
    assert torch.isfinite(inputs["reg_deltas"].grad).all() and torch.isfinite(inputs["cls_logits"].grad).all()
    for k in clean:
        assert torch.equal(losses[k].detach(), clean[k].detach()), k


def test_iou_loss_values():
    a = torch.tensor([0.0, 0.0, 10.0, 10.0])
    assert iou_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([0.0, 0.0, 10.0, 5.0])
    assert iou_loss(half, a).item() == pytest.approx(math.log(2), rel=1e-6)
    far = torch.tensor([20.0, 20.0, 30.0, 30.0])
    assert iou_loss(far, a).item() == pytest.approx(-math.log(1e-6), rel=1e-6)


def test_reg_clamp_applies_in_loss():
    inputs = two_level_setup(True)
    inputs["reg_deltas"] = torch.zeros(1, 13, 4, requires_grad=True)  # zero-size boxes without the clamp
    losses = fsaf_losses(**inputs)
    assert torch.isfinite(losses["loss_fsaf_reg"]) and losses["loss_fsaf_reg"].item() > 5
