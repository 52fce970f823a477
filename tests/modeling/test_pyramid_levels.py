"""Only the pyramid levels the head uses are built, so every trainable parameter gets a gradient.

DistributedDataParallel (without ``find_unused_parameters``, which costs every step) fails at the second
iteration when a parameter received no gradient in the first: a P7 built for a head that stops at P6
did exactly that in 2-process training of the quickstart config.
"""
import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from fsaf_d2.engine import build_config
from fsaf_d2.modeling.backbone import pyramid_levels

from fsaf_testing import make_input, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = sorted(
    p for p in glob.glob(os.path.join(REPO, "configs", "*.yaml")) if not os.path.basename(p).startswith("Base-")
)


def shipped_cfg(path):
    """A shipped config as a user trains it, on the CPU and from random weights."""
    return build_config(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.basename(p) for p in SHIPPED])
def test_every_trainable_parameter_of_every_shipped_config_gets_a_gradient(path):
    cfg = shipped_cfg(path)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    classes = cfg.MODEL.FSAF.NUM_CLASSES
    # one image with a small and a large object, one without objects: every level sees positives or
    # negatives, as in any real batch
    batch = [
        make_input(160, 192, [[10, 12, 40, 44], [20, 8, 180, 150]], [0, classes - 1]),
        make_input(160, 192, [], [], seed=1),
    ]
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert [n for n, p in trainable if p.grad is None] == []
    assert set(model.backbone.output_shape()) == set(cfg.MODEL.FSAF.IN_FEATURES)


def test_head_stopping_at_p6_builds_no_p7():
    model = build_model(tiny_cfg(**{"MODEL.FSAF.IN_FEATURES": ["p3", "p4", "p5", "p6"]}))
    names = {n for n, _ in model.named_parameters()}
    assert "backbone.top_block.p6.weight" in names
    assert not [n for n in names if ".p7." in n]
    assert list(model.backbone.output_shape()) == ["p3", "p4", "p5", "p6"]


def test_head_from_p4_drops_the_p3_convolutions_and_keeps_the_other_levels_equal():
    """FPN outputs do not depend on finer inputs, so P4-P7 are those of the full pyramid."""
    full = build_model(tiny_cfg())
    torch.manual_seed(0)
    coarse = build_model(tiny_cfg(**{"MODEL.FSAF.IN_FEATURES": ["p4", "p5", "p6", "p7"]}))
    result = coarse.load_state_dict(full.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted(result.unexpected_keys) == sorted(k for k in full.state_dict() if "fpn_lateral3" in k or "fpn_output3" in k)
    x = torch.rand(1, 3, 128, 128)
    full.eval()
    coarse.eval()
    with torch.no_grad():
        a, b = full.backbone(x), coarse.backbone(x)
    assert list(b) == ["p4", "p5", "p6", "p7"]
    for name in b:
        assert torch.equal(a[name], b[name]), name


def test_head_up_to_p5_needs_no_top_block():
    cfg = tiny_cfg(**{"MODEL.FSAF.IN_FEATURES": ["p3", "p4", "p5"]})
    assert pyramid_levels(cfg) == (["res3", "res4", "res5"], 0)
    assert build_model(cfg).backbone.top_block is None


@pytest.mark.parametrize(
    "levels, message",
    [
        (["p3", "p5", "p6"], "consecutive"),
        (["p3", "p4"], "must use p5"),
        (["p3", "x4"], "cannot read a pyramid level"),
    ],
)
def test_levels_that_cannot_be_built_fail_naming_the_keys(levels, message):
    with pytest.raises(ValueError, match=message) as e:
        build_model(tiny_cfg(**{"MODEL.FSAF.IN_FEATURES": levels}))
    assert "MODEL.FSAF.IN_FEATURES" in str(e.value)
