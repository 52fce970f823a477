import torch

from fsaf_d2.modeling.box_coder import TBLRBoxCoder


def test_worked_example_from_spec():
    coder = TBLRBoxCoder(4.0)
    prior = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    box = coder.apply_deltas(torch.full((1, 4), 0.25), prior)
    assert torch.allclose(box, torch.tensor([[-4.0, -4.0, 12.0, 12.0]]))


def test_channel_order_is_top_bottom_left_right():
    coder = TBLRBoxCoder(1.0)
    prior = torch.tensor([[0.0, 0.0, 2.0, 2.0]])  # centre (1, 1), size 2
    # t=1, b=2, l=3, r=4 (units of 1 * prior side)
    box = coder.apply_deltas(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), prior)
    assert torch.allclose(box, torch.tensor([[1 - 6.0, 1 - 2.0, 1 + 8.0, 1 + 4.0]]))


def test_round_trip():
    g = torch.Generator().manual_seed(0)
    priors = torch.rand(100, 2, generator=g) * 100
    side = torch.randint(1, 5, (100, 1), generator=g).float() * 8
    priors = torch.cat([priors - side / 2, priors + side / 2], dim=1)
    boxes = torch.rand(100, 2, generator=g) * 100
    boxes = torch.cat([boxes, boxes + 1 + torch.rand(100, 2, generator=g) * 50], dim=1)
    coder = TBLRBoxCoder(4.0)
    assert torch.allclose(coder.apply_deltas(coder.get_deltas(priors, boxes), priors), boxes, atol=1e-4)


def test_clip_to_max_shape():
    coder = TBLRBoxCoder(4.0)
    box = coder.apply_deltas(torch.full((1, 4), 10.0), torch.tensor([[0.0, 0.0, 8.0, 8.0]]), max_shape=(30, 50))
    assert box.tolist() == [[0.0, 0.0, 50.0, 30.0]]
