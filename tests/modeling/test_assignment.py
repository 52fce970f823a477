"""Hand-built cases for every CenterRegion rule (docs/algorithm.md#centerregion-assignment)."""
import torch

from fsaf_d2.modeling.assignment import assign_center_region, pairwise_iof


def square(cx, cy, side):
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]


def run(priors, boxes, labels, num_classes=3, prior_valid=None, crowd=None, **kw):
    """One image; boxes/labels lists (crowd: list of bools marking ignore regions)."""
    priors = torch.tensor(priors, dtype=torch.float32)
    g = max(len(boxes), 1)
    gt = torch.zeros(1, g, 4)
    lab = torch.zeros(1, g, dtype=torch.int64)
    valid = torch.zeros(1, g, dtype=torch.bool)
    if boxes:
        gt[0, : len(boxes)] = torch.tensor(boxes, dtype=torch.float32)
        lab[0, : len(boxes)] = torch.tensor(labels)
        valid[0, : len(boxes)] = True
    ignore = None
    if crowd is not None:
        ignore = torch.zeros(1, g, dtype=torch.bool)
        ignore[0, : len(crowd)] = torch.tensor(crowd)
        valid = valid & ~ignore
    if prior_valid is None:
        prior_valid = torch.ones(1, priors.shape[0], dtype=torch.bool)
    return assign_center_region(priors, gt, lab, valid, prior_valid, num_classes, gt_ignore=ignore, **kw)


def test_reference_docstring_example():
    # mmdet CenterRegionAssigner docstring: priors [0,0,10,10], [10,10,20,20]; gt [0,0,10,10] -> (1, 0) 1-based
    r = run([[0, 0, 10, 10], [10, 10, 20, 20]], [[0, 0, 10, 10]], [1])
    assert r.gt_index[0].tolist() == [0, -1]
    assert r.positive[0].tolist() == [True, False]
    assert r.negative[0].tolist() == [False, True]


def test_centre_on_border_is_outside():
    # prior centred at (10, 10) exactly on the right/bottom border of the box [0, 0, 10, 10]
    r = run([[9, 9, 11, 11]], [[0, 0, 10, 10]], [0], pos_scale=1.0, neg_scale=1.0)
    assert not r.positive[0, 0]
    # moving the centre inside by a hair makes it a positive
    r = run([[8.9, 8.9, 10.9, 10.9]], [[0, 0, 10, 10]], [0], pos_scale=1.0, neg_scale=1.0)
    assert r.positive[0, 0]


def test_core_needs_iof_above_min_pos_iof():
    # box [0, 0, 100, 100]: core (0.2) = [40, 40, 60, 60]; prior of side 8 centred at (30, 50) is inside the box
    # but its square [26, 34]x[46, 54] misses the core -> not positive, plain negative
    r = run([square(30, 50, 8), square(50, 50, 8), square(37, 50, 8)], [[0, 0, 100, 100]], [2])
    assert r.positive[0].tolist() == [False, True, True]  # (37,50): [33,41] overlaps core by 1/8 > 0.01


def test_smaller_object_wins_and_larger_class_is_ignored_there():
    big = [0, 0, 100, 100]  # class 0
    small = [40, 40, 60, 60]  # class 1, its core [48, 52] contains the centre prior
    p = square(50, 50, 8)
    r = run([p], [big, small], [0, 1])
    assert r.gt_index[0].tolist() == [1]
    assert r.shadowed_classes[0, 0].tolist() == [True, False, False]  # ignored for the big object's class


def test_equal_areas_go_to_the_later_object_as_in_the_reference():
    """mmdetection ranks areas with a stable descending sort: of two equal areas the later box has the higher
    priority and takes the prior; the earlier one's class is ignored there."""
    p = square(50, 50, 8)
    r = run([p], [[30, 30, 70, 70], [30, 30, 70, 70]], [0, 1])
    assert r.gt_index[0].tolist() == [1] and r.positive[0].tolist() == [True]
    assert r.shadowed_classes[0, 0].tolist() == [True, False, False]
    r = run([p], [[30, 30, 70, 70], [35, 25, 65, 75], [40, 40, 60, 60]], [0, 2, 1])  # 1600, 1500, 400 px²
    assert r.gt_index[0].tolist() == [2]  # the smallest still wins wherever it stands


