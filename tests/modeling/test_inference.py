"""Inference rules: score threshold, per-level top-k, TBLR decoding with clipping, class-aware NMS."""
import pytest
import torch

from fsaf_d2.modeling.box_coder import tblr_decode
from fsaf_d2.modeling.inference import merge_levels, select_level_candidates


def test_threshold_then_topk_pairs():
    scores = torch.tensor([[0.9, 0.04, 0.5], [0.06, 0.7, 0.01], [0.3, 0.2, 0.05]])
    s, loc, cls = select_level_candidates(scores, 0.05, topk=4, rule="pairs")
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.3])
    assert loc.tolist() == [0, 1, 0, 2] and cls.tolist() == [0, 1, 2, 0]
    s, _, _ = select_level_candidates(scores, 0.05, topk=100, rule="pairs")
    assert len(s) == 6  # 0.05 itself is not > 0.05


def test_locations_rule_takes_topk_locations_first():
    scores = torch.tensor([[0.9, 0.8], [0.3, 0.2], [0.85, 0.01]])
    s, loc, cls = select_level_candidates(scores, 0.05, topk=2, rule="locations")
    # best locations by max score: 0 (0.9) and 2 (0.85); both classes of location 0 survive
    assert s.tolist() == pytest.approx([0.9, 0.85, 0.8]) and loc.tolist() == [0, 2, 0] and cls.tolist() == [0, 0, 1]


def test_decode_clips_to_image():
    priors = torch.tensor([[0.0, 0.0, 8.0, 8.0], [92.0, 60.0, 100.0, 68.0]])
    deltas = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 1.0, 1.0, 1.0]])
    boxes = tblr_decode(deltas, priors, 4.0, (64, 100))
    assert boxes.tolist() == [[0.0, 0.0, 12.0, 12.0], [64.0, 32.0, 100.0, 64.0]]


def test_class_aware_nms_and_max_detections():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9.5], [0, 0, 10, 10], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    classes = torch.tensor([0, 0, 1, 0])
    b, s, c = merge_levels([(boxes[:2], scores[:2], classes[:2]), (boxes[2:], scores[2:], classes[2:])], 0.5, 100)
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6]) and c.tolist() == [0, 1, 0]  # same-class duplicate suppressed
    _, s, _ = merge_levels([(boxes, scores, classes)], 0.5, 2)
    assert s.tolist() == pytest.approx([0.9, 0.7])