def test_same_class_overlap_becomes_ignore_for_that_class():
    big = [0, 0, 100, 100]
    small = [40, 40, 60, 60]
    r = run([square(50, 50, 8)], [big, small], [1, 1])
    assert not r.positive[0, 0]
    assert r.negative[0, 0]  # background for the other classes
    assert r.shadowed_classes[0, 0].tolist() == [False, True, False]
    assert r.gt_index[0, 0] == -1


def test_shadow_with_equal_scales_only_where_centre_is_outside_box():
    # box [1, 1, 31, 31] (core [13, 19]^2): a side-48 prior centred at (0, 0) covers the whole core
    # (IoF 36 / 2304 > 0.01) but its centre is outside the box
    r = run([square(0, 0, 48), square(16, 16, 2)], [[1, 1, 31, 31]], [2])
    assert r.positive[0].tolist() == [False, True]
    assert r.shadowed_classes[0, 0].tolist() == [False, False, True]
    assert r.negative[0, 0]


def test_paper_shadow_ring_ignores_ring_priors():
    # neg_scale 0.5: prior in the 0.2-0.5 ring is ignored for the class, with centre inside the box
    box = [0, 0, 100, 100]  # core [40, 60], shadow [25, 75]
    r = run([square(30, 50, 8)], [box], [0], neg_scale=0.5)
    assert not r.positive[0, 0]
    assert r.shadowed_classes[0, 0].tolist() == [True, False, False]
    r = run([square(30, 50, 8)], [box], [0], neg_scale=0.2)
    assert r.shadowed_classes[0, 0].tolist() == [False, False, False]


def test_crowd_regions_ignore_all_classes():
    crowd = [0, 0, 100, 100]  # shrunk by 0.5 -> [25, 75]
    obj = [40, 40, 60, 60]
    priors = [square(50, 50, 8), square(30, 30, 8), square(20, 20, 8)]
    r = run(priors, [obj, crowd], [1, 0], crowd=[False, True])
    assert r.positive[0].tolist() == [False, False, False]  # crowd overrides even the positive
    assert r.negative[0].tolist() == [False, False, True]


def test_all_crowd_image_has_no_positive():
    r = run([square(50, 50, 8), square(5, 5, 8)], [[0, 0, 100, 100]], [0], crowd=[True])
    assert not r.positive.any()
    assert r.negative[0].tolist() == [False, True]


def test_empty_image_is_all_negative():
    r = run([square(50, 50, 8), square(5, 5, 8)], [], [])
    assert not r.positive.any()
    assert r.negative.all()
    assert not r.shadowed_classes.any()


def test_invalid_priors_are_neither_positive_nor_negative():
    r = run(
        [square(50, 50, 8), square(5, 5, 8)],
        [[0, 0, 100, 100]],
        [0],
        prior_valid=torch.tensor([[False, False]]),
    )
    assert not r.positive.any() and not r.negative.any()


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(1)
    priors = []
    for s in (8, 16, 32):
        for i in range(0, 128, s):
            for j in range(0, 128, s):
                priors.append(square(j, i, s))
    priors = torch.tensor(priors)
    n, gmax = 3, 5
    xy = torch.rand(n, gmax, 2, generator=g) * 100
    wh = torch.rand(n, gmax, 2, generator=g) * 60 + 2
    boxes = torch.cat([xy, xy + wh], dim=2)
    labels = torch.randint(0, 3, (n, gmax), generator=g)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pv = torch.ones(n, priors.shape[0], dtype=torch.bool)
    batched = assign_center_region(priors, boxes, labels, valid, pv, 3)
    for i in range(n):
        k = int(valid[i].sum())
        single = assign_center_region(
            priors, boxes[i : i + 1, : max(k, 1)], labels[i : i + 1, : max(k, 1)], valid[i : i + 1, : max(k, 1)],
            pv[i : i + 1], 3,
        )
        assert torch.equal(single.positive[0], batched.positive[i])
        assert torch.equal(single.gt_index[0], batched.gt_index[i])
        assert torch.equal(single.shadowed_classes[0], batched.shadowed_classes[i])


def test_iof_definition():
    iof = pairwise_iof(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[[5.0, 5, 20, 20]]]))
    assert torch.allclose(iof, torch.tensor([[[0.25]]]))
